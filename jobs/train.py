"""`anima train METHOD --stage K`: adapter training on Ray Train, fed by a Ray Data decoding stage.

The manifest (Parquet: id, video or image, prompt, optional frame_stride) is decoded into fixed-size
clips by CPU tasks and streamed to the workers (`get_dataset_shard`). Checkpoints and the run's state
live under OUTPUT/<method>-stage<K>/; submitting the same command again resumes from the latest
checkpoint. The final adapter is exported to OUTPUT/adapter-stage<K>/, which `generate --adapter` and
the next stage's `train --adapter` take.
"""

from __future__ import annotations

import os
import shutil
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.runner import JobError, ensure_ray, read_manifest
from pipelines import media

TRAINERS = {"dynamicrafter": "actors.dynamicrafter_train:train_worker"}


@dataclass
class TrainSpec:
    method: str
    stage: int
    data: str
    output: str
    models: dict[str, str | None] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    workers: int = 1
    gpus_per_worker: float = 0.0
    max_failures: int = 2
    keep_checkpoints: int = 3
    runtime_env: dict[str, Any] | None = None  # of the training workers (env vars, pip packages)


def clip_indices(total: int, frames: int, stride: int, rng: np.random.Generator) -> tuple[list[int], int]:
    """`frames` indices `stride` apart from a random start; the stride shrinks for short videos (official)."""
    if total < frames:
        raise media.MediaError(f"video has {total} frames, {frames} needed")
    if frames > 1 and (frames - 1) * stride + 1 > total:
        stride = max(1, (total - 1) // (frames - 1))
    span = (frames - 1) * stride + 1
    start = int(rng.integers(0, total - span + 1))
    return [start + i * stride for i in range(frames)], stride


def decode_batch(batch: pa.Table, frames: int, size: tuple[int, int], stride: int, seed: int) -> pa.Table:
    """Rows -> fixed-size uint8 clips; a row that cannot be decoded is dropped with a message, not fatal."""
    rng = np.random.default_rng([seed, zlib.crc32(batch.column("id")[0].as_py().encode())])
    clips, prompts, strides = [], [], []
    for row in batch.to_pylist():
        try:
            if row.get("video"):
                video = media.read_video(row["video"], size=size)
                picked, used = clip_indices(len(video), frames, int(row.get("frame_stride") or stride), rng)
                clip = video[picked]
            else:
                clip, used = np.repeat(media.read_image(row["image"], size)[None], frames, 0), 1
        except media.MediaError as exc:
            print(f"[anima] training row {row['id']!r} skipped: {exc}", file=sys.stderr, flush=True)
            continue
        clips.append(clip)
        prompts.append(row.get("prompt") or "")
        strides.append(used)
    shape = (len(clips), frames, *size, 3)
    flat = (
        np.stack(clips).reshape(len(clips), -1) if clips else np.zeros((0, int(np.prod(shape[1:]))), np.uint8)
    )
    return pa.table(
        {
            "frames": pa.FixedShapeTensorArray.from_numpy_ndarray(flat.reshape(shape)),
            "prompt": pa.array(prompts, pa.string()),
            "frame_stride": pa.array(strides, pa.int64()),
        }
    )


def run_training(spec: TrainSpec) -> dict[str, Any]:
    """Train to `steps`, resuming from the run's latest checkpoint; return the final metrics."""
    import importlib

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.dynamicrafter.train import TrainConfig

    if spec.method not in TRAINERS:
        raise JobError(f"training {spec.method} is not implemented in this version of anima yet")
    try:
        config = TrainConfig.from_dict({**spec.params, "stage": spec.stage})
    except (TypeError, ValueError) as exc:
        raise JobError(str(exc)) from exc
    table = read_manifest(spec.data)
    media_column = "video" if "video" in table.column_names else "image"
    if (
        media_column not in table.column_names
        or "prompt" not in table.column_names
        or "id" not in table.column_names
    ):
        raise JobError(f"training manifest {spec.data} needs columns id, prompt and video or image")
    module, name = TRAINERS[spec.method].split(":")
    worker = getattr(importlib.import_module(module), name)
    ensure_ray()

    size = (config.height, config.width)
    dataset = ray.data.from_arrow(table).map_batches(
        decode_batch,
        fn_kwargs={"frames": config.frames, "size": size, "stride": config.frame_stride, "seed": config.seed},
        batch_format="pyarrow",
        batch_size=4,
    )
    run_name = f"{spec.method}-stage{spec.stage}"
    use_gpu = spec.gpus_per_worker > 0
    trainer = TorchTrainer(
        worker,
        train_loop_config={
            "params": {**spec.params, "stage": spec.stage},
            "models": spec.models,
            "output": spec.output,
            "use_gpu": use_gpu,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.workers,
            use_gpu=use_gpu,
            resources_per_worker={"GPU": spec.gpus_per_worker, "CPU": 1} if use_gpu else {"CPU": 1},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=os.path.abspath(spec.output) if "://" not in spec.output else spec.output,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            worker_runtime_env=spec.runtime_env,
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    adapter = media.join(spec.output, f"adapter-stage{spec.stage}")
    with result.checkpoint.as_directory() as directory:
        for file in ("adapter.json", "adapter.safetensors"):
            with (
                open(os.path.join(directory, file), "rb") as src,
                media.atomic_write(media.join(adapter, file)) as dst,
            ):
                shutil.copyfileobj(src, dst)
    summary = {**result.metrics, "adapter": adapter, "checkpoint": result.checkpoint.path}
    print(f"[anima] {run_name}: step {summary.get('step')}, loss {summary.get('loss'):.4f}; {adapter}")
    return summary
