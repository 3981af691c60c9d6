"""`anima train METHOD --stage K`: adapter training on Ray Train, fed by a Ray Data decoding stage.

The manifest (Parquet: id, prompt, video and/or image, method-specific columns) is decoded into
training examples by CPU tasks of the method's recipe and streamed to the workers (`get_dataset_shard`,
one dataset per data source). Checkpoints and the run's state
live under OUTPUT/<method>-stage<K>/; submitting the same command again resumes from the latest
checkpoint. The final adapter is exported to OUTPUT/adapter-stage<K>/, which `generate --adapter` and
the next stage's `train --adapter` take.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from jobs.runner import JobError, ensure_ray, read_manifest
from pipelines import adapters, media


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


def run_training(spec: TrainSpec) -> dict[str, Any]:
    """Train to `steps`, resuming from the run's latest checkpoint; return the final metrics."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from actors.train_worker import RECIPES, recipe_of, train_worker

    if spec.method not in RECIPES:
        raise JobError(f"training {spec.method} is not implemented in this version of anima yet")
    recipe = recipe_of(spec.method)
    try:
        config = recipe.config({**spec.params, "stage": spec.stage})
    except (TypeError, ValueError) as exc:
        raise JobError(str(exc)) from exc
    table = read_manifest(spec.data)
    if "id" not in table.column_names or "prompt" not in table.column_names:
        raise JobError(f"training manifest {spec.data} needs columns id, prompt, and video and/or image")
    ensure_ray()
    datasets = {}
    for name, (_, kinds) in recipe.sources(config).items():
        rows = _rows_with(table, kinds)
        if rows.num_rows == 0:
            raise JobError(f"training manifest {spec.data} has no rows with {' or '.join(kinds)} for {name}")
        datasets[name] = ray.data.from_arrow(rows).map_batches(
            recipe.decode, fn_kwargs={"config": config, "source": name}, batch_format="pyarrow", batch_size=4
        )
    run_name = f"{spec.method}-stage{spec.stage}"
    use_gpu = spec.gpus_per_worker > 0
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "method": spec.method,
            "params": {**spec.params, "stage": spec.stage},
            "models": spec.models,
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
        datasets=datasets,
    )
    result = trainer.fit()
    adapter = media.join(spec.output, f"adapter-stage{spec.stage}")
    with result.checkpoint.as_directory() as directory:
        for file in (adapters.ADAPTER_CONFIG, adapters.ADAPTER_WEIGHTS):
            with (
                open(os.path.join(directory, file), "rb") as src,
                media.atomic_write(media.join(adapter, file)) as dst,
            ):
                shutil.copyfileobj(src, dst)
    summary = {**result.metrics, "adapter": adapter, "checkpoint": result.checkpoint.path}
    print(f"[anima] {run_name}: step {summary.get('step')}, loss {summary.get('loss'):.4f}; {adapter}")
    return summary


def _rows_with(table: pa.Table, kinds: tuple[str, ...]) -> pa.Table:
    """The manifest rows that have a value in one of the media columns `kinds`."""
    present = [k for k in kinds if k in table.column_names]
    if not present:
        return table.slice(0, 0)
    mask = pc.is_valid(table.column(present[0]))
    for k in present[1:]:
        mask = pc.or_(mask, pc.is_valid(table.column(k)))
    return table.filter(mask)
