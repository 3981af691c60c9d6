"""What earlier runs already did: the latest result row of every id under OUTPUT/results/.

A rerun skips ids whose latest row is ok and retries the rest, so a preempted or killed job is
resumed by submitting it again with the same output. Rows that failed on their own input (missing or
corrupt file, empty prompt) would fail again the same way, so they are retried only when asked.
"""

from __future__ import annotations

import sys

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import OK

HISTORY_COLUMNS = ["id", "status", "retryable", "finished_at"]


def result_files(results_uri: str, prefix: str = "") -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, root = fsspec.core.url_to_fs(results_uri)
    if not fs.exists(root):
        return fs, []
    files = sorted(
        p for p in fs.find(root) if p.endswith(".parquet") and p.rsplit("/", 1)[-1].startswith(prefix)
    )
    return fs, files


def read_results(results_uri: str, columns: list[str] | None = None, prefix: str = "") -> pa.Table | None:
    """All result rows under `results_uri` (files named `prefix*`); None when there are none.

    A file that cannot be read (a writer killed mid-file) is skipped with a warning: its rows simply
    count as not done and are redone.
    """
    fs, files = result_files(results_uri, prefix)
    tables = []
    for path in files:
        try:
            tables.append(pq.read_table(path, filesystem=fs, columns=columns))
        except (OSError, pa.ArrowInvalid) as exc:
            print(f"[anima] skipping unreadable result file {path}: {exc}", file=sys.stderr)
    return pa.concat_tables(tables, promote_options="default") if tables else None


def latest(results: pa.Table) -> pa.Table:
    """One row per id: the one that finished last, with `attempts` = how many rows the id has in all."""
    ordered = results.sort_by([("id", "ascending"), ("finished_at", "ascending")])
    ids = ordered.column("id")
    # The last row of each run of equal ids is the latest one.
    following = pa.concat_arrays([ids.combine_chunks()[1:], pa.array([None], pa.string())])
    is_last = pc.fill_null(pc.not_equal(ids.combine_chunks(), following), True)
    agg = ordered.group_by("id").aggregate([("id", "count")])
    counts = dict(zip(agg["id"].to_pylist(), agg["id_count"].to_pylist(), strict=True))
    last = ordered.filter(is_last)
    attempts = pa.array([counts[i] for i in last.column("id").to_pylist()], pa.int64())
    return last.append_column("attempts", attempts)


def settled_and_attempts(results_uri: str, retry_errors: bool = False) -> tuple[set[str], dict[str, int]]:
    """Ids a rerun skips (latest row ok, or failed on bad input unless `retry_errors`), and how many
    result rows every id seen so far has."""
    results = read_results(results_uri, HISTORY_COLUMNS)
    if results is None or results.num_rows == 0:
        return set(), {}
    last = latest(results)
    ids = last.column("id").to_pylist()
    rows = zip(ids, last.column("status").to_pylist(), last.column("retryable").to_pylist(), strict=True)
    settled = {i for i, status, retryable in rows if status == OK or not (retry_errors or retryable)}
    return settled, dict(zip(ids, last.column("attempts").to_pylist(), strict=True))
