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
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from pipelines import media, training
from pipelines.metrics import to_signed
from pipelines.stylecrafter.model import StyleCrafter, load_stylecrafter
from pipelines.temporal import temporal_layers_skipped

# Phrases that name a style rather than content ("a painting of", "in the style of ...", "watercolor").
DEFAULT_STYLE_WORDS = (
    r"\b(an? )?(oil |watercolou?r |ink |digital )?(painting|drawing|sketch|illustration|artwork|render(ing)?)"
    r" of\b|\bin the style of [^,.]*|\b(watercolou?r|oil painting|ink wash|line art|pixel art|anime style)\b"
)


@dataclass(frozen=True)
class StyleTrainConfig(training.TrainConfig):
    """Learning rate and dropout are not given by the paper (ours); the paper's sizes are 512² and 320×512."""

    stage: int = 1
    lr: float = 1e-4
    height: int = 320
    width: int = 512
    image_ratio: float = 0.2  # stage 2: share of steps on style images
    style_resize: float = 800 / 512  # the reference's resize relative to the crop
    style_words: str = DEFAULT_STYLE_WORDS
    frame_stride: int = 3

    @property
    def style_size(self) -> int:
        return min(self.height, self.width)


def strip_style_words(caption: str, pattern: str) -> str:
    """The caption without the words naming its style, so that the style comes from the reference image."""
    stripped = re.sub(pattern, " ", caption, flags=re.IGNORECASE)
    stripped = re.sub(r"\s+([,.])", r"\1", re.sub(r"\s+", " ", stripped))
    return re.sub(r"^[\s,]+|[\s,]+$", "", stripped)


def style_reference(image: np.ndarray, config: StyleTrainConfig, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of the image resized so that its shorter side is `style_resize`× the crop."""
    side = config.style_size
    h, w = image.shape[:2]
    scale = round(side * config.style_resize) / min(h, w)
    resized = np.asarray(
        Image.fromarray(image).resize((max(side, round(w * scale)), max(side, round(h * scale))))
    )
    top = int(rng.integers(0, resized.shape[0] - side + 1))
    left = int(rng.integers(0, resized.shape[1] - side + 1))
    return resized[top : top + side, left : left + side]


def trainable_parameters(model: StyleCrafter, config: training.TrainConfig) -> dict[str, torch.nn.Parameter]:
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


def decode(batch: pa.Table, config: StyleTrainConfig, source: str) -> pa.Table:
    """Rows -> (frames, style reference, caption): clips for "clips", single frames for "images"."""
    rng = training.augmentation_rng()
    size = (config.height, config.width)
    # Images pass the temporal layers as single frames, which attend only to themselves (the official
    # identity temporal mask of image batches).
    frames = config.num_frames if source == "clips" else 1

    def row_example(row: dict[str, Any]) -> dict[str, Any]:
        if source == "images":
            original = media.read_image(row["image"])
            clip = media.read_image(row["image"], size)[None]
        else:
            video = media.read_video(row["video"], size=size)
            picked, _ = training.clip_indices(len(video), frames, config.frame_stride, rng)
            clip, original = video[picked], video[int(rng.choice(picked))]
        return {
            "frames": clip,
            "style": style_reference(original, config, rng),
            "prompt": strip_style_words(row.get("prompt") or "", config.style_words),
        }

    side = config.style_size
    columns = {"frames": (frames, *size, 3), "style": (side, side, 3), "prompt": pa.string()}
    return training.decode_rows(batch, row_example, columns)


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
