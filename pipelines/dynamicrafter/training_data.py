"""DynamiCrafter's training configuration and example decoding, without torch (see `train.py` for the stages).

Run by the Ray Data tasks that decode the manifest; `pipelines/training_data.py` says why apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipelines import media, training_data

STAGE_ONE_LR = 1e-4  # the paper's stage-1 learning rate


@dataclass(frozen=True)
class DynamiCrafterTrainConfig(training_data.TrainConfig):
    """Defaults: the paper's learning rates (1e-4 in stage 1, `lr` after), official clipping and dropout."""

    stage: int = 3
    max_frame_stride: int = 6  # official `frame_stride` with `random_fs`: strides 1..6
    random_fs: bool = True
    frame_stride: int = 3  # the stride of every clip when `random_fs` is off

    @property
    def frames(self) -> int:
        """Stage 1 trains on single frames."""
        return 1 if self.stage == 1 else self.num_frames

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DynamiCrafterTrainConfig:
        if values.get("stage") == 1 and values.get("lr") is None:
            values = {**values, "lr": STAGE_ONE_LR}
        return super().from_dict(values)


def decode(
    batch: pa.Table, config: DynamiCrafterTrainConfig, source: str, skipped: list[str] | None = None
) -> pa.Table:
    """Rows (id, video or image, prompt, optional frame_stride) -> clips of `frames` frames at a stride,
    with the stride used and the source's frame rate (0 for images)."""
    rng = training_data.augmentation_rng()
    size = (config.height, config.width)

    def row_example(row: dict[str, Any]) -> dict[str, Any]:
        if row.get("video"):
            video, rate = media.read_video_and_rate(row["video"], size=size)
            stride = row.get("frame_stride") or (
                int(rng.integers(1, config.max_frame_stride + 1)) if config.random_fs else config.frame_stride
            )
            picked, used = training_data.clip_indices(len(video), config.frames, int(stride), rng)
            clip = video[picked]
        elif row.get("image"):
            clip, used, rate = media.read_image(row["image"], size)[None].repeat(config.frames, 0), 1, 0.0
        else:
            raise media.MediaError("row has neither video nor image")
        return {"frames": clip, "prompt": row.get("prompt") or "", "frame_stride": used, "fps": rate}

    columns = {
        "frames": (config.frames, *size, 3),
        "prompt": pa.string(),
        "frame_stride": pa.int64(),
        "fps": pa.float64(),
    }
    return training_data.decode_rows(batch, row_example, columns, skipped)
