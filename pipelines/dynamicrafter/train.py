"""DynamiCrafter training: the paper's three stages as one loop with a different set of trainable parts.

1. the context network (and the image key/value projections and gates it feeds) on single frames,
   UNet frozen;
2. the same plus the UNet's spatial layers (temporal layers stay frozen, as the paper) on video;
3. the same plus visual detail guidance: the condition frame's latent is concatenated at a random frame
   index per sample, whose frame also gives the CLIP context.

Condition dropout for classifier-free guidance, one draw per sample as the official code: text only
dropped with probability p, text and image with p, image only with p (p = 0.05). A dropped image is a
gray image; the concatenated latent is never dropped. The loss is the noise MSE; for v-prediction
backbones it is weighted by 1/ᾱ_t, which makes it exactly the v MSE.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from pipelines.dynamicrafter.model import DynamiCrafter

TEMPORAL_MARKERS = ("temp_attentions", "temp_convs", "transformer_in")


@dataclass(frozen=True)
class TrainConfig:
    """Defaults: the paper's stage 2/3 learning rate, the official fine-tuning code's clipping and dropout."""

    stage: int = 3
    steps: int = 1000
    batch_size: int = 2
    lr: float = 5e-5  # the paper: 1e-4 in stage 1, 5e-5 in stages 2 and 3
    weight_decay: float = 1e-2
    grad_clip: float = 0.5
    uncond_prob: float = 0.05
    num_frames: int = 16
    height: int = 256
    width: int = 256
    frame_stride: int = 3
    checkpoint_every: int = 200
    seed: int = 0
    precision: str = "auto"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name: type(getattr(cls(), f.name)) for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown training parameter(s) {', '.join(unknown)}; known: {', '.join(known)}")
        config = cls(**{k: known[k](v) for k, v in values.items()})
        if config.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {config.stage}")
        return config

    @property
    def frames(self) -> int:
        """Stage 1 trains on single frames."""
        return 1 if self.stage == 1 else self.num_frames


def trainable_parameters(model: DynamiCrafter, stage: int) -> dict[str, torch.nn.Parameter]:
    """Named parameters a stage trains; everything else is frozen (`requires_grad` set accordingly)."""
    model.requires_grad_(False)
    model.backbone.unet.requires_grad_(False)
    chosen: dict[str, torch.nn.Parameter] = {}
    for name, p in model.context.named_parameters():
        chosen[f"context.{name}"] = p
    for name, p in model.processors.named_parameters():
        chosen[f"processors.{name}"] = p
    if stage >= 2:
        for name, p in model.time_embedding.stride_embedding.named_parameters():
            chosen[f"stride_embedding.{name}"] = p
        for name, p in model.backbone.unet.named_parameters():
            spatial = not any(m in name for m in TEMPORAL_MARKERS)
            if spatial and ".processor." not in name and not name.startswith("time_embedding.stride_"):
                chosen[f"unet.{name}"] = p
    for p in chosen.values():
        p.requires_grad_(True)
    return chosen


def training_loss(
    model: DynamiCrafter,
    frames: torch.Tensor,
    prompts: list[str],
    strides: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Diffusion loss of one batch: frames [B, F, 3, H, W] in [-1, 1], their captions and frame strides."""
    bb = model.backbone
    b, f = frames.shape[:2]
    device = bb.device
    with torch.no_grad():
        latents = bb.encode_frames(frames.to(device), sample=True, generators=[generator] * b).float()
    draw = torch.rand(b, generator=generator)
    p = config.uncond_prob
    drop_text = draw < 2 * p
    drop_image = (draw >= p) & (draw < 3 * p)
    index = (
        torch.randint(0, f, (b,), generator=generator)
        if config.stage == 3
        else torch.zeros(b, dtype=torch.long)
    )
    cond_frames = frames[torch.arange(b), index]  # [B, 3, H, W]
    context_images = torch.where(drop_image.view(-1, 1, 1, 1), torch.zeros_like(cond_frames), cond_frames)
    context = model.image_context(context_images.to(device), f)
    if config.stage == 3:
        condition = model.condition_latents(cond_frames[:, None], f, [[int(k)] for k in index])
    else:
        condition = torch.zeros_like(latents)
    text = bb.encode_prompt(["" if d else p for d, p in zip(drop_text.tolist(), prompts, strict=True)])

    t = torch.randint(0, bb.num_train_timesteps, (b,), generator=generator).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    noisy = bb.add_noise(latents, noise, t)
    eps = model.predict_noise(noisy, t, text, context, condition, strides.to(device).float()).float()
    per_sample = F.mse_loss(eps, noise, reduction="none").mean(dim=(1, 2, 3, 4))
    if bb.prediction_type == "v_prediction":
        per_sample = per_sample / bb.alphas_cumprod[t]
    return per_sample.mean()
