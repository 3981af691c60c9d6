"""DynamiCrafter training recipe: the paper's three stages with different trainable parts.

1. the context network (and the image key/value projections and gates it feeds) on single frames,
   UNet frozen;
2. the same plus the UNet's spatial layers (temporal layers stay frozen, as the paper) and the
   frame-stride embedding, on video;
3. the same plus visual detail guidance: the condition frame's latent is concatenated at a random frame
   index per sample, whose frame also gives the CLIP context.

Condition dropout for classifier-free guidance, one draw per sample as the official code: text only
dropped with probability p, text and image with p, image only with p (p = 0.05). A dropped image is a
gray image; the concatenated latent is never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from pipelines import media, training
from pipelines.dynamicrafter.model import DynamiCrafter, load_dynamicrafter


@dataclass(frozen=True)
class DynamiCrafterTrainConfig(training.TrainConfig):
    """Defaults: the paper's stage 2/3 learning rate (1e-4 in stage 1), the official clipping and dropout."""

    stage: int = 3
    frame_stride: int = 3

    @property
    def frames(self) -> int:
        """Stage 1 trains on single frames."""
        return 1 if self.stage == 1 else self.num_frames


def trainable_parameters(model: DynamiCrafter, config: training.TrainConfig) -> dict[str, torch.nn.Parameter]:
    chosen = {f"context.{n}": p for n, p in model.context.named_parameters()}
    chosen |= {f"processors.{n}": p for n, p in model.processors.named_parameters()}
    if config.stage >= 2:
        chosen |= {
            f"stride_embedding.{n}": p for n, p in model.time_embedding.stride_embedding.named_parameters()
        }
        spatial = training.select(
            dict(model.backbone.unet.named_parameters()),
            lambda n: not training.is_temporal(n) and ".processor." not in n and "stride_" not in n,
        )
        chosen |= {f"unet.{n}": p for n, p in spatial.items()}
    return training.freeze_all_but(model, model.backbone.unet, chosen)


def decode(batch: pa.Table, config: DynamiCrafterTrainConfig, source: str) -> pa.Table:
    """Rows (id, video or image, prompt, optional frame_stride) -> clips of `frames` frames at a stride."""
    rng = training.augmentation_rng()
    size = (config.height, config.width)

    def row_example(row: dict[str, Any]) -> dict[str, Any]:
        if row.get("video"):
            video = media.read_video(row["video"], size=size)
            picked, used = training.clip_indices(
                len(video), config.frames, int(row.get("frame_stride") or config.frame_stride), rng
            )
            clip = video[picked]
        elif row.get("image"):
            clip, used = media.read_image(row["image"], size)[None].repeat(config.frames, 0), 1
        else:
            raise media.MediaError("row has neither video nor image")
        return {"frames": clip, "prompt": row.get("prompt") or "", "frame_stride": used}

    shape = (config.frames, *size, 3)
    return training.decode_rows(
        batch, row_example, {"frames": shape, "prompt": pa.string(), "frame_stride": pa.int64()}
    )


def training_loss(
    model: DynamiCrafter, batch: dict[str, Any], config: DynamiCrafterTrainConfig, generator: torch.Generator
) -> torch.Tensor:
    """Diffusion loss of one batch of decoded clips."""
    bb = model.backbone
    frames = training.to_frames(batch["frames"])
    prompts, strides = list(batch["prompt"]), torch.as_tensor(batch["frame_stride"])
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
    noisy, t, noise = training.noisy_latents(bb, latents, generator)
    eps = model.predict_noise(noisy, t, text, context, condition, strides.to(device).float())
    return training.diffusion_loss(bb, eps, noise, t)


RECIPE = training.Recipe(
    config_type=DynamiCrafterTrainConfig,
    stages=(1, 2, 3),
    load=load_dynamicrafter,
    trainable=trainable_parameters,
    decode=decode,
    sources=lambda config: {"clips": (1.0, ("video", "image"))},
    loss=training_loss,
)
