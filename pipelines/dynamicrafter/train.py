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

As the official training: the loss is the MSE to the backbone's own target (v for the 512/1024 models),
the clean latent is scaled by the dynamic-rescale table before noising when the model samples with
one, and each clip's frame stride is random (1..`max_frame_stride`) unless its row sets one; the fs
input is that stride, or for fps models (512/1024) the clip's source fps // stride. Stage 1 runs on
single frames and trains every frame's queries of the context network: each sample takes the context
tokens of a random frame of `video_length`. A converted official model fine-tunes the same way
(`--adapter` of `anima convert`).
"""

from __future__ import annotations

from typing import Any

import torch

from pipelines import training
from pipelines.ddim import dynamic_rescale_table
from pipelines.dynamicrafter.model import DynamiCrafter, load_dynamicrafter, place_condition
from pipelines.dynamicrafter.training_data import DynamiCrafterTrainConfig, decode
from pipelines.training_data import TrainConfig


def trainable_parameters(model: DynamiCrafter, config: TrainConfig) -> dict[str, torch.nn.Parameter]:
    chosen = {f"context.{n}": p for n, p in model.context.named_parameters()}
    chosen |= {f"processors.{n}": p for n, p in model.processors.named_parameters()}
    if config.stage >= 2:
        chosen |= {
            f"stride_embedding.{n}": p for n, p in model.fs_embedding.stride_embedding.named_parameters()
        }
        spatial = training.select(
            dict(model.backbone.unet.named_parameters()),
            lambda n: not training.is_temporal(n) and ".processor." not in n and "stride_" not in n,
        )
        chosen |= {f"unet.{n}": p for n, p in spatial.items()}
    return training.freeze_all_but(model, model.backbone.unet, chosen)


def fs_values(model: DynamiCrafter, strides: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """The fs input of each clip: its frame stride, or for fps models source fps // stride (official
    floor division); clips without a rate (images) take the model's default fs."""
    if model.config.fs_kind == "frame_stride":
        return strides.float()
    default = float(model.config.sample_defaults.get("fs", 24))
    return torch.where(rates > 0, torch.div(rates, strides, rounding_mode="floor"), default).float()


def training_loss(
    model: DynamiCrafter, batch: dict[str, Any], config: DynamiCrafterTrainConfig, generator: torch.Generator
) -> torch.Tensor:
    """Diffusion loss of one batch of decoded clips."""
    bb = model.backbone
    frames = training.to_frames(batch["frames"])
    prompts = list(batch["prompt"])
    fs = fs_values(model, torch.as_tensor(batch["frame_stride"]), torch.as_tensor(batch["fps"]).double())
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
    if config.stage == 1:
        # One frame per sample, the context tokens of a random frame: every frame's queries learn.
        queries = model.config.queries_per_frame
        full = model.image_context(context_images.to(device), model.config.video_length)
        which = torch.randint(0, model.config.video_length, (b,), generator=generator).tolist()
        context = torch.stack([full[i, k * queries : (k + 1) * queries] for i, k in enumerate(which)])
    else:
        context = model.image_context(context_images.to(device), f)
    if config.stage == 3:
        # The condition latent is the clip's own (posterior-sampled) latent of that frame, as official.
        picked = latents[torch.arange(b), :, index].unsqueeze(2)
        condition = place_condition(
            picked, f, [[int(k)] for k in index], model.config.sample_defaults.get("repeat_condition", False)
        )
    else:
        condition = torch.zeros_like(latents)
    text = bb.encode_prompt(["" if d else p for d, p in zip(drop_text.tolist(), prompts, strict=True)])
    rescale = float(model.config.sample_defaults.get("dynamic_rescale", 0.0))
    x0_scale = (
        dynamic_rescale_table(rescale, int(model.config.sample_defaults.get("rescale_turning_step", 400)))
        if rescale
        else None
    )
    noisy, t, noise, x0 = training.noisy_latents(bb, latents, generator, x0_scale)
    output = model.predict(noisy, t, text, context, condition, fs.to(device))
    return training.diffusion_loss(bb, output, x0, noise, t)


RECIPE = training.Recipe(
    config_type=DynamiCrafterTrainConfig,
    stages=(1, 2, 3),
    load=load_dynamicrafter,
    trainable=trainable_parameters,
    decode=decode,
    sources=lambda config: {"clips": (1.0, ("video", "image"))},
    loss=training_loss,
)
