"""StyleCrafter training recipe (the official repository released none; facts from the paper, arXiv v2).

1. Style modulation on images: the style adapter (Q-Former, scale predictor, style key/value and
   LayerNorm) is trained, the UNet frozen. Content-style decoupled augmentation: the target is the
   image cover-resized and centre-cropped to the training size; the style reference is a random square
   crop of a larger resize of the same image (the paper: 512 centre crop vs a 512 crop of an 800 resize),
   and style words are stripped from the caption.
2. Temporal adaptation: only the temporal blocks are trained, the adapter frozen, on videos mixed with
   style images (images in `image_ratio` of the steps, as single frames).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from pipelines import training
from pipelines.metrics import to_signed
from pipelines.stylecrafter.model import StyleCrafter, load_stylecrafter
from pipelines.stylecrafter.training_data import StyleTrainConfig, decode
from pipelines.temporal import temporal_layers_skipped
from pipelines.training_data import TrainConfig


def trainable_parameters(model: StyleCrafter, config: TrainConfig) -> dict[str, torch.nn.Parameter]:
    if config.stage == 1:
        chosen = {f"qformer.{n}": p for n, p in model.qformer.named_parameters()}
        chosen |= {f"scales.{n}": p for n, p in model.scales.named_parameters()}
        chosen |= {f"processors.{n}": p for n, p in model.processors.named_parameters()}
    else:
        temporal = training.select(dict(model.backbone.unet.named_parameters()), training.is_temporal)
        chosen = {f"unet.{n}": p for n, p in temporal.items()}
    return training.freeze_all_but(model, model.backbone.unet, chosen)


def sources(config: StyleTrainConfig) -> dict[str, tuple[float, tuple[str, ...]]]:
    if config.stage == 1:
        return {"images": (1.0, ("image",))}
    return {"clips": (1 - config.image_ratio, ("video",)), "images": (config.image_ratio, ("image",))}


def training_loss(
    model: StyleCrafter, batch: dict[str, Any], config: StyleTrainConfig, generator: torch.Generator
) -> torch.Tensor:
    bb = model.backbone
    device = bb.device
    frames = training.to_frames(batch["frames"])
    styles = to_signed(batch["style"])
    b = len(frames)
    with torch.no_grad():
        latents = bb.encode_frames(frames.to(device), sample=True, generators=[generator] * b).float()
    drop_text = torch.rand(b, generator=generator) < config.uncond_prob
    prompts = ["" if d else p for d, p in zip(drop_text.tolist(), batch["prompt"], strict=True)]
    text = bb.encode_prompt(prompts)
    style, scales = model.style([s[None].to(device) for s in styles], text)
    noisy, t, noise, x0 = training.noisy_latents(bb, latents, generator)
    # Stage 1 trains the image model's path: every temporal layer skipped. (Stage 2's image steps keep
    # them, on single frames: they are what stage 2 trains.)
    images = temporal_layers_skipped(bb.unet) if config.stage == 1 else contextlib.nullcontext()
    with images:
        output = model.predict(noisy, t, text, style, scales)
    return training.diffusion_loss(bb, output, x0, noise, t)


RECIPE = training.Recipe(
    config_type=StyleTrainConfig,
    stages=(1, 2),
    load=load_stylecrafter,
    trainable=trainable_parameters,
    decode=decode,
    sources=sources,
    loss=training_loss,
)
