"""What a run did, for the person who submitted it: counts, throughput, errors, metrics, where things are.

Computed on the driver from the result files (not a Ray shuffle), printed, and saved as
OUTPUT/summary.json and OUTPUT/metrics_summary.json.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from jobs import resume
from pipelines import media
from schemas import METRIC_COLUMNS, OK

if TYPE_CHECKING:
    from jobs.runner import JobSpec


# What the paper reports for the metrics it shares with anima, printed beside the run's means.
# LiveSketch Table 1a: sketch-to-video consistency (CLIP, our clip_image) and text-to-video alignment
# (X-CLIP) with ModelScope; the CLIP and X-CLIP checkpoints behind them are not known.
PAPER_METRICS: dict[str, dict[str, float]] = {"livesketch": {"clip_image": 0.965, "xclip_text": 0.142}}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def metric_table(latest: pa.Table) -> dict[str, dict[str, float | int]]:
    """Mean, std and count of every metric over the latest ok rows (finite values only)."""
    ok = latest.filter(pc.equal(latest.column("status"), OK))
    table = {}
    for name in METRIC_COLUMNS:
        values = [v for v in ok.column(name).to_pylist() if v is not None and math.isfinite(v)]
        if values:
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            table[name] = {"mean": mean, "std": std, "n": len(values)}
    return table


def build(
    manifest: pa.Table, spec: JobSpec, run_id: str, skipped: int, processed: int, wall_s: float
) -> dict[str, Any]:
    results_uri = media.join(spec.output, "results")
    columns = [*resume.HISTORY_COLUMNS, "error", "seconds", *METRIC_COLUMNS]
    everything = resume.read_results(results_uri, columns)
    latest = (
        resume.latest(everything.filter(pc.is_in(everything.column("id"), value_set=manifest.column("id"))))
        if everything
        else None
    )
    run = latest.filter(pc.equal(latest.column("run_id"), run_id)) if latest is not None else None

    statuses = Counter(run.column("status").to_pylist()) if run is not None else Counter()
    seconds = [s for s in run.column("seconds").to_pylist() if s is not None] if run is not None else []
    errors = Counter(
        e.split(": ", 1)[-1][:200] for e in (run.column("error").to_pylist() if run is not None else []) if e
    )
    gpu_seconds = wall_s * spec.actors * spec.gpus_per_actor / processed if processed else None
    overall = Counter(latest.column("status").to_pylist()) if latest is not None else Counter()
    return {
        "run_id": run_id,
        "method": spec.method,
        "manifest": spec.manifest,
        "rows": manifest.num_rows,
        "skipped": skipped,
        "processed": processed,
        "ok": statuses.get(OK, 0),
        "error": processed - statuses.get(OK, 0),
        "overall": {"ok": overall.get(OK, 0), "not_ok": manifest.num_rows - overall.get(OK, 0)},
        "wall_seconds": wall_s,
        "rows_per_second": processed / wall_s if processed and wall_s else None,
        "seconds_per_row": _mean(seconds),
        "gpu_seconds_per_row": gpu_seconds,
        "items_per_gpu_hour": 3600 / gpu_seconds if gpu_seconds else None,
        "actors": spec.actors,
        "gpus_per_actor": spec.gpus_per_actor,
        "top_errors": [{"count": n, "error": e} for e, n in errors.most_common(10)],
        "metrics": metric_table(latest) if latest is not None else {},
        "outputs": {
            "results": results_uri,
            "artifacts": media.join(spec.output, "artifacts"),
            "summary": media.join(spec.output, "summary.json"),
            "metrics_summary": media.join(spec.output, "metrics_summary.json"),
        },
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        f"anima {report['method']} run {report['run_id']}",
        f"  rows {report['rows']}: processed {report['processed']} "
        f"(ok {report['ok']}, error {report['error']}), "
        f"skipped (settled earlier) {report['skipped']}; all runs: ok {report['overall']['ok']}, "
        f"not ok {report['overall']['not_ok']}",
        f"  wall {report['wall_seconds']:.1f} s"
        + (f", {report['rows_per_second']:.3f} rows/s" if report["rows_per_second"] else "")
        + (f", {report['seconds_per_row']:.2f} s per row in actors" if report["seconds_per_row"] else "")
        + (
            f", {report['items_per_gpu_hour']:.1f} items per GPU-hour" if report["items_per_gpu_hour"] else ""
        ),
    ]
    for err in report["top_errors"]:
        lines.append(f"  error x{err['count']}: {err['error']}")
    if report["metrics"]:
        paper = PAPER_METRICS.get(report["method"], {})
        lines.append("  metric                mean ± std        (n)" + ("    paper" if paper else ""))
        for name, m in report["metrics"].items():
            reported = f"    {paper[name]:.3f}" if name in paper else ""
            lines.append(f"  {name:<20} {m['mean']:>8.4f} ± {m['std']:<8.4f} ({m['n']}){reported}")
    lines += [f"  {k}: {v}" for k, v in report["outputs"].items()]
    return "\n".join(lines)


def save(report: dict[str, Any], output: str) -> None:
    print(render(report), flush=True)
    media.write_text(json.dumps(report, indent=2), report["outputs"]["summary"])
    media.write_text(json.dumps(report["metrics"], indent=2), report["outputs"]["metrics_summary"])
    media.write_text(json.dumps(report, indent=2), media.join(output, "runs", f"{report['run_id']}.json"))
