"""The CPU read stages, run as Ray Data tasks: the jobs' decode stage before the actor pool, and the
decoding of training examples before Ray Train's workers.

Ray Data retries a task whose process died without end, so a read that never returns (a server that
stalls, a decoder caught in a loop) or that kills its process (a decoder crash, out of host memory)
would hold or kill the stage forever. Both stages therefore keep the actors' accounting per row, in
their batch's marker (`ReadGuard`): a read that runs past the row time limit is stopped by ending the
process and its row given up on the retry; a row whose read kills the process is given up after
`max_row_crashes` deaths charged to it. Its batch-mates are read again.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from actors.base import JobConfig, RowActor, describe_error, inflight_marker, stop_after, this_runs_record
from pipelines import media
from schemas.manifests import DECODE_ERROR_COLUMN, DECODE_RETRYABLE_COLUMN, DECODED_COLUMN


class ReadGuard:
    """One attempt at reading one batch's rows, one at a time, under the batch's marker.

    The marker holds the attempts of this run (`starts`), the rows stopped at the limit (`stopped`), the
    deaths charged to each row (`deaths`) and, while an attempt after a death reads, the row it reads
    (`reading`). A first death, before rows were noted, is charged only to a batch of one, as the actors
    do. A batch that finished keeps its marker only while it holds given-up rows, marked finished, so
    that a retry of its task (failed in a later batch) charges it no death.
    """

    def __init__(self, marker: str, run_id: str, ids: list[str], max_row_crashes: int, limit: float | None):
        self.marker, self.max_row_crashes, self.limit = marker, max_row_crashes, limit
        record = {**this_runs_record(marker, run_id), "run_id": run_id}
        # An earlier attempt that wrote the marker and did not finish the batch ended in it.
        self.died = "starts" in record and not record.pop("finished", False)
        record["starts"] = record.get("starts", 0) + 1
        self.stopped, self.deaths = record.setdefault("stopped", {}), record.setdefault("deaths", {})
        reading = record.pop("reading", None)  # the row it ended in, when noted
        if self.died and reading is None:  # it died before rows were noted: whose death is known if one ran
            unsettled = [i for i in ids if self.given_up(i) is None]
            reading = unsettled[0] if len(unsettled) == 1 else None
        if self.died and reading is not None and reading not in self.stopped:
            self.deaths[reading] = self.deaths.get(reading, 0) + 1
        self.record = record
        media.write_text(json.dumps(record), marker)

    def given_up(self, row_id: str) -> tuple[str, bool] | None:
        """Why the row is given up unread, and whether a later run could read it; None: read it."""
        if row_id in self.stopped:
            return (
                f"reading its inputs ran past the row time limit ({self.stopped[row_id]:g} s) and its worker "
                "process was restarted to stop it (a stalled read?); giving up on it",
                False,  # a rerun would cost the limit and a restart again
            )
        if self.deaths.get(row_id, 0) >= self.max_row_crashes:
            return (
                f"the worker process died {self.deaths[row_id]} times while reading this row's inputs (a "
                "decoder crash, or out of host memory); giving up on it",
                True,
            )
        return None

    def note(self, row_id: str) -> None:
        """Before the row is read: after a death, noted as the row read, so that a death in it is its."""
        if self.died:
            media.write_text(json.dumps({**self.record, "reading": row_id}), self.marker)

    def time_limit(self, row_id: str) -> AbstractContextManager[None]:
        """The row's read, stopped at the limit and noted so that the retry gives the row up."""

        def note_stop() -> None:
            stopped = {**self.stopped, row_id: self.limit}
            media.write_text(json.dumps({**self.record, "reading": row_id, "stopped": stopped}), self.marker)

        return stop_after(self.limit, f"reading row {row_id!r}", note_stop)

    def finish(self) -> None:
        """Every read ended, or the task was cancelled (Ray Train restarting, a run ending): a death after
        this is no row's."""
        if not self.stopped and not any(n >= self.max_row_crashes for n in self.deaths.values()):
            media.remove(self.marker)
        else:  # kept for the run: a retry of the task (failed in another batch) gives those rows up at once
            media.write_text(json.dumps({**self.record, "finished": True}), self.marker)


def decode_rows(batch: pa.Table, actor: type[RowActor], config: JobConfig) -> pa.Table:
    """The jobs' decode stage: each row's inputs read and packed, or the reason they could not be, which
    the actor turns into that row's error row (every row still gets one)."""
    rows = batch.to_pylist()
    ids = [row["id"] for row in rows]
    guard = ReadGuard(
        inflight_marker(config.output, ids, "decode"),
        config.run_id,
        ids,
        config.max_row_crashes,
        config.row_time_limit_s,
    )
    decoded: list[bytes | None] = []
    errors: list[str | None] = []
    retryable: list[bool | None] = []
    try:
        for row in rows:
            arrays, (error, again) = None, guard.given_up(row["id"]) or (None, None)
            if error is not None and not again:
                error += " (to try it again, rerun with a higher --row-time-limit and --retry-errors)"
            if error is None:
                guard.note(row["id"])
                try:
                    with guard.time_limit(row["id"]):
                        arrays = actor.read_inputs(row, actor.merge_params(row, config.params), config)
                except Exception as exc:
                    error, again = describe_error(exc)
            decoded.append(None if arrays is None else media.pack_arrays(arrays))
            errors.append(error)
            retryable.append(again)
    finally:
        guard.finish()
    return (
        batch.append_column(DECODED_COLUMN, pa.array(decoded, pa.large_binary()))
        .append_column(DECODE_ERROR_COLUMN, pa.array(errors, pa.string()))
        .append_column(DECODE_RETRYABLE_COLUMN, pa.array(retryable, pa.bool_()))
    )


# Added by jobs.train to each training row: its place in the manifest, which keys the reads' accounting
# (training ids need not be unique or present).
ROW_COLUMN = "_row"


def training_stages(source: str) -> tuple[str, str]:
    """The folders under OUTPUT/_inflight/ of a training source's batch markers and of its records of
    skipped rows (`inflight_marker`'s stage): this run's, removed by jobs.train when it ends."""
    return f"train-{source}", f"train-{source}-skipped"


@dataclass(frozen=True)
class TrainingReads:
    """What training's decoding tasks need for their accounting: the run's output, its id and limits."""

    output: str
    run_id: str
    max_row_crashes: int
    row_time_limit_s: float | None


def decode_examples(
    batch: pa.Table, decode: Callable[..., pa.Table], reads: TrainingReads, source: str, **decode_kwargs: Any
) -> pa.Table:
    """Training examples of a batch of a source's rows: the recipe's `decode` (which skips rows it cannot
    read, saying why) run on each row under the accounting above. A row stopped at the limit, given up
    after deaths, or whose decoding fails in any other way is skipped too, with a message in the worker's
    log. Every skipped row is recorded with why, for the run's list of them (`jobs.train.save_skipped`)."""
    keys = [str(n) for n in batch.column(ROW_COLUMN).to_pylist()]
    names = [None if i is None else str(i) for i in batch.column("id").to_pylist()]
    markers, records = training_stages(source)
    guard = ReadGuard(
        inflight_marker(reads.output, keys, markers),
        reads.run_id,
        keys,
        reads.max_row_crashes,
        reads.row_time_limit_s,
    )
    examples, skipped = [], []
    try:
        for i, key in enumerate(keys):
            why = guard.given_up(key)
            if why is None:
                guard.note(key)
                unreadable: list[str] = []
                try:
                    with guard.time_limit(key):
                        example = decode(
                            batch.slice(i, 1), source=source, skipped=unreadable, **decode_kwargs
                        )
                except Exception as exc:
                    why = describe_error(exc)
                else:
                    if example.num_rows:
                        examples.append(example)
                        continue
                    why = ((unreadable or ["no example"])[0], False)  # `decode` could not read it
            hint = " (raise --row-time-limit to read it)" if key in guard.stopped else ""
            print(f"[anima] training row {names[i]!r} skipped: {why[0]}{hint}", file=sys.stderr, flush=True)
            skipped.append({"id": names[i], "source": source, "row": key, "reason": why[0] + hint})
    finally:
        guard.finish()
    if skipped:  # the run lists them when it ends (jobs.train), as a marker is read: this run's only
        record = {"run_id": reads.run_id, "rows": skipped}
        media.write_text(json.dumps(record), inflight_marker(reads.output, keys, records))
    if examples:
        return pa.concat_tables(examples)
    return decode(batch.slice(0, 0), source=source, **decode_kwargs)
