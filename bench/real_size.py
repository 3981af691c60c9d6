"""What the bench scripts share besides timing: the models they time and the dtype actors would use.

`--modelscope-size` in every bench builds random weights with ModelScope/VideoCrafter's component
shapes (and a ViT-H-sized CLIP tower for the adapter methods) in temporary directories: no download.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def bench_models(modelscope_size: bool, image_encoder: bool = False) -> dict[str, str]:
    """`models` for the loaders: tiny presets, or real-size random weights built now."""
    from pipelines import tiny

    if not modelscope_size:
        return {"backbone": "tiny", "image_encoder": "tiny"} if image_encoder else {"backbone": "tiny"}
    models = {"backbone": tempfile.mkdtemp(prefix="modelscope-size-")}
    tiny.build_modelscope_size(Path(models["backbone"]))
    if image_encoder:
        models["image_encoder"] = tempfile.mkdtemp(prefix="clip-h-size-")
        tiny.build_clip(Path(models["image_encoder"]), image_size=224, width=1280, layers=32)
    return models


def bench_dtype(device: str) -> torch.dtype:
    """The dtype the method's actor would load the model in on that device."""
    from actors.base import model_dtype

    return model_dtype(device, "auto")
