"""The job's progress line on the driver's stdout, which `ray job logs` shows too.

    [anima] 12/100 rows (ok 11, error 1), 0.42 rows/s, ETA 3m 30s, 37.8 items/GPU-h

Result rows pass a tap (a pass-through stage fused with the Parquet writer) that reports their id and
status to a small actor on the driver's node; a driver thread drains it. The count serves only the
line: when it fails, the job goes on, and the summary, built from the results, counts every row. On a
terminal the line redraws in place about once a second; in logs it is one line per update: at most
one every `LOG_INTERVAL_S` while rows finish, so a job of minutes-long rows prints one per finished
row, and a heartbeat when nothing finished for `HEARTBEAT_S`. Every error row's message is printed
once, with its id. Ray Data's own progress blocks and INFO lines go only to its log file
(`ray-data.log` in the session's logs) unless `--verbose`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Any

import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from schemas import OK

if TYPE_CHECKING:
    from ray.data import Dataset

# Ray Data is imported where it is used: the tally's actor process imports this module, and Ray Data would
# cost it about a second of CPU and 100 MB while the job's other processes start beside it.

LOG_INTERVAL_S = 5.0
TALLY_TIMEOUT_S = 60.0  # a tally that does not answer in this long is skipped: the count is not the job
HEARTBEAT_S = 60.0
TERMINAL_INTERVAL_S = 1.0


def _not_the_bars_notice(record: logging.LogRecord) -> bool:
    """Ray Data warns once that its bars are off and how to turn them on: what --verbose does."""
    return not record.getMessage().startswith("Progress bars disabled")


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's progress bars and INFO lines on the console only with --verbose (its log file has them)."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = verbose
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.INFO if verbose else logging.WARNING)
            if _not_the_bars_notice not in handler.filters:
                handler.addFilter(_not_the_bars_notice)


@ray.remote(num_cpus=0)
class _Tally:
    """What finished since the driver last asked: (id, status, error) of each result row."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str | None]] = []

    def add(self, rows: list[tuple[str, str, str | None]]) -> None:
        self.rows.extend(rows)

    def drain(self) -> list[tuple[str, str, str | None]]:
        rows, self.rows = self.rows, []
        return rows


def _report(batch: pa.Table, tally: Any) -> pa.Table:
    """The tap: tell the tally which rows finished (waiting for it, so none is counted after the job).
    A tally that is gone costs the progress line these rows, never the rows: the writer fused with
    this stage would fail the block, and Ray Data the job."""
    columns = [batch.column(name).to_pylist() for name in ("id", "status", "error")]
    with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        ray.get(tally.add.remote(list(zip(*columns, strict=True))), timeout=TALLY_TIMEOUT_S)
    return batch


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts a run's finished rows and prints the progress line; use as a context manager around the
    Ray Data execution, with `tap` applied to the stage whose output is the result rows."""

    def __init__(self, total: int, gpus: float, stream: IO[str] | None = None) -> None:
        self.total, self.gpus = total, gpus  # gpus: actors x GPUs per actor
        self.stream = stream or sys.stdout
        self.terminal = self.stream.isatty()
        self.done: set[str] = set()
        self.ok = 0
        self.started = time.monotonic()
        self._tally: Any = None
        self._pending: Any = None  # a drain asked for and not yet answered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="anima-progress", daemon=True)
        self._printed_at = 0.0
        self._printed_done = 0

    def tap(self, dataset: Dataset, ray_remote_args: dict[str, Any]) -> Dataset:
        """`dataset` passing the tally; `ray_remote_args` must be the next stage's (the Parquet writer's),
        so that Ray Data fuses the two into one task per block (it fuses only equal remote args)."""
        if self._tally is None:
            # On the driver's node, which the job cannot outlive anyway: on any other node, a preempted
            # node took the tally with it, and every block written after failed the job.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self._tally = _Tally.options(scheduling_strategy=here).remote()
        return dataset.map_batches(
            _report,
            fn_kwargs={"tally": self._tally},
            batch_size=None,
            batch_format="pyarrow",
            **ray_remote_args,
        )

    def __enter__(self) -> Progress:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._update(final=True)
        if self._tally is not None:
            ray.kill(self._tally)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.started
        done = len(self.done)
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = "done" if done >= self.total else _duration((self.total - done) / rate) if rate else "unknown"
        gpu_hours = elapsed / 3600 * self.gpus
        per_gpu_hour = f"{done / gpu_hours:.1f} items/GPU-h" if gpu_hours else "no GPUs"
        return (
            f"[anima] {done}/{self.total} rows (ok {self.ok}, error {done - self.ok}), {rate:.2f} rows/s, "
            f"ETA {eta}, {per_gpu_hour}"
        )

    def add(self, rows: list[tuple[str, str, str | None]]) -> list[str]:
        """Count rows seen for the first time (a retried task reports its rows again); their errors."""
        errors = []
        for row_id, status, error in rows:
            if row_id in self.done:
                continue
            self.done.add(row_id)
            if status == OK:
                self.ok += 1
            else:
                errors.append(f"[anima] error: {error or f'row {row_id!r}: no message'}")
        return errors

    def _loop(self) -> None:
        while not self._stop.wait(TERMINAL_INTERVAL_S):
            self._update()

    def _update(self, final: bool = False) -> None:
        # A drain that timed out still empties the tally when it runs: the next update waits for it
        # rather than asking again, so its rows are counted and their errors printed after all.
        pending, self._pending = self._pending, None
        try:
            if pending is None and self._tally is not None:
                pending = self._tally.drain.remote()
            rows = ray.get(pending, timeout=TALLY_TIMEOUT_S) if pending is not None else []
        except ray.exceptions.ActorDiedError:
            rows, self._tally = [], None
            lost = "[anima] the progress count was lost (its actor died); the job goes on\n"
            self.stream.write(f"\r\x1b[K{lost}" if self.terminal else lost)
        except ray.exceptions.GetTimeoutError:
            rows, self._pending = [], pending
        except ray.exceptions.RayActorError:  # unreachable for now: asked again at the next update
            rows = []
        errors = self.add(rows)
        now = time.monotonic()
        if self.terminal:
            for message in errors:
                self.stream.write(f"\r\x1b[K{message}\n")
            self.stream.write(f"\r\x1b[K{self.line(now)}" + ("\n" if final else ""))
        else:
            for message in errors:
                self.stream.write(message + "\n")
            news = len(self.done) > self._printed_done
            due = now - self._printed_at >= (LOG_INTERVAL_S if news else HEARTBEAT_S)
            if final or due:
                self.stream.write(self.line(now) + "\n")
                self._printed_at, self._printed_done = now, len(self.done)
        self.stream.flush()
