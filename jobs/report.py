"""`anima report OUTPUT [OUTPUT ...] [--out DIR]`: one static HTML page to judge a job by.

    OUTPUT/report/index.html    the page: runs, error reasons, a histogram per metric, and a table of the
                                latest row of every id (sortable, filtered by status, method and text,
                                paged), with a playing preview of its output beside its inputs
    OUTPUT/report/thumbs/       small animated WebPs (or small SVGs rebuilt from their shapes) that the
                                page shows

The page needs no server and nothing from the internet: its CSS, JS and the table's data are in the
file; the rows are a JSON blob that the page's script pages through, so 10⁵ rows stay one quick page
and only the shown page's thumbnails are loaded (lazily). Thumbnails are made on the driver from the
artifacts and inputs (read through fsspec, like every reader in anima), at most `THUMB_PX` pixels and
`THUMB_FRAMES` frames, named after the file and the row's finish time so a rebuilt report reuses them.
A file that is gone shows "missing". Several outputs side by side (`anima report A B`) compare two
settings on the same ids. Every string from the data is escaped by Jinja2's autoescape, the JSON blob
by its `tojson`, and the script writes data into the page only as text.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, features

from jobs import resume, summary
from jobs.runner import JobError, read_manifest
from pipelines import media
from schemas import METRIC_COLUMNS, OK

REPORT_DIR = "report"
THUMB_PX = 160
THUMB_FRAMES = 8
THUMB_SVG_BYTES = 512 * 2**10  # an SVG this small is shown as its shapes (media.shapes_only_svg)
# Thumbnails are made on the driver, several at once: a manifest's 2 GiB inputs (media.MAX_INPUT_BYTES)
# read whole for a preview would take gigabytes of the head node's memory each.
THUMB_INPUT_BYTES = 256 * 2**20
HISTOGRAM_BINS = 20
# The rows table shows at most this many ids (the page carries each one's data, and each has thumbnails
# to make): every id whose latest row is an error first, then an even sample of the rest. Counts, error
# reasons and histograms always cover every id.
TABLE_ROWS = 10_000
# The result columns the page reads (not params, seed, backbone, node): a million rows' history is read.
PAGE_COLUMNS = [
    *resume.HISTORY_COLUMNS, "method", "error", "notes", "outputs", "attempt", "seconds", "peak_memory_mb",
    *METRIC_COLUMNS,
]  # fmt: skip
TEXT_CHARS = 1000  # error, prompt and notes are cut to this in the page; the Parquet rows keep them whole
_WEBP = features.check("webp")

# The output a row is previewed by, best first (a method's `outputs` names); evaluation rows have none and
# are previewed by the video they scored.
PREVIEW_OUTPUTS = ("side_by_side", "animated_svg", "mp4", "gif", "image")
# Manifest columns that are a row's inputs, shown beside its output; `video` is an input except in an
# evaluation, where it is what was scored.
INPUT_COLUMNS = ("svg", "image", "end_image", "video", "source_video", "style", "mask")
PROMPT_COLUMNS = ("prompt", "source_prompt", "target_prompt")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov", ".mkv", ".avi")
# Per-output fields of a table cell, in the order the page's script reads them.
CELL_FIELDS = (
    "status", "method", "error", "prompt", "notes", "attempt", "finished_at", "seconds", "peak_memory_mb",
    *METRIC_COLUMNS, "preview", "inputs",
)  # fmt: skip
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("jobs", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


@dataclass
class Output:
    """One job output folder, as the report reads it."""

    uri: str
    latest: pa.Table | None
    runs: list[dict[str, Any]]
    manifests: list[str]  # the runs' manifests, newest first: where the shown rows' inputs are read
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1] or self.uri


def read_output(uri: str) -> Output:
    """The latest row of every id (the columns the page reads), the runs' summaries and their manifests."""
    results = resume.read_results(media.join(uri, "results"), PAGE_COLUMNS)
    latest = resume.latest(results) if results is not None else None
    del results
    records = resume.run_records(uri)
    runs = [record for record in records.values() if record]
    problems = [] if latest is not None else [f"no result rows under {media.join(uri, 'results')}"]
    problems += [
        f"run {run_id} not shown: its record {resume.run_record_uri(uri, run_id)} cannot be read or is empty"
        for run_id, record in records.items()
        if not record
    ]
    manifests = list(dict.fromkeys(run["manifest"] for run in reversed(runs) if run.get("manifest")))
    return Output(uri, latest, runs, manifests, problems)


def _inputs(output: Output, ids: pa.Array) -> dict[str, dict[str, Any]]:
    """id -> the input and prompt columns of its manifest row, for the `ids` shown; the newest run's
    manifest wins. A manifest that cannot be read costs those previews (named), not the report."""
    inputs: dict[str, dict[str, Any]] = {}
    for manifest in output.manifests:
        try:
            table = read_manifest(manifest, ["id", *INPUT_COLUMNS, *PROMPT_COLUMNS], ids)
        except Exception as exc:  # moved, deleted, or its ids are no text
            output.problems.append(f"inputs not shown: cannot read manifest {manifest}: {exc}")
            continue
        for row in table.to_pylist():
            inputs.setdefault(row["id"], row)
    return inputs


def table_ids(outputs: list[Output], limit: int = TABLE_ROWS) -> tuple[pa.Array, int]:
    """The ids the rows table shows, in id order, and how many ids the outputs have: all of them, or past
    `limit` every id whose latest row is an error in any output (the first `limit`), then ids spread
    evenly over the rest."""
    tables = [output.latest.select(["id", "status"]) for output in outputs if output.latest is not None]
    if not tables:
        return pa.array([], pa.string()), 0
    rows = pa.concat_tables(tables)
    rows = rows.append_column("error", pc.not_equal(rows.column("status"), OK))
    ids = rows.group_by("id").aggregate([("error", "any")]).sort_by("id")
    if ids.num_rows <= limit:
        return ids.column("id").combine_chunks(), ids.num_rows
    failed = ids.column("id").filter(ids.column("error_any")).slice(0, limit)
    rest = ids.column("id").filter(pc.invert(ids.column("error_any")))
    room = min(limit - len(failed), len(rest))
    sample = rest.take(media.frame_indices(len(rest), room)) if room else rest.slice(0, 0)
    shown = pa.concat_arrays([*failed.chunks, *sample.chunks])
    return shown.take(pc.sort_indices(shown)), ids.num_rows


# -- thumbnails -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thumb:
    """What to make: the file a preview shows, and where its thumbnail goes in the report folder."""

    uri: str
    name: str  # thumbs/<digest>.<suffix>, relative to index.html


def _thumb(uri: str, stamp: str) -> Thumb | None:
    lower = uri.lower()
    if media.is_url_chain(uri):
        return None  # opening one may fetch or index whole objects (media._read refuses them as inputs)
    if lower.endswith(".svg"):
        suffix = "svg"
    elif lower.endswith(_IMAGE_SUFFIXES + _VIDEO_SUFFIXES):
        suffix = "webp" if _WEBP else "gif"
    else:
        return None  # a folder (frames, masks) or a file kind with no preview
    digest = hashlib.sha1(f"{uri}\0{stamp}".encode()).hexdigest()[:20]
    return Thumb(uri, f"thumbs/{digest}.{suffix}")


def _encode(frames: np.ndarray, suffix: str) -> bytes:
    """Frames [F, H, W, 3] as an animated WebP/GIF at most THUMB_PX on the long side."""
    images = []
    for frame in frames:
        image = Image.fromarray(frame)
        image.thumbnail((THUMB_PX, THUMB_PX))
        images.append(image)
    buffer = io.BytesIO()
    fmt = {"webp": "WEBP", "gif": "GIF"}[suffix]
    options = {"quality": 70} if fmt == "WEBP" else {}
    images[0].save(buffer, fmt, save_all=True, append_images=images[1:], duration=125, loop=0, **options)
    return buffer.getvalue()


def make_thumbnail(thumb: Thumb, report: str) -> str | None:
    """Write one thumbnail (unless an earlier report did); None when done, else why there is none."""
    target = media.join(report, thumb.name)
    if media.exists(target):
        return None
    try:
        if not media.exists(thumb.uri):
            return "missing"
        if thumb.name.endswith(".svg"):
            text = media.read_svg(thumb.uri)
            if len(text.encode()) > THUMB_SVG_BYTES:
                return "too large to preview"
            media.write_text(media.shapes_only_svg(text), target)
            return None
        lower = thumb.uri.lower()
        if lower.endswith(_IMAGE_SUFFIXES):
            frames = media.read_image(thumb.uri, max_bytes=THUMB_INPUT_BYTES)[None]
        else:
            frames, _ = media.read_sampled_video(thumb.uri, None, THUMB_FRAMES, THUMB_INPUT_BYTES)
        media.write_bytes(_encode(frames, thumb.name.rsplit(".", 1)[-1]), target)
    except Exception as exc:  # one bad file or URI (foo://x.png) costs its preview, not the report
        return f"unreadable: {exc}"
    return None


def make_thumbnails(thumbs: set[Thumb], report: str) -> dict[Thumb, str | None]:
    """Every thumbnail, on a few threads (decoding and storage I/O release the GIL)."""
    ordered = sorted(thumbs, key=lambda t: t.name)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(ordered, pool.map(lambda t: make_thumbnail(t, report), ordered), strict=True))


# -- the page's data ------------------------------------------------------------------------------


def _cut(text: str | None) -> str | None:
    return text if text is None or len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + "…"


def _number(value: Any) -> float | None:
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def _prompt(inputs: dict[str, Any]) -> str | None:
    if inputs.get("prompt"):
        return inputs["prompt"]
    if inputs.get("source_prompt") or inputs.get("target_prompt"):
        return f"{inputs.get('source_prompt') or ''} → {inputs.get('target_prompt') or ''}"
    return None


def _row_media(row: dict[str, Any], inputs: dict[str, Any]) -> tuple[str | None, list[tuple[str, str]]]:
    """The URI a row is previewed by, and its inputs as (label, URI)."""
    outputs = dict(row.get("outputs") or [])
    evaluation = row["method"] == "evaluate"
    preview = inputs.get("video") if evaluation else next(
        (outputs[name] for name in PREVIEW_OUTPUTS if outputs.get(name)), None
    )  # fmt: skip
    shown = []
    for column in INPUT_COLUMNS:
        if column == "video" and evaluation:
            continue
        values = inputs.get(column)
        for i, uri in enumerate(values if isinstance(values, list) else [values] if values else []):
            shown.append(
                (f"{column} {i + 1}" if isinstance(values, list) and len(values) > 1 else column, uri)
            )
    return preview, shown


def _stamp(row: dict[str, Any]) -> str:
    finished = row.get("finished_at")
    return finished.isoformat() if isinstance(finished, dt.datetime) else str(finished)


def _cells(output: Output, ids: pa.Array) -> tuple[dict[str, list[Any]], set[Thumb]]:
    """id -> its cell (CELL_FIELDS) with previews as Thumb placeholders, and every thumbnail wanted: for
    the `ids` shown."""
    cells: dict[str, list[Any]] = {}
    thumbs: set[Thumb] = set()
    if output.latest is None:
        return cells, thumbs
    rows = output.latest.filter(pc.is_in(output.latest.column("id"), value_set=ids))
    manifest_rows = _inputs(output, ids)
    for row in rows.to_pylist():
        inputs = manifest_rows.get(row["id"], {})
        preview_uri, input_uris = _row_media(row, inputs)
        preview = _thumb(preview_uri, _stamp(row)) if preview_uri else None
        shown = [(label, _thumb(uri, "")) for label, uri in input_uris]
        thumbs.update(t for t in (preview, *(t for _, t in shown)) if t is not None)
        finished = row.get("finished_at")
        cells[row["id"]] = [
            row["status"],
            row["method"],
            _cut(row.get("error")),
            _cut(_prompt(inputs)),
            _cut(row.get("notes")),
            row.get("attempt"),
            finished.strftime("%Y-%m-%d %H:%M:%S") if isinstance(finished, dt.datetime) else None,
            _number(row.get("seconds")),
            _number(row.get("peak_memory_mb")),
            *(_number(row.get(name)) for name in METRIC_COLUMNS),
            preview if preview is not None else ("no output" if preview_uri is None else "no preview"),
            shown,
        ]
    return cells, thumbs


def _shown(value: Any, made: dict[Thumb, str | None]) -> Any:
    """A preview for the page: {"src": ...} when its thumbnail exists, else {"state": why not}."""
    if isinstance(value, Thumb):
        problem = made.get(value)
        return {"src": value.name} if problem is None else {"state": problem}
    return {"state": value}


def histograms(outputs: list[Output]) -> list[dict[str, Any]]:
    """Per metric with values: counts in shared bins per output, and the papers' values to mark; over
    every id's latest ok row, column-wise."""
    plots = []
    for name in METRIC_COLUMNS:
        values, methods = [], set()
        for output in outputs:
            latest = output.latest
            if latest is None:
                values.append(np.array([], np.float64))
                continue
            column = latest.column(name)
            ok = pc.fill_null(pc.and_(pc.equal(latest.column("status"), OK), pc.is_finite(column)), False)
            values.append(column.filter(ok).to_numpy())
            methods.update(latest.column("method").filter(ok).unique().to_pylist())
        if not any(len(vs) for vs in values):
            continue
        references = [
            {"value": summary.PAPER_METRICS[(m, name)][0], "source": summary.PAPER_METRICS[(m, name)][1]}
            for m in sorted(methods)
            if (m, name) in summary.PAPER_METRICS
        ]
        everything = np.concatenate([*values, np.array([r["value"] for r in references], np.float64)])
        low, high = float(everything.min()), float(everything.max())
        if high == low:  # one value: a narrow range around it
            low, high = low - 0.01 * (abs(low) or 1.0), high + 0.01 * (abs(high) or 1.0)
        counts = [np.histogram(vs, bins=HISTOGRAM_BINS, range=(low, high))[0].tolist() for vs in values]
        plots.append(
            {
                "metric": name,
                "low": low,
                "high": high,
                "counts": counts,
                "n": [len(vs) for vs in values],
                "means": [float(vs.mean()) if len(vs) else None for vs in values],
                "references": references,
            }
        )
    return plots


def page_data(outputs: list[Output], report: str, table_rows: int = TABLE_ROWS) -> dict[str, Any]:
    """Everything the rows table shows (`table_ids`); makes their thumbnails on the way."""
    shown_ids, total = table_ids(outputs, table_rows)
    per_output = [_cells(output, shown_ids) for output in outputs]
    made = make_thumbnails(set().union(*(thumbs for _, thumbs in per_output)), report)
    ids = shown_ids.to_pylist()  # each is an id of some output's cells, in id order
    preview, inputs = CELL_FIELDS.index("preview"), CELL_FIELDS.index("inputs")
    rows = []
    for row_id in ids:
        row = []
        for cells, _ in per_output:
            cell = cells.get(row_id)
            if cell is not None:
                cell[preview] = _shown(cell[preview], made)
                cell[inputs] = [[label, _shown(t, made)] for label, t in cell[inputs]]
            row.append(cell)
        rows.append([row_id, row])
    metrics = [
        name
        for name in METRIC_COLUMNS
        if any(
            cell is not None and cell[CELL_FIELDS.index(name)] is not None for _, row in rows for cell in row
        )
    ]
    return {
        "outputs": [o.name for o in outputs],
        "fields": CELL_FIELDS,
        "metrics": metrics,
        "rows": rows,
        "total": total,
        "limit": table_rows,
    }


def _errors(output: Output) -> list[dict[str, Any]]:
    if output.latest is None:
        return []
    return summary.top_errors(output.latest.column("error").chunks, most=None)


def write_report(uris: list[str], out: str | None = None, table_rows: int = TABLE_ROWS) -> str:
    """Write the report of one output (or several side by side) and return the URI of its index.html."""
    if table_rows < 1:
        raise JobError(f"--table-rows must be at least 1, got {table_rows}")
    report = out or media.join(uris[0], REPORT_DIR if len(uris) == 1 else f"{REPORT_DIR}-compare")
    outputs = [read_output(uri) for uri in uris]
    data = page_data(outputs, report, table_rows)
    statuses = [
        Counter() if o.latest is None else summary.count_values(o.latest.column("status")) for o in outputs
    ]
    html = _TEMPLATES.get_template("report.html.j2").render(
        outputs=outputs,
        statuses=statuses,
        errors=[_errors(o) for o in outputs],
        histograms=histograms(outputs),
        data=data,
        created=f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
    )
    index = media.join(report, "index.html")
    media.write_text(html, index)
    return index


def add_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="write a static HTML report of job outputs")
    p.add_argument(
        "outputs", nargs="+", metavar="OUTPUT", help="job output folder(s); two or more side by side"
    )
    p.add_argument("--out", default=None, metavar="DIR", help="report folder (default OUTPUT/report)")
    p.add_argument(
        "--table-rows",
        type=int,
        default=TABLE_ROWS,
        metavar="N",
        help=f"ids in the rows table, errors first (default {TABLE_ROWS}); counts and histograms cover all",
    )
