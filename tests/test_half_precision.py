"""The precision every GPU job runs by default (bf16; fp16 for LiveSketch, as its official code), on CPU.

Every other test runs fp32, the CPU default, so without this the path every GPU job takes (weights in
half precision, schedules and noise in fp32, casts where the two meet) would first run on a GPU. Each
method's tiny preset makes the first demo row twice, in fp32 and in its GPU precision: both rows are
ok, the backbone really holds half-precision weights, and the two videos are the same up to rounding.

Measured mean differences, of 255: LiveSketch fp16 0.7 against a spread (std) of 50; bf16 (3 fewer
mantissa bits) 3.5-4.7 against about 40. A dtype slip that changed the noise, a schedule or a
condition gives another video: another seed differs by 12.5 for LiveSketch (its strokes move little in
two steps) and by 36-39 for the others, beyond both tolerances.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.base import JobConfig
from jobs.demo import GENERATION_JOBS
from jobs.runner import actor_class
from pipelines import media

GPU_PRECISION = {"livesketch": "fp16", "dreammotion": "bf16", "dynamicrafter": "bf16", "stylecrafter": "bf16"}
SMALL = {
    "livesketch": {"steps": 2, "num_frames": 4, "height": 32, "width": 32, "dim": 32, "video_size": 64},
    "dreammotion": {"steps": 2, "num_frames": 4, "height": 32, "width": 48},
    "dynamicrafter": {"steps": 2, "num_frames": 4, "height": 32, "width": 32},
    "stylecrafter": {"steps": 2, "num_frames": 4, "height": 32, "width": 32, "style_size": 64},
}
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {"fp16": 1 / 20, "bf16": 1 / 4}  # of the fp32 video's spread


def _video(job, precision: str, output) -> tuple[np.ndarray, torch.dtype]:
    params = {**job.params, **SMALL[job.method], "precision": precision}
    config = JobConfig(job.method, str(output), "half", models={"backbone": "tiny"}, params=params)
    actor = actor_class(job.method)(config)
    row = job.manifest().to_pylist()[0]
    [result] = actor.process_rows([row], [actor.effective_params(row)])
    assert result.error is None, result.error
    backbone = actor.model.backbone if hasattr(actor, "model") else actor.backbone
    return media.read_video(result.outputs["mp4"]).astype(np.float64), backbone.dtype


@pytest.mark.parametrize("job", GENERATION_JOBS, ids=lambda job: job.method)
def test_the_gpu_precision_makes_the_fp32_video_up_to_rounding(job, tmp_path):
    precision = GPU_PRECISION[job.method]
    reference, full = _video(job, "fp32", tmp_path / "fp32")
    half, dtype = _video(job, precision, tmp_path / "half")
    assert full == torch.float32 and dtype == HALF[precision]
    assert half.shape == reference.shape
    difference = float(np.abs(half - reference).mean())
    assert difference < TOLERANCE[precision] * reference.std(), (difference, reference.std())
