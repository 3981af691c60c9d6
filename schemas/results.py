"""The result table: one row per input row per run, the same columns for every method.

A fixed schema (rather than whatever columns a batch happens to produce) lets Parquet files from
different actors, runs and methods be read back as one table for resume and analysis.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

OK = "ok"
ERROR = "error"

# Float metric columns; null when the metric could not be computed (the reason goes to `notes`).
METRIC_COLUMNS: tuple[str, ...] = (
    "clip_text",
    "clip_temporal",
    "clip_image",
    "clip_style",
    "xclip_text",
    "pic",
    "lpips",
    "outside_mask_psnr",
)

RESULT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        # True when the error may pass on a rerun (out of memory, crash, lost task); False for bad input.
        pa.field("retryable", pa.bool_()),
        pa.field("notes", pa.string()),
        pa.field("outputs", pa.map_(pa.string(), pa.string())),
        *[pa.field(name, pa.float64()) for name in METRIC_COLUMNS],
        pa.field("seed", pa.int64()),
        pa.field("backbone", pa.string()),
        pa.field("params", pa.string()),
        pa.field("seconds", pa.float64()),
        pa.field("peak_memory_mb", pa.float64()),
        pa.field("attempt", pa.int64()),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
        pa.field("run_id", pa.string()),
        pa.field("node", pa.string()),
    ]
)


@dataclass
class ResultRow:
    """What an actor reports for one input row."""

    id: str
    method: str
    status: str = OK
    error: str | None = None
    retryable: bool = False
    notes: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float | None] = field(default_factory=dict)
    seed: int | None = None
    backbone: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    peak_memory_mb: float | None = None
    attempt: int = 1
    finished_at: dt.datetime | None = None
    run_id: str | None = None
    node: str | None = None

    def as_record(self) -> dict[str, Any]:
        unknown = set(self.metrics) - set(METRIC_COLUMNS)
        if unknown:
            raise KeyError(f"unknown metric column(s) {sorted(unknown)}; add them to METRIC_COLUMNS")
        record = {
            "id": self.id,
            "method": self.method,
            "status": self.status,
            "error": self.error,
            "retryable": self.retryable,
            "notes": "; ".join(self.notes) or None,
            "outputs": list(self.outputs.items()),
            "seed": _as_seed(self.seed),
            "backbone": self.backbone,
            "params": json.dumps(self.params, sort_keys=True, default=str),
            "seconds": self.seconds,
            "peak_memory_mb": self.peak_memory_mb,
            "attempt": self.attempt,
            "finished_at": self.finished_at or dt.datetime.now(dt.UTC),
            "run_id": self.run_id,
            "node": self.node,
        }
        for name in METRIC_COLUMNS:
            value = self.metrics.get(name)
            record[name] = None if value is None else float(value)
        return record


def _as_seed(value: Any) -> int | None:
    """The seed as the int64 column holds it, or None: a row's seed comes from its manifest or `--set`, and
    one that is no whole number in range ('abc', 7.5, 2**70; its row is an error, or the method ignores
    it) would otherwise fail its whole batch's table. `params` keeps the value as given."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if type(value) is int and -(2**63) <= value < 2**63 else None


def result_table(rows: list[ResultRow]) -> pa.Table:
    return pa.Table.from_pylist([r.as_record() for r in rows], schema=RESULT_SCHEMA)
