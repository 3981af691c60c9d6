"""What training's CPU decoding stage needs, without torch: shared hyperparameters, rows -> examples.

Ray Data's decoding tasks, Ray Train's controller and the dataset coordinator all deserialize the
decode function and its configuration; kept apart from the models, none of them imports torch,
diffusers or transformers (0.5 s and 93 MB to import instead of 6 s and 366 MB, on 2 cores).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import media
from pipelines.params import from_values


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters every method's training has; methods subclass it for their own."""

    stage: int = 1
    steps: int = 1000
    batch_size: int = 2
    lr: float = 5e-5
    weight_decay: float = 1e-2
    grad_clip: float = 0.5
    uncond_prob: float = 0.05
    num_frames: int = 16
    height: int = 256
    width: int = 256
    checkpoint_every: int = 200
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = True  # recompute the UNet's blocks in backward: memory for video sizes

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return from_values(cls, values, strict=True)


def clip_indices(total: int, frames: int, stride: int, rng: np.random.Generator) -> tuple[list[int], int]:
    """`frames` indices `stride` apart from a random start; the stride shrinks for short videos (official)."""
    if total < frames:
        raise media.MediaError(f"video has {total} frames, {frames} needed")
    if frames > 1 and (frames - 1) * stride + 1 > total:
        stride = max(1, (total - 1) // (frames - 1))
    span = (frames - 1) * stride + 1
    start = int(rng.integers(0, total - span + 1))
    return [start + i * stride for i in range(frames)], stride


def augmentation_rng() -> np.random.Generator:
    """Draws of one decoded batch (clip windows, style crops), fresh on every pass over the data.

    Ray Data re-runs the decoding stage each epoch; a generator fixed by the rows (as this was before)
    gave every epoch the same windows and crops. Runs are not bit-reproducible anyway: the streaming
    order of batches across workers is not fixed.
    """
    return np.random.default_rng()


def decode_rows(
    batch: pa.Table,
    decode_row: Callable[[dict[str, Any]], dict[str, Any]],
    columns: dict[str, pa.DataType | tuple[int, ...]],
    skipped: list[str] | None = None,
) -> pa.Table:
    """Examples of the rows `decode_row` can read; a row it cannot is skipped, not fatal: why is appended
    to `skipped` when given (its caller reports it), else printed.

    A column given as a shape holds uint8 arrays of that shape (a fixed-shape tensor column, which Ray
    Data hands to the workers as one numpy array); other columns are scalars of the given Arrow type.
    """
    examples = []
    for row in batch.to_pylist():
        try:
            examples.append(decode_row(row))
        except media.MediaError as exc:
            if skipped is not None:
                skipped.append(str(exc))
            else:
                print(f"[anima] training row {row.get('id')!r} skipped: {exc}", file=sys.stderr, flush=True)
    out = {}
    for name, kind in columns.items():
        values = [e[name] for e in examples]
        if isinstance(kind, tuple):
            # Every row skipped: Arrow builds no tensor array from none, so one of a blank, cut to zero. Its
            # type is then exactly the others' (Ray Data cannot concatenate tensor types that hash apart).
            array = np.stack(values) if values else np.zeros((1, *kind), np.uint8)
            out[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(array)[: len(values)]
        else:
            out[name] = pa.array(values, kind)
    return pa.table(out)
