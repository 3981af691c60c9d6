"""A CLIP checkpoint's image resize and centre crop, on uint8 frames, without torch or transformers.

The evaluation's CPU decode stage crops frames with it, so the scoring actors receive CLIP-sized uint8
crops and only rescale and normalise them on their device (`pipelines.clip`). The settings are those of
the checkpoint's image processor as transformers loads it (`pipelines.clip.clip_crop`); the steps are
those of `CLIPImageProcessorPil` (PIL resize of the shortest edge, then a centre crop), and a test checks
the pixels are equal to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

PIL_BICUBIC = 3


@dataclass(frozen=True)
class ClipCrop:
    shortest_edge: int | None  # resize the shorter side to this, keeping the aspect ratio
    size: tuple[int, int] | None  # or resize to exactly (height, width); None for both: no resize
    crop: tuple[int, int] | None  # centre crop (height, width); None: no crop
    resample: int = PIL_BICUBIC

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ClipCrop:
        """From an image processor's settings (its `to_dict()`, as loaded by transformers: the one source
        for the decode stage and the actors), or a preprocessor_config.json in either spelling."""
        size, crop = config.get("size", {"shortest_edge": 224}), config.get("crop_size", 224)
        size = {"shortest_edge": size} if isinstance(size, int) else {k: v for k, v in size.items() if v}
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
        if set(size) - {"shortest_edge", "height", "width"}:
            raise ValueError(
                f"unsupported image processor size {size}: anima resizes by shortest_edge or height/width"
            )
        resize = config.get("do_resize", True)
        return cls(
            shortest_edge=size.get("shortest_edge") if resize else None,
            size=(size["height"], size["width"]) if resize and "height" in size else None,
            crop=(crop["height"], crop["width"]) if config.get("do_center_crop", True) else None,
            resample=int(config.get("resample", PIL_BICUBIC)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClipCrop:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def __call__(self, images: npt.NDArray[np.uint8] | list[npt.NDArray[np.uint8]]) -> npt.NDArray[np.uint8]:
        """uint8 RGB [N, H, W, 3] (or a list of differently sized ones) -> uint8 crops [N, h, w, 3]."""
        return np.stack([self._one(image) for image in images])

    def _one(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        height, width = image.shape[:2]
        if self.shortest_edge is not None:
            short, long = sorted((height, width))
            scaled = (self.shortest_edge, int(self.shortest_edge * long / short))
            height, width = scaled if height <= width else scaled[::-1]
        elif self.size is not None:
            height, width = self.size
        if (height, width) != image.shape[:2]:
            image = np.asarray(Image.fromarray(image).resize((width, height), resample=self.resample))
        if self.crop is None:
            return image
        return _centre_crop(image, *self.crop)


def _centre_crop(image: npt.NDArray[np.uint8], height: int, width: int) -> npt.NDArray[np.uint8]:
    """The processor's crop: offsets rounded down; where the image is smaller, zero padding (rounded up
    before it)."""
    rows, cols = image.shape[:2]
    if rows < height or cols < width:
        padded = np.zeros((max(rows, height), max(cols, width), 3), np.uint8)
        top, left = -(-(padded.shape[0] - rows) // 2), -(-(padded.shape[1] - cols) // 2)
        padded[top : top + rows, left : left + cols] = image
        image, rows, cols = padded, *padded.shape[:2]
    top, left = (rows - height) // 2, (cols - width) // 2
    return image[top : top + height, left : left + width]
