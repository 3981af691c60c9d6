"""The one Ray Data graph every job runs: manifest in, one result row per input row out.

    scan manifest ids + validate (driver) -> drop settled ids -> scan rows into blocks of `task_rows`
    rows in the object store -> from_arrow_refs
    [-> map_batches(decode_rows: CPU tasks read inputs, methods with `decode_stage`)]
    -> map_batches(actor pool) -> write_parquet(OUTPUT/results/) -> backfill rows lost to failed tasks
    -> summary

The driver only moves URIs and short strings; actors read inputs and write artifacts themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import datetime as dt
import gc
import glob
import importlib
import math
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray.data import ActorPoolStrategy, DataContext
from ray.data.datasource.filename_provider import FilenameProvider
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.base import INFLIGHT, JobConfig, RowActor, quiet_progress_bars
from actors.read_stage import decode_rows
from jobs import output_lease, progress, resume, summary
from pipelines import media
from pipelines.model_cache import ModelLoadError
from schemas import ERROR, RESULT_SCHEMA, ManifestError, ResultRow, result_table
from schemas.manifests import ATTEMPT_COLUMN, plain_types, validate_scan, whole_numbers

# Method name -> its actor class, as "module:Class" so only the chosen method's code is imported.
METHODS: dict[str, str] = {
    "evaluate": "actors.evaluate:EvaluateActor",
    "livesketch": "actors.livesketch:LiveSketchActor",
    "dreammotion": "actors.dreammotion:DreamMotionActor",
    "dynamicrafter": "actors.dynamicrafter:DynamiCrafterActor",
    "stylecrafter": "actors.stylecrafter:StyleCrafterActor",
}
GENERATION_METHODS = ("livesketch", "dynamicrafter", "dreammotion", "stylecrafter")
# What a generation job runs without a backbone: the released weights the method is published with
# (converted once per node). `tiny` random models are only used when asked for by name.
DEFAULT_BACKBONES = {
    "livesketch": "ali-vilab/text-to-video-ms-1.7b",
    "dynamicrafter": "Doubiiu/DynamiCrafter_512",
    "dreammotion": "cerspense/zeroscope_v2_576w",
    "stylecrafter": "VideoCrafter/Text2Video-512",
}
# The adapter a default backbone runs with, when no adapter is given either.
DEFAULT_ADAPTERS = {"stylecrafter": "liuhuohuo/StyleCrafter"}


class JobError(RuntimeError):
    """The job cannot run (bad manifest, unreadable output, unknown method or parameter)."""


@dataclass
class JobSpec:
    method: str
    manifest: str
    output: str
    models: dict[str, str | None] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    batch_size: int | None = None  # None: the method's `RowActor.default_batch_size`
    max_row_crashes: int = 2
    # Seconds a row may run in its actor before its process is restarted and the row given up (a call
    # of B rows: B times as long). None: the method's `RowActor.row_time_limit_s`; 0: no limit.
    row_time_limit_s: float | None = None
    retry_errors: bool = False
    # Seconds without progress before the job is aborted. None: an hour, or more where a row stopped at
    # its time limit could stall a one-actor pool longer (see `no_progress_timeout`).
    no_progress_timeout_s: float | None = None
    rows_per_task: int | None = None  # None: the method's choice (see `task_rows`)
    # The CPU decode stage of methods that have one: None = when the pool has accelerators to keep busy (on
    # CPU-only pools it would compete with the actors for the same cores); True/False to force it.
    decode_stage: bool | None = None
    runtime_env: dict[str, Any] | None = None
    verbose: bool = False  # Ray Data's progress blocks and the workers' tqdm bars too


def actor_class(method: str) -> type[RowActor]:
    if method not in METHODS:
        if method in GENERATION_METHODS:
            raise JobError(f"method {method!r} is not implemented in this version of anima yet")
        raise JobError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    module, name = METHODS[method].split(":")
    return getattr(importlib.import_module(module), name)


def ensure_ray() -> None:
    """Join the cluster a `ray job submit` runs in (RAY_ADDRESS), else start Ray on this machine."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)


def open_manifest(uri: str) -> ds.FileSystemDataset:
    """The manifest as an Arrow dataset, which the driver scans a batch at a time and never holds whole.

    A file, a folder of Parquet files or a glob (`s3://bucket/manifests/part-*.parquet`). Validation and
    resume need every id before any actor starts: pyarrow scans a million rows in seconds where a
    `ray.data.read_parquet` round trip costs task start-ups, and cutting the rows into blocks on the
    driver keeps what a failed task costs independent of how the manifest's files are cut.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    files = sorted(fs.glob(path)) if glob.has_magic(path) else [path]
    if not files or not all(fs.exists(f) for f in files):
        raise JobError(f"manifest {uri} does not exist")
    if len(files) == 1 and fs.isdir(files[0]):
        files = sorted(f for f in fs.find(files[0]) if f.endswith(".parquet"))
        if not files:
            raise JobError(f"manifest folder {uri} holds no .parquet files")
    filesystem, parquet = PyFileSystem(FSSpecHandler(fs)), ds.ParquetFileFormat()
    fragments = [parquet.make_fragment(f, filesystem) for f in files]  # opens nothing yet
    return ds.FileSystemDataset(fragments, _common_schema(fragments, uri), parquet, filesystem)


def as_kind(manifest: ds.FileSystemDataset, kind: str) -> ds.FileSystemDataset:
    """A validated manifest, scanned with the integer columns that pandas wrote as floats (for a missing
    value) as the whole numbers validation found them to be (`whole_numbers`)."""
    schema = whole_numbers(manifest.schema, kind)
    return ds.FileSystemDataset(list(manifest.get_fragments()), schema, manifest.format, manifest.filesystem)


def _common_schema(fragments: list[ds.Fragment], uri: str) -> pa.Schema:
    """One schema for every file of the manifest (in `plain_types`), promoted where types differ: pandas
    writes a column that is all null in one part as type null, another writer int32 where the rest are
    int64. A dataset takes the first file's schema, so the other files would then fail to cast, or lose
    the columns the first file lacks (a per-row `seed` in later parts, silently ignored).

    Every file's footer is read, `media.PARALLEL_READS` at a time: one at a time, a thousand files on an
    object store would take a minute or two."""

    def footer(fragment: ds.Fragment) -> pa.Schema:
        try:
            return plain_types(fragment.physical_schema)
        except (pa.ArrowException, OSError) as exc:
            raise JobError(f"cannot read manifest {uri}: file {fragment.path}: {exc}") from exc

    with ThreadPoolExecutor(max_workers=media.PARALLEL_READS) as pool:
        schemas = list(pool.map(footer, fragments))
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except pa.ArrowException as exc:
        raise JobError(f"cannot read manifest {uri}: {_conflict(fragments, schemas) or exc}") from exc


def _conflict(fragments: list[ds.Fragment], schemas: list[pa.Schema]) -> str | None:
    """The first column whose type in a file cannot be merged with its type in the files before, naming
    both files (the odd one may be either)."""
    seen: dict[str, tuple[pa.Field, str]] = {}
    for fragment, schema in zip(fragments, schemas, strict=True):
        for column in schema:
            if column.name not in seen:
                seen[column.name] = column, fragment.path
                continue
            earlier, where = seen[column.name]
            try:
                merged = pa.unify_schemas(
                    [pa.schema([earlier]), pa.schema([column])], promote_options="permissive"
                )
            except pa.ArrowException:
                return (
                    f"column {column.name!r} is {column.type} in file {fragment.path} but {earlier.type} "
                    f"in file {where}"
                )
            seen[column.name] = merged.field(column.name), where
    return None


def read_manifest(uri: str, columns: Iterable[str] | None = None, ids: pa.Array | None = None) -> pa.Table:
    """The manifest as one table, for what reads its rows anyway (training's sources, the report's shown
    rows): of `columns`, those it has (None: all), and only the rows of `ids` (None: all), kept a batch
    at a time (a filter pushed into the scan fails on files that wrote their ids as string views)."""
    manifest = open_manifest(uri)
    names = None if columns is None else [c for c in columns if c in manifest.schema.names]
    if ids is None:
        with _reading(uri):
            return manifest.to_table(columns=names)
    batches = [
        batch.filter(pc.is_in(batch.column("id"), value_set=ids)) for batch in _scan(manifest, uri, names)
    ]
    schema = manifest.schema if names is None else pa.schema([manifest.schema.field(n) for n in names])
    return pa.Table.from_batches(batches, schema)


@contextlib.contextmanager
def _reading(uri: str) -> Iterator[None]:
    """A manifest that cannot be scanned (a corrupt file, files whose schemas disagree) is a JobError."""
    try:
        yield
    except (pa.ArrowException, OSError) as exc:
        raise JobError(f"cannot read manifest {uri} as Parquet: {exc}") from exc


def _scan(manifest: ds.Dataset, uri: str, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The manifest's batches in order, read one at a time (pyarrow reads 16 batches and 4 files ahead by
    default: at a million rows, most of the manifest); still a Parquet row group at a time, so manifests
    written with row groups of 10^5 rows or fewer keep the driver's share small."""
    with _reading(uri):
        yield from manifest.to_batches(columns=columns, batch_readahead=0, fragment_readahead=1)


def manifest_ids(manifest: ds.FileSystemDataset, kind: str, uri: str) -> pa.ChunkedArray:
    """The manifest's ids, once it is valid (ManifestError naming every problem if not): only its id and
    required columns are read, a batch at a time."""
    with _reading(uri):
        rows = manifest.count_rows()
    problems, ids = validate_scan(
        manifest.schema, rows, lambda columns: _as_written(manifest, uri, columns), kind
    )
    if problems:
        raise ManifestError(uri, problems)
    assert ids is not None  # a manifest without usable ids has problems
    return ids


def _as_written(manifest: ds.FileSystemDataset, uri: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """`_scan` file by file, where a column that the manifest's schema holds as floats (another file
    wrote floats) is read as the integers a file wrote: validation checks that the floats are whole, and
    a 64-bit integer past 2^53 (a random seed) fits no float."""
    for fragment in manifest.get_fragments():
        own = plain_types(fragment.physical_schema)  # read when the manifest was opened
        schema = pa.schema([_written_as(own, f) for f in manifest.schema])
        yield from _scan(
            ds.FileSystemDataset([fragment], schema, manifest.format, manifest.filesystem), uri, columns
        )


def _written_as(own: pa.Schema, field: pa.Field) -> pa.Field:
    """`field` as a file whose schema is `own` wrote it, where the file has integers and `field` floats."""
    ints = field.name in own.names and pa.types.is_integer(own.field(field.name).type)
    return own.field(field.name) if ints and pa.types.is_floating(field.type) else field


def check_output_writable(output: str) -> None:
    probe = media.join(output, f".write-probe-{uuid.uuid4().hex}")
    try:
        media.write_text("ok", probe)
        media.remove(probe)
    except Exception as exc:
        raise JobError(f"cannot write to output {output}: {exc}") from exc


@ray.remote(num_cpus=0, max_retries=1)
def _prepare_node(config: JobConfig) -> dict[str, Any]:
    quiet_progress_bars(config)
    actor = actor_class(config.method)
    actor.prepare(config)
    return actor.decode_settings(config)


def prepare_on_nodes(config: JobConfig, spec: JobSpec) -> dict[str, Any]:
    """Fetch weights once on every node that can host an actor, before the pool starts; return what the
    decode stage needs of them (`RowActor.decode_settings`, the same on every node).

    Nodes that join later (autoscaling) prepare lazily: actors build or download under a file lock. A
    node that leaves meanwhile (preempted) is left out: it will host no actor.
    A job that names no model (evaluate with `--clip none` and no other metric model) has nothing to
    fetch or check, and skips the tasks' start-up.
    """
    if not any(config.models.values()):
        return {}
    nodes = [
        n["NodeID"]
        for n in ray.nodes()
        if n["Alive"]
        and n["Resources"].get("GPU", 0) >= spec.gpus_per_actor
        and n["Resources"].get("CPU", 0) >= spec.cpus_per_actor
    ]
    refs = [
        _prepare_node.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            runtime_env=spec.runtime_env,
        ).remote(config)
        for node in nodes
    ]
    settings = []
    for node, ref in zip(nodes, refs, strict=True):
        try:
            settings.append(ray.get(ref))
        except ray.exceptions.TaskUnschedulableError:
            # Pinned to a node that is gone or draining (preempted, scaled down), which Ray still lists
            # as alive while it drains: it will host no actor. A task that asks for no resources cannot
            # be infeasible on a node that takes work.
            print(f"[anima] node {node} left the cluster while it prepared models; going on without it")
        except ray.exceptions.RayTaskError as exc:
            raise ModelLoadError(f"preparing models failed: {exc.cause or exc}") from exc
    if nodes and not settings:
        raise ModelLoadError("every node that could host an actor left the cluster while preparing models")
    if any(other != settings[0] for other in settings):
        raise ModelLoadError(f"nodes prepared the same models differently (their caches differ): {settings}")
    return settings[0] if settings else {}


def pending_rows(rows: pa.Table, settled: pa.Array, attempts: pa.Table) -> pa.Table:
    """`rows` without the `settled` ids, each with the attempt number this run will be (`attempts`: the
    runs that gave each id a row so far, `resume.settled_and_attempts`).

    Column-wise (Arrow compute), so a million settled ids resolve in seconds, in manifest order.
    """
    todo = rows.filter(pc.invert(pc.is_in(rows.column("id"), value_set=settled))) if len(settled) else rows
    where = pc.index_in(todo.column("id"), value_set=attempts.column("id"))
    earlier = pc.fill_null(pc.take(attempts.column("attempts"), where), 0)
    numbers = pc.add(earlier.cast(pa.int64()), 1)
    return todo.append_column(ATTEMPT_COLUMN, numbers)


def put_blocks(
    manifest: ds.Dataset, ids: pa.ChunkedArray, todo: pa.Table, rows: int, uri: str
) -> list[ray.ObjectRef]:
    """The manifest's rows whose ids `todo` holds (in manifest order, with their attempt numbers:
    `pending_rows` of `ids`), in blocks of `rows` rows, each put in the object store as soon as it is
    full: the driver holds a block and a scanned batch at a time, not the manifest's rows.

    A manifest whose ids differ from the validated `ids` (rewritten since) is a JobError: its rows were
    not checked, and the run's count of rows would be wrong.
    """
    run = pc.is_in(ids, value_set=todo.column("id"))  # once: each batch takes its slice
    refs: list[ray.ObjectRef] = []
    held: list[pa.Table] = []
    first = taken = count = 0
    changed = JobError(f"manifest {uri} changed while the job started; submit the job again")
    for batch in _scan(manifest, uri):
        if not batch.column("id").equals(ids.slice(first, batch.num_rows).combine_chunks()):
            raise changed
        chosen = pa.Table.from_batches([batch]).filter(run.slice(first, batch.num_rows))
        first += batch.num_rows
        if not chosen.num_rows:
            continue
        held.append(
            chosen.append_column(ATTEMPT_COLUMN, todo.column(ATTEMPT_COLUMN).slice(taken, chosen.num_rows))
        )
        taken += chosen.num_rows
        count += chosen.num_rows
        if count < rows:
            continue
        table, full = pa.concat_tables(held), count // rows * rows
        refs += [ray.put(table.slice(start, rows)) for start in range(0, full, rows)]
        held, count = [table.slice(full)], count - full
    if first != len(ids):
        raise changed
    if count:
        refs.append(ray.put(pa.concat_tables(held)))
    return refs


def with_default_models(spec: JobSpec) -> JobSpec:
    """`spec` with the method's released backbone (and adapter) where it names none, for the CLI and the
    Python API alike."""
    if spec.method not in DEFAULT_BACKBONES or spec.models.get("backbone"):
        return spec
    models = {**spec.models, "backbone": DEFAULT_BACKBONES[spec.method]}
    if not models.get("adapter") and spec.method in DEFAULT_ADAPTERS:
        models["adapter"] = DEFAULT_ADAPTERS[spec.method]
    return dataclasses.replace(spec, models=models)


def new_run_id() -> str:
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def run_job(spec: JobSpec) -> dict[str, Any]:
    """Run `spec` to completion and return its summary (also printed and saved as OUTPUT/summary.json)."""
    actor = actor_class(spec.method)
    spec = with_default_models(spec)
    unknown = sorted(set(spec.params) - set(actor.defaults))
    if unknown:
        known = ", ".join(sorted(actor.defaults))
        raise JobError(f"unknown parameter(s) {', '.join(unknown)} for {spec.method}; known: {known}")
    counts = {
        "--batch-size": spec.batch_size or 1,
        "--actors": spec.actors,
        "--max-row-crashes": spec.max_row_crashes,
    }
    for option, value in counts.items():
        if value < 1:
            raise JobError(f"{option} must be at least 1, got {value}")
    limit = actor.row_time_limit_s if spec.row_time_limit_s is None else spec.row_time_limit_s
    if not 0 <= limit < math.inf:
        raise JobError(f"--row-time-limit must be a number of seconds >= 0 (0: no limit), got {limit}")
    started = time.time()
    manifest = open_manifest(spec.manifest)
    ids = pa.table({"id": manifest_ids(manifest, actor.kind, spec.manifest)})
    manifest = as_kind(manifest, actor.kind)
    check_output_writable(spec.output)
    run_id = new_run_id()
    with output_lease.held(spec.output, run_id):
        return _run(spec, actor, manifest, ids, limit, run_id, started)


def _run(
    spec: JobSpec,
    actor: type[RowActor],
    manifest: ds.FileSystemDataset,
    ids: pa.Table,
    limit: float,
    run_id: str,
    started: float,
) -> dict[str, Any]:
    """`run_job` once its arguments and manifest are checked, holding the output's lease."""
    results_uri = media.join(spec.output, "results")
    others = resume.other_methods(results_uri, spec.method)
    if others:
        raise JobError(
            f"output {spec.output} holds result rows of {', '.join(others)}, not {spec.method}: a rerun "
            "resumes by id, so they would count as this job's rows; give this job its own --output"
        )
    settled, attempts, settled_by = resume.settled_and_attempts(results_uri, spec.retry_errors, ids["id"])
    todo = pending_rows(ids, settled, attempts)
    skipped = ids.num_rows - todo.num_rows  # todo: the ids to run, and their attempt numbers
    asked = summary.settings(spec)
    kept = resume.runs_with_other_settings(spec.output, settled_by, asked)
    if spec.batch_size is None:  # the method's batch, smaller when a few rows would leave actors idle
        spec = dataclasses.replace(
            spec, batch_size=min(actor.default_batch_size, _share(spec, todo.num_rows))
        )
    config = JobConfig(
        method=spec.method,
        output=spec.output,
        run_id=run_id,
        models=spec.models,
        params=spec.params,
        max_row_crashes=spec.max_row_crashes,
        row_time_limit_s=limit or None,
        verbose=spec.verbose,
    )
    print(f"[anima] run {run_id}: {ids.num_rows} rows, {skipped} settled earlier, {todo.num_rows} to run")
    for run in kept:
        print(
            f"[anima] warning: {run['rows']} settled row(s) of this output come from run {run['run_id']}, "
            f"which had other settings (models {run['models']}, params {run['params']}; this job: "
            f"{asked}). A rerun resumes by id, so they are kept, not redone; give this "
            "job its own --output to redo them"
        )
    summary.record_start(spec, run_id)

    if todo.num_rows:
        ensure_ray()  # only now: a job refused above never starts or joins a cluster
        rows = task_rows(spec, actor, todo.num_rows)
        # Before any model is fetched: this scan reads the manifest's other columns for the first time.
        blocks = put_blocks(manifest, ids.column("id"), todo, rows, spec.manifest)
        config.decode = prepare_on_nodes(config, spec)
        progress.quiet_ray_data(spec.verbose)
        ctx = DataContext.get_current()
        ctx.max_errored_blocks = -1  # a failed task's rows are backfilled as error rows below
        ctx.execution_no_progress_timeout_s = no_progress_timeout(spec, limit)
        results_fs, results_path = fsspec.core.url_to_fs(results_uri)
        # from_arrow_refs runs a small Ray task per block for its metadata. Computing it here instead
        # (from_blocks) was measured slower: 12.5-14.4 s against 9.6-11.2 s at 10^4 missing-file rows, as
        # the writers' first tasks then find no warm worker and start more processes.
        data = ray.data.from_arrow_refs(blocks)
        staged = spec.gpus_per_actor > 0 if spec.decode_stage is None else spec.decode_stage
        if actor.decode_stage and staged:
            # Reading and decoding inputs on CPU tasks, ahead of the pool, keeps its accelerators busy.
            data = data.map_batches(
                decode_rows,
                fn_kwargs={"actor": actor, "config": config},
                batch_size=spec.batch_size,
                batch_format="pyarrow",
                num_cpus=1,
                runtime_env=spec.runtime_env,
            )
        # One call in flight per actor: with two queued, the 2,000-row evaluate bench took 64 s, not 51.
        results = data.map_batches(
            actor,
            fn_constructor_kwargs={"config": config},
            compute=ActorPoolStrategy(size=spec.actors, max_tasks_in_flight_per_actor=1),
            num_gpus=spec.gpus_per_actor,
            num_cpus=spec.cpus_per_actor,
            batch_size=spec.batch_size,
            batch_format="pyarrow",
            runtime_env=spec.runtime_env,
        )
        with progress.Progress(todo.num_rows, spec.actors * spec.gpus_per_actor) as line:
            line.tap(results, writer_args(spec)).write_parquet(
                results_path,
                # Through fsspec like every other read and write, so s3fs/gcsfs settings apply here too.
                filesystem=PyFileSystem(FSSpecHandler(results_fs)),
                # Files named after the run, so a run's own rows can be told from all runs' files.
                filename_provider=FilenameProvider(dataset_uuid=run_id, file_format="parquet"),
                # About a file per task, not per batch; the run's files are compacted when it ends.
                min_rows_per_file=rows,
                ray_remote_args=writer_args(spec),
            )
        del line  # the set of every finished id it counted: 100 MB at 10^6 rows, needed no more
        release_memory()
        backfill_lost(todo, results_uri, config)
        release_memory()
        resume.compact(results_uri, run_id)
        release_memory()
        # Markers of batches whose process died: stale once the run has given every row a result.
        media.remove_tree(media.join(spec.output, INFLIGHT))
    # Also when nothing was left to run: a run killed in its own compaction had written every row.
    stopped = resume.compact_stopped_runs(results_uri, run_id)
    if stopped:
        print(f"[anima] compacted the result files of {stopped} earlier run(s) stopped before their end")
        release_memory()

    report = summary.build(ids, spec, run_id, skipped, todo.num_rows, time.time() - started, kept)
    summary.save(report, spec.output)
    return report


def no_progress_timeout(spec: JobSpec, row_time_limit: float) -> float:
    """Seconds without progress before Ray Data aborts the job: the job's, or an hour, raised to outlast
    what a row that runs past its time limit costs a one-actor pool before it is given up (its call,
    the row alone after the split, and the actor's restarts), so that the row is given up, not the job."""
    needed = (spec.batch_size + 1) * row_time_limit + 600 if row_time_limit else 0.0
    if spec.no_progress_timeout_s is None:
        return max(3600.0, needed)
    if spec.no_progress_timeout_s < needed:
        print(
            f"[anima] warning: --no-progress-timeout {spec.no_progress_timeout_s:g} s is below the "
            f"{needed:g} s a row stopped at --row-time-limit can take to give up; on a small pool the "
            "whole job may be aborted first"
        )
    return spec.no_progress_timeout_s


def writer_args(spec: JobSpec) -> dict[str, Any]:
    """Ray remote args of the result writer and of the progress tap before it, which Ray Data fuses into
    one task per block only when the two are equal: map_batches drops None values and Write keeps them,
    so there are none. Writing a few rows needs no reserved CPU: actors may hold all of them."""
    return {"num_cpus": 0} | ({"runtime_env": spec.runtime_env} if spec.runtime_env else {})


# glibc's malloc_trim, absent elsewhere (macOS, musl, Windows): then only Arrow's pool is released.
_LIBC = ctypes.util.find_library("c")
_MALLOC_TRIM = getattr(ctypes.CDLL(_LIBC), "malloc_trim", None) if _LIBC else None


def release_memory() -> None:
    """Hand the memory freed by the driver's phases back to the system between them: Arrow's allocator
    and C's malloc (Python objects, Arrow's I/O threads) keep freed pages, and a million-row job's phases
    would otherwise pile up (measured: 300 MB per phase from Arrow; at 2*10^5 rows malloc's pages took
    the peak from 518 MB to 593 MB)."""
    pa.default_memory_pool().release_unused()
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# Above this many blocks Ray Data's start-up grows with the count (1e5 blocks took minutes and GBs).
MAX_BLOCKS = 2_000


def _share(spec: JobSpec, rows: int) -> int:
    """Rows that give every actor four pieces of work (at least 1)."""
    return max(1, -(-rows // (4 * spec.actors)))


def task_rows(spec: JobSpec, actor: type[RowActor], rows: int) -> int:
    """Rows per Ray task (one block): what a failed task can lose, and the unit of load balancing.

    At least a batch, the method's preference (`RowActor.rows_per_task`: one batch for minutes-long
    generation rows, hundreds for evaluation) but no more than gives every actor four tasks, and
    enough that the job has at most MAX_BLOCKS blocks, so that start-up does not depend on the batch
    size.
    """
    wanted = spec.rows_per_task or min(actor.rows_per_task, _share(spec, rows))
    fewest = -(-rows // MAX_BLOCKS)
    per_task = max(wanted, fewest, spec.batch_size)
    return -(-per_task // spec.batch_size) * spec.batch_size  # whole batches


# Lost rows are recorded this many at a time (`backfill_lost`).
LOST_ROWS_PER_WRITE = 50_000


def backfill_lost(todo: pa.Table, results_uri: str, config: JobConfig) -> None:
    """Give every row this run should have processed a result row, even if its task failed for good."""
    written = resume.read_results(results_uri, ["id"], prefix=config.run_id)
    seen = written.column("id") if written is not None else pa.array([], pa.string())
    lost = todo.filter(pc.invert(pc.is_in(todo.column("id"), value_set=seen)))
    if not lost.num_rows:
        return
    print(f"[anima] {lost.num_rows} row(s) lost by failed tasks; recording them as errors")
    uri = media.join(results_uri, f"{config.run_id}_lost.parquet")
    with media.atomic_write(uri) as f, pq.ParquetWriter(f, RESULT_SCHEMA) as writer:
        # A slice at a time: when a whole pool failed, a million rows are lost, and their row objects
        # would take gigabytes of the driver at once.
        for part in lost.to_batches(max_chunksize=LOST_ROWS_PER_WRITE):
            ids, attempts = part.column("id").to_pylist(), part.column(ATTEMPT_COLUMN).to_pylist()
            rows = [
                ResultRow(
                    id=row_id,
                    method=config.method,
                    status=ERROR,
                    retryable=True,
                    error=f"row {row_id!r}: no result came back from the Ray task that ran it (it failed "
                    "beyond Ray's retries; see the Ray logs); rerun the job to retry it",
                    attempt=attempt,
                    run_id=config.run_id,
                )
                for row_id, attempt in zip(ids, attempts, strict=True)
            ]
            writer.write_table(result_table(rows))
