"""What earlier runs already did: the latest result row of every id under OUTPUT/results/.

A rerun skips ids whose latest row is ok and retries the rest, so a preempted or killed job is
resumed by submitting it again with the same output. Rows that failed on their own input (missing or
corrupt file, empty prompt) would fail again the same way, so they are retried only when asked.

Everything here works column-wise with Arrow compute over only the columns it needs (a million result
rows resolve in seconds), and every run ends by compacting its own result files (`compact`), so that
an output holds O(rows / 10⁴) files whatever its batch size.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import PurePosixPath
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipelines import media
from schemas import OK, RESULT_SCHEMA

HISTORY_COLUMNS = ["id", "status", "retryable", "finished_at", "run_id"]
# A run's result files are rewritten into files of this many rows when it ends.
ROWS_PER_FILE = 50_000
COMPACTED = "part"
RUNS = "runs"  # OUTPUT/runs/<run id>.json: each run's record


def result_files(results_uri: str, prefix: str = "") -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, root = fsspec.core.url_to_fs(results_uri)
    fs.invalidate_cache(root)  # object stores' listings are cached per process; other processes wrote here
    if not fs.exists(root):
        return fs, []
    files = sorted(
        p for p in fs.find(root) if p.endswith(".parquet") and p.rsplit("/", 1)[-1].startswith(prefix)
    )
    return fs, files


# Times a read lists the result files again when one it listed is gone: another process compacting
# that run removed it, after writing the files that hold its rows, so a new listing finds them all.
LISTINGS = 3


def read_results(
    results_uri: str, columns: list[str] | None = None, prefix: str = "", where: pc.Expression | None = None
) -> pa.Table | None:
    """Result rows under `results_uri` (files named `prefix*`), only `columns`, only rows `where` holds
    (pushed into the scan); None when there are none.

    One dataset scan over all files. A file that cannot be read (a writer killed mid-file) is left out
    with a warning: its rows simply count as not done and are redone. A file removed by a compaction
    while it is read is read again from a new listing (`LISTINGS`).
    """
    for listing in range(LISTINGS):
        try:
            dataset = _dataset(*result_files(results_uri, prefix))
            return dataset.to_table(columns=columns, filter=where) if dataset is not None else None
        except FileNotFoundError:
            if listing + 1 == LISTINGS:
                raise
    raise AssertionError("unreachable")


def scan_results(
    results_uri: str, columns: list[str], prefix: str = "", where: pc.Expression | None = None
) -> Iterator[pa.RecordBatch]:
    """`read_results` one record batch at a time, for work whose memory must not grow with the rows. A
    file removed by a compaction is read from a new listing only before the first batch is given: after
    it, the error is raised, since the batches given would come again."""
    for listing in range(LISTINGS):
        given = False
        try:
            dataset = _dataset(*result_files(results_uri, prefix))
            for batch in dataset.to_batches(columns=columns, filter=where) if dataset is not None else ():
                given = True
                yield batch
            return
        except FileNotFoundError:
            if given or listing + 1 == LISTINGS:
                raise


def _dataset(fs: fsspec.AbstractFileSystem, files: list[str]) -> ds.Dataset | None:
    """The readable result files as one dataset; a file that cannot be read is named and left out."""
    if not files:
        return None
    filesystem = PyFileSystem(FSSpecHandler(fs))
    dataset = ds.dataset(files, schema=RESULT_SCHEMA, format="parquet", filesystem=filesystem,
                         exclude_invalid_files=True)  # fmt: skip
    unreadable = sorted(set(files) - set(dataset.files))
    for path in unreadable:
        print(f"[anima] skipping unreadable result file {path}", file=sys.stderr)
    return dataset if dataset.files else None


def latest(results: pa.Table) -> pa.Table:
    """One row per id: the one that finished last, with `attempts` = how many runs gave the id a row.

    A run gives each id one row; a row seen twice (a compaction interrupted before it removed the files
    it merged) counts once.
    """
    # Sorted by id, finish time and run: each id's last row is its latest, and the rows of one (id, run)
    # pair are adjacent (a row seen twice is an exact copy). Sorted indices, not a sorted copy, and no
    # hash grouping over a million string keys: the driver's peak memory at a million rows.
    keys = [("id", "ascending"), ("finished_at", "ascending"), ("run_id", "ascending")]
    order = pc.sort_indices(results.select([key for key, _ in keys]), keys)
    ids = pc.take(results.column("id"), order).combine_chunks()
    runs = pc.fill_null(pc.take(results.column("run_id"), order).combine_chunks(), "")
    first_of_id = _changes(ids)
    first_of_pair = np.logical_or(first_of_id, _changes(runs))
    starts = np.flatnonzero(first_of_id)
    last_of_id = np.roll(first_of_id, -1)  # the next row starts another id (or there is none)
    attempts = np.add.reduceat(first_of_pair.astype(np.int64), starts) if len(starts) else []
    return results.take(order.filter(pa.array(last_of_id))).append_column(
        "attempts", pa.array(attempts, pa.int64())
    )


def _changes(values: pa.Array) -> np.ndarray:
    """True where a value differs from the one before it (and at the first)."""
    changed = pc.not_equal(values[1:], values[:-1]).to_numpy(zero_copy_only=False)
    return np.concatenate([[True], changed]) if len(values) else np.zeros(0, bool)


def settled_and_attempts(
    results_uri: str, retry_errors: bool = False, ids: pa.Array | pa.ChunkedArray | None = None
) -> tuple[pa.Array, pa.Table, dict[str, int]]:
    """Ids a rerun skips (latest row ok, or failed on bad input unless `retry_errors`); a table of
    (id, attempts): how many runs gave every id seen so far a row; and the runs whose rows settled those
    ids (run id -> rows), of `ids` only when given (the manifest's: an output may hold other ids)."""
    results = read_results(results_uri, HISTORY_COLUMNS)
    if results is None or results.num_rows == 0:
        empty = pa.table({"id": pa.array([], pa.string()), "attempts": pa.array([], pa.int64())})
        return pa.array([], pa.string()), empty, {}
    last = latest(results)
    ok = pc.equal(last.column("status"), OK)
    # As before this module went column-wise: an error row without `retryable` counts as bad input.
    keep_failed = pc.invert(pc.fill_null(last.column("retryable"), False)) if not retry_errors else None
    settled = ok if keep_failed is None else pc.or_(ok, keep_failed)
    kept = settled if ids is None else pc.and_(settled, pc.is_in(last.column("id"), value_set=ids))
    runs = pc.value_counts(pc.fill_null(last.column("run_id").filter(kept), "")).to_pylist()
    return (
        last.column("id").filter(settled).combine_chunks(),
        last.select(["id", "attempts"]),
        {run["values"]: run["counts"] for run in runs},
    )


def run_record_uri(output: str, run_id: str) -> str:
    """OUTPUT/runs/<run id>.json: what a run was asked (written as it starts), then its summary."""
    return media.join(output, RUNS, f"{run_id}.json")


def run_records(output: str, run_ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """The records of `run_ids` (default: every run that has one), in run id order, which is start order;
    read `media.PARALLEL_READS` at a time, since an output on object storage may hold thousands. A record
    that cannot be read, or holds no JSON object, is {}."""
    if run_ids is None:
        fs, root = fsspec.core.url_to_fs(media.join(output, RUNS))
        fs.invalidate_cache(root)  # listings are cached per process; other processes wrote here
        run_ids = [PurePosixPath(p).stem for p in fs.glob(f"{root}/*.json")] if fs.exists(root) else []
    named = sorted(run_ids)
    with ThreadPoolExecutor(max_workers=media.PARALLEL_READS) as pool:
        return dict(zip(named, pool.map(lambda run_id: _run_record(output, run_id), named), strict=True))


def runs_with_other_settings(output: str, runs: dict[str, int], settings: dict[str, Any]) -> list[dict]:
    """Of `runs` (run id -> settled rows, `settled_and_attempts`), those whose record says they ran with
    other `settings` (models, job parameters) than this job's: a rerun resumes by id, so it keeps their
    rows and does not redo them. Each: run_id, rows, and that run's settings. A run without a record
    (from before anima kept them) is left out."""
    mine = _comparable(settings)
    other = []
    for run_id, record in run_records(output, (run_id for run_id in runs if run_id)).items():
        theirs = {key: record[key] for key in settings if key in record}
        if len(theirs) == len(settings) and _comparable(theirs) != mine:
            other.append({"run_id": run_id, "rows": runs[run_id], **theirs})
    return other


def _run_record(output: str, run_id: str) -> dict[str, Any]:
    """The run's record; empty when there is none (a run from before anima wrote them) or it cannot be
    read (it only serves a warning: never a reason to stop a rerun)."""
    uri = run_record_uri(output, run_id)
    try:
        data = media.read_bytes_if_exists(uri)  # one request per record where all is well
        record = json.loads(data) if data is not None else {}
    except (OSError, ValueError, media.MediaError) as exc:
        print(f"[anima] cannot read run record {uri} ({exc}); its settings are not compared", file=sys.stderr)
        return {}
    if not isinstance(record, dict):
        print(
            f"[anima] run record {uri} holds no JSON object; its settings are not compared", file=sys.stderr
        )
        return {}
    return record


def _comparable(settings: dict[str, Any]) -> Any:
    """`settings` as they read back from a run's JSON record (tuples as lists, unknown types as text)."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def other_methods(results_uri: str, method: str) -> list[str]:
    """The methods other than `method` whose rows the results hold (one column scanned, filtered in the
    scan): a rerun resumes by id, so another method's rows would settle this job's ids."""
    found: set[str] = set()
    for batch in scan_results(results_uri, ["method"], where=pc.field("method") != method):
        found.update(batch.column("method").unique().to_pylist())
    return sorted(found)


def compact(results_uri: str, run_id: str, rows_per_file: int = ROWS_PER_FILE, finished: bool = True) -> int:
    """Rewrite the run's small result files as files of `rows_per_file` rows; returns how many it wrote.

    Each new file is written whole (atomically) before any old one is removed, so a kill in between
    leaves rows twice, which `latest` counts once, and never loses one. The next compaction of such a
    run leaves out the rows its compacted files already hold, so they stay once. A file that cannot be
    read (a writer killed mid-file) is removed too once the run has `finished`; otherwise (another run's
    files: `compact_stopped_runs`) it is kept, since its writer may be alive and still writing.
    """
    fs, files = result_files(results_uri, f"{run_id}_")
    parts = [f for f in files if f.rsplit("/", 1)[-1].startswith(f"{run_id}_{COMPACTED}-")]
    small = sorted(set(files) - set(parts))
    if len(small) < 2 and not (small and parts):
        return 0
    token = uuid.uuid4().hex[:8]
    pending: list[pa.Table] = []
    written: list[str] = []

    def write(table: pa.Table) -> None:
        uri = media.join(results_uri, f"{run_id}_{COMPACTED}-{token}-{len(written):05d}.parquet")
        with media.atomic_write(uri) as f:
            pq.write_table(table, f)
        written.append(uri)

    try:
        dataset = _dataset(fs, small)
        readable = set(dataset.files) if dataset is not None else set()
        # The ids an earlier compaction of the run wrote (it was stopped before it removed the small
        # files, or another process compacts the run now).
        earlier = _dataset(fs, parts) if readable else None
        known = earlier.to_table(columns=["id"]).column("id") if earlier is not None else None
        # Streamed: the driver holds about one output file's rows at a time, whatever the run's size.
        for batch in dataset.to_batches(batch_size=rows_per_file) if dataset is not None else ():
            if known is not None:
                batch = batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=known)))
            pending.append(pa.Table.from_batches([batch], RESULT_SCHEMA))
            if sum(t.num_rows for t in pending) >= rows_per_file:
                table = pa.concat_tables(pending)
                write(table.slice(0, rows_per_file))
                pending = [table.slice(rows_per_file)]
        if sum(t.num_rows for t in pending):
            write(pa.concat_tables(pending))
    except FileNotFoundError:
        # Another process compacts the run too (a job submitted twice). Compacted files are never removed
        # and a small file only once its rows are in one, so nothing is lost; this one stops here, and the
        # rows both wrote stay twice (`latest` counts them once). Two compactions that never meet a file
        # gone (all read ahead) both finish, with the same outcome.
        print(f"[anima] run {run_id}'s result files are being compacted by another process", file=sys.stderr)
        return len(written)
    for path in small:
        if finished or path in readable:
            with suppress(FileNotFoundError):  # removed meanwhile by another process compacting the run
                fs.rm_file(path)
    return len(written)


def compact_stopped_runs(results_uri: str, run_id: str) -> int:
    """Compact the small files of the runs that started before `run_id` (run ids sort by their start)
    and never compacted their own, or were stopped in the middle of it: runs killed (preempted) before
    they ended, whose thousands of files every later resume would list and read. Returns how many runs
    it wrote compacted files for.

    Housekeeping, so it never fails the run that calls it: a run whose files cannot be merged (a
    corrupt page resume never reads) is named and left as it is. Only what it merged is removed: should
    such a run be alive after all (the job submitted twice), a file its writer is still writing stays,
    and the rows it wrote are kept under its run id."""
    _, files = result_files(results_uri)
    small: Counter[str] = Counter()
    compacted_before: set[str] = set()
    for path in files:
        run, _, rest = path.rsplit("/", 1)[-1].partition("_")
        if run < run_id:
            if rest.startswith(f"{COMPACTED}-"):
                compacted_before.add(run)
            else:
                small[run] += 1
    compacted = 0
    # Also a run with one small file beside compacted ones: its compaction was stopped midway.
    for run in sorted(run for run, count in small.items() if count > 1 or run in compacted_before):
        try:
            compacted += compact(results_uri, run, finished=False) > 0
        except (OSError, pa.ArrowException) as exc:
            print(
                f"[anima] cannot compact the result files of run {run} ({exc}); leaving them", file=sys.stderr
            )
    return compacted
