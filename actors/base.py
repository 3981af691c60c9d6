"""The actor every method and the evaluation run in: models loaded once, one result row per input row.

Ray Data drops a whole block when a task raises, so nothing a row does may escape as an exception:
bad inputs, model errors and CUDA out-of-memory become `status="error"` rows and the batch goes on.
Only a fault that leaves the process unusable (a fatal CUDA error) ends the process, so that Ray
restarts the actor and retries the batch elsewhere; a row that keeps killing its process is given up
after `max_row_crashes` tries instead of looping forever. A row that runs past `row_time_limit_s` (a
parameter bomb such as `steps=10**9`, a hung read) is stopped the same way, since only ending the process
stops a GPU computation, and given up when it runs past the limit alone. The decode stage's CPU tasks
(`actors.read_stage`) keep the same accounting per row.
"""

from __future__ import annotations

import datetime as dt
import faulthandler
import hashlib
import json
import os
import resource
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy.typing as npt
import pyarrow as pa

from pipelines import media
from schemas import ERROR, MANIFEST_KINDS, OK, ResultRow, result_table, unsafe_id_reason
from schemas.manifests import (
    ATTEMPT_COLUMN,
    DECODE_ERROR_COLUMN,
    DECODE_RETRYABLE_COLUMN,
    DECODED_COLUMN,
    RESERVED_COLUMNS,
)

T = TypeVar("T")

if TYPE_CHECKING:
    import torch

# OUTPUT/_inflight/: the markers of the batches a run is working on (`inflight_marker`).
INFLIGHT = "_inflight"
# Kill the worker process on the first attempt at this row id: the chaos test of fault tolerance.
CHAOS_KILL_ENV = "ANIMA_CHAOS_KILL_ROW"
_FATAL_CUDA_MARKERS = (
    "CUDA error",
    "device-side assert",
    "illegal memory access",
    "CUBLAS_STATUS",
    "CUDNN_STATUS",
    "NCCL error",
)


@dataclass
class JobConfig:
    """Everything an actor needs, sent once from the driver (small and picklable)."""

    method: str
    output: str
    run_id: str
    models: dict[str, str | None] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    max_row_crashes: int = 2
    # Seconds a row may run in its actor (a call of B rows: B times as long); None: no limit.
    row_time_limit_s: float | None = None
    verbose: bool = False  # the model libraries' progress bars in the workers' logs too
    # What the decode stage needs of the loaded models (`RowActor.decode_settings`), found where they are
    # prepared: the stage's CPU tasks may run on nodes that have no model.
    decode: dict[str, Any] = field(default_factory=dict)

    def artifacts_dir(self, row_id: str) -> str:
        """OUTPUT/artifacts/<id>/; an id that is not one plain folder name is refused (validation already
        refuses such manifests: this guards every writer that reaches an actor some other way)."""
        reason = unsafe_id_reason(row_id)
        if reason:
            raise RowError(f"id {row_id!r} cannot name an artifact folder: {reason}")
        return media.join_under(self.output, "artifacts", row_id)


class RowError(ValueError):
    """A problem with one input row (bad value, unreadable input); becomes that row's error message."""


class DecodeError(Exception):
    """The decode stage could not read a row's inputs; carries its message and whether a rerun may help."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def row_params(parse: Callable[[dict[str, Any]], T], values: dict[str, Any]) -> T:
    """A row's typed method parameters (`Params.from_dict`); a bad value becomes that row's error."""
    try:
        return parse(values)
    except (TypeError, ValueError) as exc:
        raise RowError(f"bad parameter: {exc}") from exc


@dataclass
class RowOutput:
    """What a method produced for one row; `error` set when this row failed inside a batch that went on."""

    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: Exception | None = None


class RowActor:
    """Base of all actors; a method implements `setup` and `process_row` (or `process_rows` to batch)."""

    method: ClassVar[str]
    kind: ClassVar[str]  # manifest kind, a key of schemas.MANIFEST_KINDS
    # Parameter defaults of the method; `--set` and same-named manifest columns override them.
    defaults: ClassVar[dict[str, Any]] = {"seed": 0}
    # Rows per actor call without --batch-size, and rows per Ray task (at least one batch): what a failed
    # task costs; see runner.task_rows.
    default_batch_size: ClassVar[int] = 1
    rows_per_task: ClassVar[int] = 1
    # Seconds a row may run without --row-time-limit: far above a row of the released model on a GPU.
    row_time_limit_s: ClassVar[float] = 3000.0
    # True: a CPU stage before the pool reads each row's inputs (`read_inputs`, run by
    # `read_stage.decode_rows`), so that the accelerator's actors spend their time in the models; see
    # runner.run_job.
    decode_stage: ClassVar[bool] = False
    # Rows of a batch whose inputs an actor reads (or, after a decode stage, unpacks) at once, on threads:
    # decoders leave cores idle between their serial steps, and an object store answers each read in tens
    # of ms. 1 for methods whose `build` (see `run_in_groups`) does more than read. The media limits hold
    # per read, so an actor may hold this many reads' worth at once.
    read_threads: ClassVar[int] = 1
    # Defaults the loaded model brings (a converted official model's inference settings), over `defaults`.
    model_defaults: dict[str, Any]

    def __init__(self, config: JobConfig):
        import torch

        self.config = config
        # While a batch of several rows runs under its time limit: records a stop in its marker.
        self._note_stop: Callable[[float], None] | None = None
        # Its threads start at the first batch read on them and live as long as the actor.
        threads = self.read_threads
        self._readers = ThreadPoolExecutor(threads, "anima-read") if threads > 1 else None
        quiet_progress_bars(config)
        self.model_defaults = {}
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.node = _node_id()
        cpus = _assigned_cpus()
        if cpus:
            # torch would otherwise start a thread per core and actors sharing a node would fight for them.
            torch.set_num_threads(cpus)
        self.setup()

    # -- what a method provides -------------------------------------------------------------

    @classmethod
    def prepare(cls, config: JobConfig) -> None:
        """Fetch or build this method's weights into the node-local cache (run once per node)."""

    @classmethod
    def decode_settings(cls, config: JobConfig) -> dict[str, Any]:
        """What `read_inputs` needs of the prepared models (JSON-like); run where `prepare` ran."""
        return {}

    def setup(self) -> None:
        """Load models; called once per actor process."""

    def process_row(self, row: dict[str, Any], params: dict[str, Any]) -> RowOutput:
        raise NotImplementedError

    @classmethod
    def read_inputs(
        cls, row: dict[str, Any], params: dict[str, Any], config: JobConfig
    ) -> dict[str, npt.NDArray[Any]]:
        """Read and decode a row's inputs (methods with `decode_stage`); runs in the decode stage."""
        raise NotImplementedError

    def inputs(self, row: dict[str, Any], params: dict[str, Any]) -> dict[str, npt.NDArray[Any]]:
        """The row's decoded inputs: what the decode stage packed, or read here when no stage ran."""
        if row.get(DECODE_ERROR_COLUMN) is not None:
            raise DecodeError(row[DECODE_ERROR_COLUMN], bool(row.get(DECODE_RETRYABLE_COLUMN)))
        if row.get(DECODED_COLUMN) is not None:
            return media.unpack_arrays(row[DECODED_COLUMN])
        with self._read_limit(row["id"]):
            return self.read_inputs(row, params, self.config)

    def _read_limit(self, row_id: str) -> AbstractContextManager[None]:
        """A read in a batch of several rows is held to one row's time limit: a stalled read (a server that
        accepts and never answers) ends the process after the limit, not after the whole batch's.

        Only inside the batch's own limit (`_note_stop` is set only there), which holds faulthandler's
        deadline: the reads run at once (`read_threads`) and `stop_after` arms and clears that deadline
        safely only for one outermost limit at a time. The limit is wall time, and a batch's reads share
        the actor's cores; a read stopped that way is read again alone after the split."""
        note, limit = self._note_stop, self.config.row_time_limit_s
        if note is None or not limit:  # no limit, or a batch of one, whose limit is already the row's
            return nullcontext()
        return stop_after(limit, f"reading row {row_id!r}", lambda: note(limit))

    def process_rows(self, rows: list[dict[str, Any]], params: list[dict[str, Any]]) -> list[RowOutput]:
        """Process several rows; methods override this to batch them through the GPU together."""
        return [self.process_row(row, p) for row, p in zip(rows, params, strict=True)]

    def run_in_groups(
        self,
        rows: list[dict[str, Any]],
        params: list[dict[str, Any]],
        build: Callable[[dict[str, Any], dict[str, Any]], Any],
        key: Callable[[Any], tuple],
        run: Callable[[list[Any]], list[Any]],
        write: Callable[[dict[str, Any], dict[str, Any], Any, Any], RowOutput],
    ) -> list[RowOutput]:
        """Batch rows through the GPU while keeping every row's failure its own.

        `build` reads a row's inputs into a job, `read_threads` rows at once (a bad row becomes that row's
        error, the others go on); jobs with equal `key` (shapes, step counts) are `run` together; `write`
        stores each result.
        """

        def built(row: dict[str, Any], p: dict[str, Any]) -> Any:
            try:
                return build(row, p)
            except (RowError, DecodeError, media.MediaError, ValueError) as exc:
                return RowOutput(
                    error=exc if isinstance(exc, RowError | DecodeError | media.MediaError) else RowError(exc)
                )

        if self._readers is None or len(rows) == 1:
            made = [built(row, p) for row, p in zip(rows, params, strict=True)]
        else:
            reads = [self._readers.submit(built, row, p) for row, p in zip(rows, params, strict=True)]
            try:
                made = [read.result() for read in reads]
            finally:  # after an unexpected error: drop the reads not begun, wait for the others
                for read in reads:
                    read.cancel()
                wait(reads)
        outs = {i: job for i, job in enumerate(made) if isinstance(job, RowOutput)}
        jobs = {i: job for i, job in enumerate(made) if not isinstance(job, RowOutput)}
        groups: dict[tuple, list[int]] = {}
        for i, job in jobs.items():
            groups.setdefault(key(job), []).append(i)
        for indices in groups.values():
            results = run([jobs[i] for i in indices])
            for i, result in zip(indices, results, strict=True):
                try:
                    outs[i] = write(rows[i], params[i], jobs[i], result)
                except Exception as exc:
                    outs[i] = RowOutput(error=exc)
        return [outs[i] for i in range(len(rows))]

    # -- what Ray Data calls ----------------------------------------------------------------

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        results: dict[int, ResultRow] = {}
        for i, row in enumerate(rows):
            reason = unsafe_id_reason(row["id"])
            if reason:  # its artifact paths would lie outside OUTPUT: touch nothing
                message = f"id cannot name an artifact folder ({reason}); nothing was written"
                results[i] = self._error_row(row, {}, message, retryable=False, seconds=0.0)
        runnable = [i for i in range(len(rows)) if i not in results]
        if runnable:
            results |= self._guarded(rows, runnable)
        return result_table([results[i] for i in range(len(rows))])

    def _guarded(self, rows: list[dict[str, Any]], indices: list[int]) -> dict[int, ResultRow]:
        """Run rows under their in-flight marker and time limit. If a process died on them before (or was
        stopped at the limit), a batch is split into its rows, each under its own marker, so that only a
        row that kills its process (after `max_row_crashes` deaths) or runs past the limit alone is given
        up."""
        ids = [rows[i]["id"] for i in indices]
        marker = self._marker(ids)
        record = self._note_start(marker, ids)
        crashes, stopped = record["starts"] - 1, record.get("stopped_after_s")
        if crashes and len(indices) > 1:
            results = {}
            for i in indices:
                results |= self._guarded(rows, [i])
        elif stopped is not None or crashes >= self.config.max_row_crashes:
            # The marker stays until the run ends: a retry of this batch (its task fails again when a
            # batch-mate is stopped) gives the row up at once instead of running it again.
            return {i: self._given_up(rows[i], crashes, stopped) for i in indices}
        else:
            with self._time_limit(marker, record, len(indices)):
                results = self._run(rows, indices)
            if crashes:
                for i in indices:
                    results[i].notes.append(f"the worker process died {crashes} time(s) on this row before")
        media.remove(marker)
        return results

    def _given_up(self, row: dict[str, Any], crashes: int, stopped: float | None) -> ResultRow:
        if stopped is None:
            message = (
                f"the worker process died {crashes} times while processing this row (killed, out of host "
                "memory, or a fatal GPU error); giving up on it"
            )
            return self._error_row(row, {}, message, retryable=True, seconds=0.0)
        # Not retryable: a row this slow (a parameter bomb such as steps=10**9) would cost every rerun of
        # the job the limit and a model load again.
        message = (
            f"ran past the row time limit ({stopped:g} s) and its worker process was restarted to stop it; "
            "giving up on it (to try it again, rerun with a higher --row-time-limit and --retry-errors)"
        )
        return self._error_row(row, {}, message, retryable=False, seconds=stopped)

    @contextmanager
    def _time_limit(self, marker: str, record: dict[str, Any], rows: int) -> Iterator[None]:
        """End the process if the rows run past the job's row time limit (each read alone past one row's,
        `_read_limit`), noting why in their marker, so that the retry Ray makes after restarting the actor
        knows to split the batch or give the row up."""
        limit = self.config.row_time_limit_s

        def note(seconds: float) -> None:
            media.write_text(json.dumps({**record, "stopped_after_s": seconds}), marker)

        seconds = limit * rows if limit else None
        self._note_stop = note if rows > 1 else None
        try:
            with stop_after(seconds, f"{rows} row(s)", lambda: note(seconds)):
                yield
        finally:
            self._note_stop = None

    def _run(self, rows: list[dict[str, Any]], indices: list[int]) -> dict[int, ResultRow]:
        """Run rows together; if the batch as a whole fails, run them one by one to isolate the culprit."""
        params = {i: self.effective_params(rows[i]) for i in indices}
        if len(indices) > 1:
            start = time.perf_counter()
            _reset_peak_memory()
            try:
                outs = self.process_rows([rows[i] for i in indices], [params[i] for i in indices])
            except Exception as exc:
                _exit_if_fatal(exc)
            else:
                share = (time.perf_counter() - start) / len(indices)
                return {
                    i: self._ok_row(rows[i], params[i], out, share)
                    for i, out in zip(indices, outs, strict=True)
                }
        results = {}
        for i in indices:
            start = time.perf_counter()
            _reset_peak_memory()
            try:
                out = self.process_row(rows[i], params[i])
            except Exception as exc:
                _exit_if_fatal(exc)
                message, retryable = describe_error(exc)
                results[i] = self._error_row(
                    rows[i], params[i], message, retryable, time.perf_counter() - start
                )
            else:
                results[i] = self._ok_row(rows[i], params[i], out, time.perf_counter() - start)
        return results

    def effective_params(self, row: dict[str, Any]) -> dict[str, Any]:
        """Method defaults, overridden by the model's own, the job's `--set`, then the row's own columns."""
        return self.merge_params(row, self.config.params, self.model_defaults)

    @classmethod
    def merge_params(
        cls, row: dict[str, Any], job_params: dict[str, Any], model_defaults: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """`effective_params` without a loaded model (the decode stage has none).

        Columns the manifest kind does not know are per-row parameters too and pass through.
        """
        params = {**cls.defaults, **(model_defaults or {}), **job_params}
        known = MANIFEST_KINDS[cls.kind].columns
        for name, value in row.items():
            if value is not None and name not in RESERVED_COLUMNS and (name in params or name not in known):
                params[name] = value
        return params

    # -- result rows ------------------------------------------------------------------------

    def _base_row(self, row: dict[str, Any], params: dict[str, Any], seconds: float) -> ResultRow:
        return ResultRow(
            id=row["id"],
            method=self.config.method,
            seed=params.get("seed"),
            backbone=self.config.models.get("backbone"),
            params=params,
            seconds=seconds,
            peak_memory_mb=_peak_memory_mb(),
            attempt=int(row.get(ATTEMPT_COLUMN) or 1),
            finished_at=dt.datetime.now(dt.UTC),
            run_id=self.config.run_id,
            node=self.node,
        )

    def _ok_row(
        self, row: dict[str, Any], params: dict[str, Any], out: RowOutput, seconds: float
    ) -> ResultRow:
        if out.error is not None:
            message, retryable = describe_error(out.error)
            return self._error_row(row, params, message, retryable, seconds)
        result = self._base_row(row, params, seconds)
        result.status, result.outputs, result.metrics, result.notes = OK, out.outputs, out.metrics, out.notes
        return result

    def _error_row(
        self, row: dict[str, Any], params: dict[str, Any], message: str, retryable: bool, seconds: float
    ) -> ResultRow:
        result = self._base_row(row, params, seconds)
        # The driver's progress line prints it, once (jobs/progress.py).
        result.status, result.error, result.retryable = ERROR, f"row {row['id']!r}: {message}", retryable
        return result

    # -- crash accounting -------------------------------------------------------------------

    def _marker(self, ids: list[str]) -> str:
        return inflight_marker(self.config.output, ids)

    def _note_start(self, marker: str, ids: list[str]) -> dict[str, Any]:
        """Record that work on a batch began; return its marker: `starts`, the attempts in this run
        including this one (a process died on each earlier one), and `stopped_after_s` when one was
        stopped at the time limit (kept: a row stopped alone is given up on every later attempt).

        The marker outlives a killed process, so its count says how many processes died on this batch
        (a row that kills its process kills its batch, so every row of it counts the same). A marker of
        an earlier run is left by a driver that died (preempted, killed), which is not the rows' doing:
        it counts from zero again.
        """
        earlier = this_runs_record(marker, self.config.run_id)
        starts = earlier.get("starts", 0)
        record = {**earlier, "starts": starts + 1, "run_id": self.config.run_id}
        if starts < self.config.max_row_crashes:
            media.write_text(json.dumps(record), marker)
        victim = os.environ.get(CHAOS_KILL_ENV)
        if starts == 0 and victim in ids:
            print(f"[anima] chaos: killing worker process on row {victim!r}", file=sys.stderr, flush=True)
            os._exit(1)
        return record


def inflight_marker(output: str, ids: list[str], stage: str = "") -> str:
    """The in-flight marker of a batch: OUTPUT/_inflight/<stage>/<digest of its ids>.json (no stage: the
    actors'), removed when the run ends.

    Ray retries a failed task with the same block, so the same batch finds its marker again.
    """
    digest = hashlib.sha1("\n".join(ids).encode("utf-8")).hexdigest()
    return media.join_under(output, INFLIGHT, *([stage] if stage else []), f"{digest}.json")


def this_runs_record(marker: str, run_id: str) -> dict[str, Any]:
    """The marker's record if this run wrote it, else empty: a marker of an earlier run was left by a
    driver that died (preempted, killed), which is not the rows' doing."""
    data = media.read_bytes_if_exists(marker)
    earlier = json.loads(data) if data is not None else {}
    return earlier if earlier.get("run_id") == run_id else {}


_SAFETY_NET_ARMED = threading.Event()  # faulthandler's deadline (see stop_after) is set


@contextmanager
def stop_after(seconds: float | None, what: str, note: Callable[[], None]) -> Iterator[None]:
    """End the process if the block runs past `seconds` (None: no limit), after `note()` records why for
    the retry. A thread cannot interrupt a GPU kernel or a blocking read; ending the process can. Where
    the work was goes to the worker's log."""
    if not seconds:
        yield
        return
    lock, finished = threading.Lock(), threading.Event()

    def stop() -> None:
        with lock:  # the block finishing and the stop exclude each other: one of them happens whole
            if finished.is_set():
                return
            try:
                print(
                    f"[anima] {what} ran past the row time limit ({seconds:g} s); restarting the worker. "
                    "Where it was:",
                    file=sys.stderr,
                    flush=True,
                )
                faulthandler.dump_traceback(sys.stderr)
                note()
            finally:
                os._exit(1)

    # Code that holds the GIL starves the timer's thread: faulthandler's own thread ends the process
    # a minute later all the same (without a note, so the retry counts it as a crash). It keeps one such
    # deadline per process, so a limit inside another (a read in a batch) leaves the outer one's, and a
    # read that holds the GIL is ended only at the outer deadline.
    outer = _SAFETY_NET_ARMED.is_set()
    if not outer:
        faulthandler.dump_traceback_later(seconds + 60, exit=True)
        _SAFETY_NET_ARMED.set()
    timer = threading.Timer(seconds, stop)
    timer.daemon = True
    try:
        timer.start()
        yield
    finally:
        with lock:
            finished.set()
        timer.cancel()
        if not outer:
            faulthandler.cancel_dump_traceback_later()
            _SAFETY_NET_ARMED.clear()


def quiet_progress_bars(config: JobConfig) -> None:
    """Unless the job is verbose, no tqdm bars of downloads and weight loading in this worker: in a Ray
    worker's log each refresh is a line, and they say nothing the job's progress line does not. Switched
    in the process (not through a runtime_env, which would make Ray start a fresh worker per task)."""
    if config.verbose:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read at import by huggingface_hub, and transformers
    for module, switch in (
        ("huggingface_hub.utils", "disable_progress_bars"),
        ("transformers.utils.logging", "disable_progress_bar"),
        ("diffusers.utils.logging", "disable_progress_bar"),
    ):
        if module in sys.modules:  # imported already: switch it off in place, without importing the others
            getattr(sys.modules[module], switch)()


def model_dtype(device: str, precision: str) -> torch.dtype:
    """bf16 on GPUs that have it (fp16 otherwise), fp32 on CPU, unless the job sets `precision`."""
    import torch

    if precision == "auto":
        if device != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    choices = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in choices:
        raise ValueError(f"precision must be auto, {', '.join(choices)}; got {precision!r}")
    return choices[precision]


def _node_id() -> str | None:
    """The Ray node this actor runs on; None outside Ray (tests, notebooks), without starting Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _assigned_cpus() -> int | None:
    """CPUs Ray reserved for this actor; None outside a Ray worker (tests, notebooks, a Ray driver)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return max(1, round(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def describe_error(exc: BaseException) -> tuple[str, bool]:
    """The row's error message, and whether a rerun could succeed (False: the input itself is bad)."""
    # Only a process that loaded torch can meet its errors: the decode stage's workers never import it
    # (1.6 s and about 300 MB each) to tell a missing file from a CUDA out-of-memory error.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return f"CUDA out of memory ({exc}); lower batch size, frames or resolution for this row", True
    if isinstance(exc, RowError | media.MediaError):
        return str(exc), False
    if isinstance(exc, DecodeError):
        return str(exc), exc.retryable
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    place = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {exc}{place}", True


def _exit_if_fatal(exc: BaseException) -> None:
    """End the process on errors after which CUDA state is undefined; Ray restarts it and retries.

    Only a RuntimeError (what torch raises for CUDA, cuBLAS, cuDNN and NCCL failures) is read for their
    markers: the message of a row's own error quotes the row (a file named `CUDA error.mp4`), and must
    not cost two restarts and model loads."""
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(marker in text for marker in _FATAL_CUDA_MARKERS):
        print(f"[anima] fatal device error, restarting worker: {text}", file=sys.stderr, flush=True)
        os._exit(1)


def _reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_mb() -> float:
    """Peak GPU memory of the last row on CUDA; on CPU the process's peak resident memory so far."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
