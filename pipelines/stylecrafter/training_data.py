"""StyleCrafter's training configuration, augmentation and example decoding, without torch.

The stages are described in `train.py`. Run by the Ray Data tasks that decode the manifest;
`pipelines/training_data.py` says why apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines import media, training_data

# Phrases that name a style rather than content ("a painting of", "in the style of ...", "watercolor").
DEFAULT_STYLE_WORDS = (
    r"\b(an? )?(oil |watercolou?r |ink |digital )?(painting|drawing|sketch|illustration|artwork|render(ing)?)"
    r" of\b|\bin the style of [^,.]*|\b(watercolou?r|oil painting|ink wash|line art|pixel art|anime style)\b"
)


@dataclass(frozen=True)
class StyleTrainConfig(training_data.TrainConfig):
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


def decode(
    batch: pa.Table, config: StyleTrainConfig, source: str, skipped: list[str] | None = None
) -> pa.Table:
    """Rows -> (frames, style reference, caption): clips for "clips", single frames for "images"."""
    rng = training_data.augmentation_rng()
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
            picked, _ = training_data.clip_indices(len(video), frames, config.frame_stride, rng)
            clip, original = video[picked], video[int(rng.choice(picked))]
        return {
            "frames": clip,
            "style": style_reference(original, config, rng),
            "prompt": strip_style_words(row.get("prompt") or "", config.style_words),
        }

    side = config.style_size
    columns = {"frames": (frames, *size, 3), "style": (side, side, 3), "prompt": pa.string()}
    return training_data.decode_rows(batch, row_example, columns, skipped)
