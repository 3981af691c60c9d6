"""`anima train METHOD --stage K`: adapter training on Ray Train, fed by a Ray Data decoding stage.

The manifest (Parquet: id, prompt, video and/or image, method-specific columns) is decoded into
training examples by CPU tasks of the method's recipe and streamed to the workers (`get_dataset_shard`,
one dataset per data source). Checkpoints and the run's state
live under OUTPUT/<method>-stage<K>/; submitting the same command again resumes from the latest
checkpoint. The final adapter is exported to OUTPUT/adapter-stage<K>/, which `generate --adapter` and
the next stage's `train --adapter` take.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.base import INFLIGHT, this_runs_record
from actors.read_stage import ROW_COLUMN, TrainingReads, decode_examples, training_stages
from jobs import output_lease
from jobs.runner import MAX_BLOCKS, JobError, check_output_writable, ensure_ray, new_run_id, read_manifest
from pipelines import adapters, media

if TYPE_CHECKING:
    from pipelines.training import Recipe

# Seconds a row's decoding may run before its CPU worker is restarted and the row skipped: far above a
# clip's decode, which takes seconds.
ROW_TIME_LIMIT_S = 300.0
# Rows per decoding task (more where a manifest would otherwise make over MAX_BLOCKS blocks).
BLOCK_ROWS = 64


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
    # A row whose decoding kills its CPU task's process this often, or runs this many seconds, is skipped:
    # a decoder crash or a stalled read would otherwise hold the whole run. None: ROW_TIME_LIMIT_S; 0: none.
    max_row_crashes: int = 2
    row_time_limit_s: float | None = None
    runtime_env: dict[str, Any] | None = None  # of the training workers (env vars, pip packages)


def run_training(spec: TrainSpec) -> dict[str, Any]:
    """Train to `steps`, resuming from the run's latest checkpoint; return the final metrics."""
    from actors.train_worker import RECIPES, recipe_of

    if spec.method not in RECIPES:
        raise JobError(f"training {spec.method} is not implemented in this version of anima yet")
    limit = ROW_TIME_LIMIT_S if spec.row_time_limit_s is None else spec.row_time_limit_s
    if spec.max_row_crashes < 1 or not 0 <= limit < float("inf"):
        raise JobError("--max-row-crashes must be at least 1 and --row-time-limit a number of seconds >= 0")
    recipe = recipe_of(spec.method)
    try:
        config = recipe.config({**spec.params, "stage": spec.stage})
    except (TypeError, ValueError) as exc:
        raise JobError(str(exc)) from exc
    table = read_manifest(spec.data)
    if "id" not in table.column_names or "prompt" not in table.column_names:
        raise JobError(f"training manifest {spec.data} needs columns id, prompt, and video and/or image")
    if ROW_COLUMN in table.column_names:  # anima's own column: a manifest does not choose it
        table = table.drop_columns([ROW_COLUMN])
    table = table.append_column(ROW_COLUMN, pa.array(range(table.num_rows), pa.int64()))
    sources = {}
    for name, (_, kinds) in recipe.sources(config).items():
        sources[name] = _rows_with(table, kinds)
        if sources[name].num_rows == 0:
            raise JobError(f"training manifest {spec.data} has no rows with {' or '.join(kinds)} for {name}")
    check_output_writable(spec.output)
    reads = TrainingReads(spec.output, new_run_id(), spec.max_row_crashes, limit or None)
    with output_lease.held(spec.output, reads.run_id):  # one job at a time per OUTPUT
        return _train(spec, recipe, config, sources, reads)


def _train(
    spec: TrainSpec, recipe: Recipe, config: Any, sources: dict[str, pa.Table], reads: TrainingReads
) -> dict[str, Any]:
    """`run_training` once its arguments and manifest are checked, holding the output's lease."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from actors.train_worker import train_worker

    ensure_ray()
    datasets = {}
    for name, rows in sources.items():
        # Blocks of rows, each a decoding task: tasks decode in parallel, and a stop or a crash costs
        # its task's rows again, not the source's (a single table is one block, so one task per pass).
        per_block = max(BLOCK_ROWS, -(-rows.num_rows // MAX_BLOCKS))
        blocks = [rows.slice(i, per_block) for i in range(0, rows.num_rows, per_block)]
        datasets[name] = ray.data.from_arrow(blocks).map_batches(
            decode_examples,
            fn_kwargs={"decode": recipe.decode, "reads": reads, "source": name, "config": config},
            batch_format="pyarrow",
            batch_size=4,
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
    try:
        result = trainer.fit()
    finally:  # failed too: the list of skipped rows says why when every row of a source was
        skipped, listed = save_skipped(spec.output, list(datasets), run_name, reads.run_id)
        # The markers of decoding batches that held skipped rows: this run's, stale once it ended.
        for name in datasets:
            for folder in training_stages(name):
                media.remove_tree(media.join(spec.output, INFLIGHT, folder))
        fs, inflight = fsspec.core.url_to_fs(media.join(spec.output, INFLIGHT))
        with contextlib.suppress(OSError):  # the folder only when empty: a job's markers may share it
            fs.rmdir(inflight)
    adapter = media.join(spec.output, f"adapter-stage{spec.stage}")
    with result.checkpoint.as_directory() as directory:
        for file in (adapters.ADAPTER_CONFIG, adapters.ADAPTER_WEIGHTS):
            with (
                open(os.path.join(directory, file), "rb") as src,
                media.atomic_write(media.join(adapter, file)) as dst,
            ):
                shutil.copyfileobj(src, dst)
    summary = {**result.metrics, "adapter": adapter, "checkpoint": result.checkpoint.path}
    summary |= {"skipped_rows": skipped, "skipped": listed}
    print(f"[anima] {run_name}: step {summary.get('step')}, loss {summary.get('loss'):.4f}; {adapter}")
    return summary


def save_skipped(output: str, sources: list[str], run_name: str, run_id: str) -> tuple[int, str | None]:
    """List the manifest rows this run's decoding skipped, and why (OUTPUT/<run>-skipped.parquet: id,
    source, row, reason), from the records its decoding batches left; return how many and where.

    A row skipped in every pass is listed once. Records of an earlier run (its driver killed before it
    listed them) are not this run's. A run that skipped none removes an earlier run's list.
    """
    records: dict[tuple[str, str], dict[str, Any]] = {}
    for name in sources:
        fs, folder = fsspec.core.url_to_fs(media.join(output, INFLIGHT, training_stages(name)[1]))
        for path in sorted(fs.find(folder)) if fs.exists(folder) else []:
            for record in this_runs_record(fs.unstrip_protocol(path), run_id).get("rows", []):
                records[record["source"], record["row"]] = record
    listed = media.join(output, f"{run_name}-skipped.parquet")
    if not records:
        media.remove(listed)
        return 0, None
    rows = sorted(
        ({**r, "row": int(r["row"])} for r in records.values()), key=lambda r: (r["source"], r["row"])
    )
    schema = pa.schema(
        [("id", pa.string()), ("source", pa.string()), ("row", pa.int64()), ("reason", pa.string())]
    )
    with media.atomic_write(listed) as f:
        pq.write_table(pa.Table.from_pylist(rows, schema), f)
    print(f"[anima] {run_name}: {len(rows)} row(s) of the manifest were skipped; listed in {listed}")
    return len(rows), listed


def _rows_with(table: pa.Table, kinds: tuple[str, ...]) -> pa.Table:
    """The manifest rows that have a value in one of the media columns `kinds`."""
    present = [k for k in kinds if k in table.column_names]
    if not present:
        return table.slice(0, 0)
    mask = pc.is_valid(table.column(present[0]))
    for k in present[1:]:
        mask = pc.or_(mask, pc.is_valid(table.column(k)))
    return table.filter(mask)
