"""What a run did, for the person who submitted it: counts, throughput, errors, metrics, where things are.

Computed on the driver from the result files (not a Ray shuffle), printed, and saved as
OUTPUT/summary.json and OUTPUT/metrics_summary.json.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from jobs import resume
from pipelines import media
from schemas import METRIC_COLUMNS, OK

if TYPE_CHECKING:
    from jobs.runner import JobSpec


# The papers' own numbers for anima's metrics: (method, metric) -> value, source; printed beside a run's
# means and marked on the report's histograms. LiveSketch's CLIP and X-CLIP checkpoints are not known.
PAPER_METRICS: dict[tuple[str, str], tuple[float, str]] = {
    ("livesketch", "clip_image"): (0.965, "LiveSketch Tab. 1, sketch-to-video consistency"),
    ("livesketch", "xclip_text"): (0.142, "LiveSketch Tab. 1, text-to-video alignment"),
    ("dreammotion", "clip_temporal"): (0.9726, "DreamMotion Tab. 1 (ZeroScope), Frame-Con"),
    ("dreammotion", "lpips"): (0.3042, "DreamMotion Tab. 1 (ZeroScope), Frame-LPIPS"),
    ("stylecrafter", "clip_text"): (0.2726, "StyleCrafter Tab. 2, CLIP-Text"),
    ("stylecrafter", "clip_style"): (0.4531, "StyleCrafter Tab. 2, CLIP-Style"),
    ("stylecrafter", "clip_temporal"): (0.9892, "StyleCrafter Tab. 2, CLIP-Temp"),
}


def metric_table(latest: pa.Table) -> dict[str, dict[str, float | int]]:
    """Mean, std and count of every metric over the latest ok rows (finite values only).

    Arrow compute throughout, so a million rows never become Python floats on the driver."""
    ok = pc.equal(latest.column("status"), OK)
    table = {}
    for name in METRIC_COLUMNS:
        column = latest.column(name).filter(ok)  # one column at a time, not a copy of the table
        values = column.filter(pc.fill_null(pc.is_finite(column), False))
        if len(values):
            std = pc.stddev(values, ddof=0).as_py()
            table[name] = {"mean": pc.mean(values).as_py(), "std": std, "n": len(values)}
    return table


def count_values(column: pa.ChunkedArray) -> Counter:
    """Value -> count of a string column, counted by Arrow."""
    return Counter({c["values"]: c["counts"] for c in pc.value_counts(column).to_pylist()})


# A path or URI in an error message, masked to group the rows that failed the same way: a million missing
# files each name their own. A URL; a path from '/', './', '../' or '~/' (not a slash inside a word: "I/O",
# "16/16", a model id "openai/clip-vit"); a Windows path; a word ending in a media or data file's suffix.
_URI = (
    r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s,;'"()]*[^\s,;'"():.]"""
    r"""|\B(?:\.{1,2}|~)?/[^\s,;'"()]*[^\s,;'"():.]"""
    r"""|\b[A-Za-z]:\\[^\s,;'"()]*[^\s,;'"():.]"""
    r"""|[^\s,;'"()]+\.(?i:mp4|m4v|mpe?g|mov|avi|mkv|webm|gif|png|jpe?g|webp|bmp|tiff?|svg|parquet|json|npy|txt)\b"""
)
URI_MARK = "<uri>"
REASON_CHARS = 200  # of a kind and its example: a traceback's text would swamp the summary


def _reasons(errors: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Error messages without their "row 'id': " prefix (so equal reasons group), nulls dropped."""
    reasons = pc.replace_substring_regex(errors, r"^.*?: ", "", max_replacements=1)
    return reasons.filter(pc.invert(pc.is_null(reasons)))


def _kinds(errors: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Each kind of reason in `errors` (the reason with its paths and URIs masked, then cut to
    REASON_CHARS, so that the cut falls at the same place for every row of a kind): how many rows, and
    one reason of that kind (the first in text order)."""
    counts = pc.value_counts(_reasons(errors))  # each distinct message is masked once, not each row
    reasons = counts.field("values")
    kinds = pc.replace_substring_regex(reasons, _URI, URI_MARK)
    table = pa.table(
        {
            "error": pc.utf8_slice_codeunits(kinds, 0, REASON_CHARS),
            "count": counts.field("counts"),
            "example": pc.utf8_slice_codeunits(reasons, 0, REASON_CHARS),
        }
    )
    return _regroup(table)


def _regroup(table: pa.Table) -> pa.Table:
    grouped = table.group_by("error").aggregate([("count", "sum"), ("example", "min")])
    return pa.table(
        {"error": grouped["error"], "count": grouped["count_sum"], "example": grouped["example_min"]}
    )


def top_errors(errors: Iterable[pa.Array | pa.ChunkedArray], most: int | None = 10) -> list[dict[str, Any]]:
    """The `most` (None: all) commonest kinds of reason in the error columns `errors`, ties in text order:
    {"count", "error" (the kind, paths and URIs shown as <uri>), "example"}.

    Counted by Arrow one batch at a time and kept per kind, so a run of a million distinct messages
    (every missing file names its own URI) never holds them all, and reads as one reason, not a million.
    """
    kinds = [k for k in (_kinds(column) for column in errors) if k.num_rows]
    if not kinds:
        return []
    top = _regroup(pa.concat_tables(kinds)).sort_by([("count", "descending"), ("error", "ascending")])
    return top.slice(0, most).to_pylist() if most is not None else top.to_pylist()


def settings(spec: JobSpec) -> dict[str, Any]:
    """What a run's outputs depend on beyond its rows: the models it names (the CLI lists the ones it
    leaves out as None, the Python API may omit them) and its job parameters (`--set`)."""
    return {"models": {name: ref for name, ref in spec.models.items() if ref}, "params": spec.params}


def record_start(spec: JobSpec, run_id: str) -> None:
    """OUTPUT/runs/<run id>.json as a run starts (its summary replaces it at the end): what the run was
    asked, kept even when it is killed, so that a rerun can tell rows made with other settings."""
    started = dt.datetime.now(dt.UTC).isoformat()
    record = {"run_id": run_id, "method": spec.method, "manifest": spec.manifest, "started_at": started}
    media.write_text(
        json.dumps(record | settings(spec), indent=2, default=str), resume.run_record_uri(spec.output, run_id)
    )


def build(
    manifest: pa.Table,
    spec: JobSpec,
    run_id: str,
    skipped: int,
    processed: int,
    wall_s: float,
    kept_from_other_settings: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The run's report; `kept_from_other_settings`: earlier runs with other settings whose rows it kept
    (`resume.runs_with_other_settings`)."""
    results_uri = media.join(spec.output, "results")
    # Error messages are the bulk of a result file: only this run's error rows read them, below.
    everything = resume.read_results(results_uri, [*resume.HISTORY_COLUMNS, "seconds", *METRIC_COLUMNS])
    latest = None
    if everything is not None:
        # An output may hold rows of ids this manifest no longer has; copied without them only then.
        mine = pc.is_in(everything.column("id"), value_set=manifest.column("id"))
        latest = resume.latest(everything if pc.all(mine).as_py() else everything.filter(mine))
        del everything
    # This run's rows, column by column (a filtered copy of the table would double the peak at 10^6 rows).
    run = pc.equal(latest.column("run_id"), run_id) if latest is not None else None

    statuses = count_values(latest.column("status").filter(run)) if latest is not None else Counter()
    seconds_per_row = pc.mean(latest.column("seconds").filter(run)).as_py() if latest is not None else None
    failed = resume.scan_results(results_uri, ["error"], prefix=run_id, where=pc.field("status") != OK)
    gpu_seconds = wall_s * spec.actors * spec.gpus_per_actor / processed if processed else None
    overall = count_values(latest.column("status")) if latest is not None else Counter()
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
        "seconds_per_row": seconds_per_row,
        "gpu_seconds_per_row": gpu_seconds,
        "items_per_gpu_hour": 3600 / gpu_seconds if gpu_seconds else None,
        "actors": spec.actors,
        "gpus_per_actor": spec.gpus_per_actor,
        **settings(spec),
        "kept_from_other_settings": kept_from_other_settings or [],
        "top_errors": top_errors(batch.column("error") for batch in failed),
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
    for run in report["kept_from_other_settings"]:
        lines.append(
            f"  kept {run['rows']} settled row(s) of run {run['run_id']}, which had other settings: "
            f"models {run['models']}, params {run['params']}"
        )
    for err in report["top_errors"]:
        example = f" (e.g. {err['example']})" if err["example"] != err["error"] else ""
        lines.append(f"  error x{err['count']}: {err['error']}{example}")
    if report["metrics"]:
        paper = {n: v for (method, n), (v, _) in PAPER_METRICS.items() if method == report["method"]}
        lines.append("  metric                mean ± std        (n)" + ("    paper" if paper else ""))
        for name, m in report["metrics"].items():
            reported = f"    {paper[name]:.4g}" if name in paper else ""
            lines.append(f"  {name:<20} {m['mean']:>8.4f} ± {m['std']:<8.4f} ({m['n']}){reported}")
    lines += [f"  {k}: {v}" for k, v in report["outputs"].items()]
    return "\n".join(lines)


def save(report: dict[str, Any], output: str) -> None:
    print(render(report), flush=True)
    text = json.dumps(report, indent=2, default=str)
    media.write_text(text, report["outputs"]["summary"])
    media.write_text(json.dumps(report["metrics"], indent=2), report["outputs"]["metrics_summary"])
    media.write_text(text, resume.run_record_uri(output, report["run_id"]))  # replaces its start record
