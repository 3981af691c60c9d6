"""X-CLIP text-to-video alignment, the metric LiveSketch's paper reports next to CLIP scores.

HF's `XCLIPModel` (e.g. `microsoft/xclip-base-patch32`) is Ni et al., ECCV 2022, "Expanding
Language-Image Pretrained Models for General Video Recognition". LiveSketch cites X-CLIP without
naming a checkpoint, and Ma et al. 2022 ("X-CLIP: End-to-End Multi-grained Contrastive Learning for
Video-Text Retrieval") is another model of the same name, so our numbers need not match the paper's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines import media, model_cache, tiny

XCLIP_FILES = ["*.json", "*.safetensors", "*.txt"]
# The X-CLIP LiveSketch scores with when the job names none and this one is cached on the node.
DEFAULT_XCLIP = "microsoft/xclip-base-patch32"

# ImageNet statistics, as in microsoft/xclip-base-patch32's preprocessor_config.json.
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]


def _build_tiny_xclip(path: Path, image_size: int = 32, num_frames: int = 8) -> None:
    """Random X-CLIP with tokenizer and a VideoMAE image processor, laid out like the real checkpoint."""
    from transformers import (
        CLIPTokenizer,
        VideoMAEImageProcessorPil,
        XCLIPConfig,
        XCLIPModel,
        XCLIPTextConfig,
        XCLIPVisionConfig,
    )

    tiny.write_tokenizer(path)
    tokenizer = CLIPTokenizer.from_pretrained(path)
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    projection = 16  # the MIT runs on projected frame embeddings, so its width is the projection's
    vision = XCLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=image_size // 4,
        num_frames=num_frames,
        mit_hidden_size=projection,
        mit_intermediate_size=2 * projection,
        mit_num_hidden_layers=1,
        mit_num_attention_heads=2,
    )
    config = XCLIPConfig(
        text_config=XCLIPTextConfig(**tiny.tiny_text_config(ids)).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=projection,
        prompt_layers=1,
        prompt_num_attention_heads=2,
    )
    torch.manual_seed(0)
    XCLIPModel(config).save_pretrained(path)
    VideoMAEImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=_IMAGENET_MEAN,
        image_std=_IMAGENET_STD,
    ).save_pretrained(path)


PRESETS = {
    "tiny": lambda: model_cache.build_once(f"tiny-xclip-v{tiny.TINY_VERSION}", _build_tiny_xclip),
}


def prepare_xclip(ref: str) -> Path:
    return model_cache.resolve(ref, PRESETS, XCLIP_FILES)


def cached_default() -> str | None:
    """DEFAULT_XCLIP when its files are on this node, else None: a metric is never a surprise download."""
    return DEFAULT_XCLIP if model_cache.is_cached(DEFAULT_XCLIP, XCLIP_FILES) else None


def sample_indices(total: int, count: int) -> np.ndarray:
    """`count` frame indices spread evenly over `total`; a shorter video repeats frames to fill them.

    X-CLIP's temporal layers have one position per frame, so the clip must have exactly `count`.
    """
    if total < 1:
        raise ValueError("X-CLIP needs at least one frame")
    if count <= total:
        return media.frame_indices(total, count)
    return np.linspace(0, total - 1, count).round().astype(np.int64)


@dataclass(eq=False)
class XClip:
    ref: str
    model: torch.nn.Module
    tokenizer: object
    processor: object
    device: torch.device

    @property
    def num_frames(self) -> int:
        return int(self.model.config.vision_config.num_frames)

    @torch.no_grad()
    def score(self, frames: np.ndarray, prompt: str) -> float:
        """Cosine in [-1, 1] of the video embedding and the video-conditioned prompt embedding.

        `frames` are uint8 [F, H, W, 3]. This is X-CLIP's `logits_per_video` without the logit scale:
        its text embedding depends on the video through the prompt generator, so both come from one
        forward pass rather than from separately cached text and video features.
        """
        clip = frames[sample_indices(len(frames), self.num_frames)]
        pixels = self.processor(list(clip), return_tensors="pt")["pixel_values"]
        # A VideoMAE processor returns [1, F, 3, H, W], a CLIP image processor [F, 3, H, W].
        pixels = pixels.reshape(1, self.num_frames, *pixels.shape[-3:]).to(self.device)
        text_config = self.model.config.text_config
        tokens = self.tokenizer(
            [prompt],
            padding=True,
            truncation=True,
            max_length=min(self.tokenizer.model_max_length, text_config.max_position_embeddings),
            return_tensors="pt",
        ).to(self.device)
        out = self.model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=pixels.to(self.model.dtype),
        )
        # Both come back unit-norm; the text embeddings are [videos, texts, D].
        return float((out.video_embeds[0].float() * out.text_embeds[0, 0].float()).sum())


@functools.cache
def load_xclip(ref: str = "tiny", device: str = "cpu") -> XClip:
    """X-CLIP (hub id | local dir | tiny), loaded once per process."""
    from transformers import AutoImageProcessor, AutoTokenizer, XCLIPModel

    path = prepare_xclip(ref)
    try:
        model = XCLIPModel.from_pretrained(path).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        processor = AutoImageProcessor.from_pretrained(path, backend="pil")  # no torchvision (see clip.py)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise model_cache.ModelLoadError(f"cannot load X-CLIP {ref!r} from {path}: {exc}") from exc
    return XClip(ref=ref, model=model, tokenizer=tokenizer, processor=processor, device=torch.device(device))
