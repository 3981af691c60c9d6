"""CLIP embeddings of frames, images and prompts, for the metrics every job reports.

Images go through the checkpoint's own `CLIPImageProcessor` settings, the same preprocessing torchmetrics'
CLIPScore uses, so our scores agree with that reference implementation on the same model. Its PIL
backend (`CLIPImageProcessorPil`) is named explicitly: transformers' default backend needs torchvision,
which anima never installs, and one backend everywhere keeps scores equal across machines.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from pipelines import model_cache, tiny

CLIP_FILES = ["*.json", "*.safetensors", "*.txt"]

PRESETS = {"tiny": lambda: model_cache.build_once(f"tiny-clip-v{tiny.TINY_VERSION}", tiny.build_clip)}


def prepare_clip(ref: str):
    return model_cache.resolve(ref, PRESETS, CLIP_FILES)


@dataclass(eq=False)
class Clip:
    ref: str
    model: torch.nn.Module
    tokenizer: object
    processor: object
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
    def embed_images(self, images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        """Unit-norm image embeddings [N, D] of uint8 RGB arrays (N, H, W, 3)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = list(images[start : start + self.batch_size])
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            out.append(_unit(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        return torch.cat(out)


def _unit(features) -> torch.Tensor:
    # transformers 5 may return a model output object rather than a bare tensor.
    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(tensor.float(), dim=-1)


@functools.cache
def load_clip(ref: str = "tiny", device: str = "cpu") -> Clip:
    """CLIP (hub id | local dir | tiny), loaded once per process."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    path = prepare_clip(ref)
    try:
        model = CLIPModel.from_pretrained(path).to(device).eval()
        tokenizer = CLIPTokenizer.from_pretrained(path)
        processor = CLIPImageProcessorPil.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise model_cache.ModelLoadError(f"cannot load CLIP {ref!r} from {path}: {exc}") from exc
    return Clip(ref=ref, model=model, tokenizer=tokenizer, processor=processor, device=torch.device(device))
