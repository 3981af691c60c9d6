"""CLIP embeddings of frames, images and prompts, for the metrics every job reports.

Images go through the checkpoint's own `CLIPImageProcessor` settings, the same preprocessing torchmetrics'
CLIPScore uses, so our scores agree with that reference implementation on the same model. The steps are
those of its PIL backend (`CLIPImageProcessorPil`; transformers' default backend needs torchvision, which
anima never installs), split in two so that the evaluation's CPU decode stage can take the costly half:
the resize and centre crop of uint8 frames (`pipelines.clip_crop`, torch-free), then rescale and
normalise, here, as one lookup table on the model's device. A test checks both halves give the
processor's pixel values exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from pipelines import model_cache, tiny
from pipelines.clip_crop import ClipCrop

CLIP_FILES = ["*.json", "*.safetensors", "*.txt"]

PRESETS = {"tiny": lambda: model_cache.build_once(f"tiny-clip-v{tiny.TINY_VERSION}", tiny.build_clip)}


def prepare_clip(ref: str):
    return model_cache.resolve(ref, PRESETS, CLIP_FILES)


@dataclass(eq=False)
class Clip:
    ref: str
    model: torch.nn.Module
    tokenizer: object
    crop: ClipCrop
    pixel_table: torch.Tensor  # [3, 256] on `device`: a uint8 value's rescaled, normalised value per channel
    device: torch.device
    batch_size: int = 32

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings [N, D]."""
        tokens = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).to(self.device)
        return _unit(self.model.get_text_features(**tokens))

    @torch.no_grad()
    def embed_images(self, images: np.ndarray | list[np.ndarray], cropped: bool = False) -> torch.Tensor:
        """Unit-norm image embeddings [N, D] of uint8 RGB arrays (N, H, W, 3); `cropped`: already through
        `self.crop` (the decode stage's crops)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            crops = np.asarray(batch) if cropped else self.crop(batch)
            out.append(_unit(self.model.get_image_features(pixel_values=self.pixels(crops))))
        return torch.cat(out)

    def pixels(self, crops: np.ndarray) -> torch.Tensor:
        """uint8 crops [N, h, w, 3] -> the model's pixel values [N, 3, h, w], on its device."""
        values = torch.from_numpy(np.ascontiguousarray(crops)).to(self.device).permute(0, 3, 1, 2).long()
        return torch.stack([self.pixel_table[c][values[:, c]] for c in range(3)], dim=1)


def _unit(features) -> torch.Tensor:
    # transformers 5 may return a model output object rather than a bare tensor.
    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(tensor.float(), dim=-1)


@functools.cache
def load_clip(ref: str = "tiny", device: str = "cpu") -> Clip:
    """CLIP (hub id | local dir | tiny), loaded once per process."""
    from transformers import CLIPModel, CLIPTokenizer

    path = prepare_clip(ref)
    try:
        model = CLIPModel.from_pretrained(path).to(device).eval()
        tokenizer = CLIPTokenizer.from_pretrained(path)
        processor = _image_processor(path)
        crop, table = ClipCrop.from_config(processor.to_dict()), pixel_table(processor)
    except (OSError, ValueError, KeyError) as exc:
        raise model_cache.ModelLoadError(f"cannot load CLIP {ref!r} from {path}: {exc}") from exc
    return Clip(
        ref=ref,
        model=model,
        tokenizer=tokenizer,
        crop=crop,
        pixel_table=table.to(device),
        device=torch.device(device),
    )


def clip_crop(ref: str) -> ClipCrop:
    """The resize and crop of a prepared CLIP's image processor: what the decode stage is sent, read as
    `load_clip` reads it (transformers finds the settings in processor_config.json or
    preprocessor_config.json), so the stage and the actors never crop differently."""
    path = prepare_clip(ref)
    try:
        return ClipCrop.from_config(_image_processor(path).to_dict())
    except (OSError, ValueError, KeyError) as exc:
        raise model_cache.ModelLoadError(
            f"cannot load CLIP {ref!r}'s image processor from {path}: {exc}"
        ) from exc


def _image_processor(path):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(path)


def pixel_table(processor) -> torch.Tensor:
    """[3, 256] float32: what the processor's rescale and normalise make of each uint8 value, with its
    arithmetic (float64 rescale, float32 normalise), so that looking values up gives its exact output."""
    values = np.arange(256, dtype=np.float64)
    if processor.do_rescale:
        values = values * processor.rescale_factor
    table = np.broadcast_to(values.astype(np.float32), (3, 256))
    if processor.do_normalize:
        # A processor may give one value for all channels.
        mean = np.broadcast_to(np.asarray(processor.image_mean, np.float32), (3,))[:, None]
        std = np.broadcast_to(np.asarray(processor.image_std, np.float32), (3,))[:, None]
        table = (table - mean) / std
    return torch.from_numpy(np.ascontiguousarray(table, np.float32))
