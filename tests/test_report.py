"""`anima report` in a real headless browser (Debian's chromium), on the demo's reports and on a bad output.

The page has a test hook (`index.html#selftest`): it pages through every row, loads every image, sorts by a
metric and filters by status through its own controls, and writes what it saw into the DOM, which
`chromium --headless --dump-dom` returns once the page is idle (`--virtual-time-budget`).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs import resume
from jobs.report import CELL_FIELDS, write_report
from pipelines import media
from schemas import ERROR, ResultRow, result_table

ARTIFACTS = Path(os.environ.get("ANIMA_TEST_ARTIFACTS", "/tmp/anima-test-artifacts"))
INJECTION = "<script>window.injected = 1</script><img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium; installed with apt when absent (the test setup runs as root in CI)."""
    found = shutil.which("chromium")
    if not found and shutil.which("apt-get") and os.geteuid() == 0:
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            subprocess.run(command, capture_output=True, timeout=600, check=False)
        found = shutil.which("chromium")
    if not found:
        print("SKIPPED: Debian's chromium package could not be installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed and could not be installed with apt-get")
    return found


def _chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _selftest(chromium: str, index: Path, tmp_path: Path) -> tuple[dict, str, list[str]]:
    """What the page's self-test saw, the DOM, and the browser's console lines."""
    run = _chromium(chromium, tmp_path / "profile", "--virtual-time-budget=20000", "--dump-dom",
                    f"{index.as_uri()}#selftest")  # fmt: skip
    found = re.search(r'<pre id="selftest-result">(.*?)</pre>', run.stdout, re.S)
    assert found and found.group(1), run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return json.loads(html.unescape(found.group(1))), run.stdout, console


def _ids(output: Path) -> set[str]:
    return set(resume.latest(resume.read_results(str(output / "results"))).column("id").to_pylist())


def test_every_demo_report_shows_every_id_with_loading_previews_sorts_and_filters(
    demo_output, chromium, tmp_path
):
    demo, _ = demo_output
    for method in ("evaluate", "livesketch", "dreammotion", "dynamicrafter", "stylecrafter"):
        seen, _, console = _selftest(chromium, demo / method / "report" / "index.html", tmp_path)
        ids = _ids(demo / method)
        assert sorted(seen["ids"]) == sorted(ids), method
        # No "missing" or "no preview" anywhere: every id's output and every input is a loaded image.
        assert seen["broken"] == [] and seen["states"] == [], (method, seen)
        assert seen["images"] > len(ids), method
        assert seen["errors"] == [] and console == [], (method, seen["errors"], console)
        assert seen["filtered"] == []  # every demo row is ok: the error filter hides them all
        if method == "evaluate":
            sort = seen["sort"]
            assert sort["column"] == "0:clip_text"
            rows = {
                r["id"]: r
                for r in resume.latest(resume.read_results(str(demo / method / "results"))).to_pylist()
            }
            assert sort["ascending"] == sorted(rows, key=lambda i: rows[i]["clip_text"]) != sort["before"]
            assert sort["descending"] == sort["ascending"][::-1]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    index = (demo / "evaluate" / "report" / "index.html").as_uri()
    _chromium(chromium, tmp_path / "profile", "--window-size=1400,1100", "--virtual-time-budget=5000",
              f"--screenshot={shot}", index)  # fmt: skip
    assert shot.stat().st_size > 10_000
    print(f"screenshot of the evaluate report: {shot}")


@pytest.fixture(scope="module")
def bad_output(tmp_path_factory) -> Path:
    """An output with one good row, one whose artifacts were deleted, and one error row whose message
    carries markup."""
    out = tmp_path_factory.mktemp("bad") / "out"
    frames = np.stack([np.full((24, 32, 3), 40 * i, np.uint8) for i in range(4)])
    rows = []
    for row_id in ("kept", "deleted"):
        video = media.write_video(frames, str(out / "artifacts" / row_id / "video.mp4"))
        rows.append(
            ResultRow(id=row_id, method="dynamicrafter", outputs={"mp4": video}, metrics={"clip_text": 0.2})
        )
    shutil.rmtree(out / "artifacts" / "deleted")
    rows.append(
        ResultRow(id="failed", method="dynamicrafter", status=ERROR, error=f"row 'failed': {INJECTION}")
    )
    (out / "results").mkdir()
    pq.write_table(result_table(rows), out / "results" / "run.parquet")
    # What a run killed before its summary leaves: the record of what it was asked (runner.run_job).
    manifest = out.parent / "manifest.parquet"
    pq.write_table(pa.table({"id": ["kept", "deleted", "failed"]}), manifest)
    record = {"run_id": "20261207T000000Z-killed", "method": "dynamicrafter", "manifest": str(manifest),
              "started_at": "2026-12-07T00:00:00+00:00", "models": {}, "params": {}}  # fmt: skip
    (out / "runs").mkdir()
    (out / "runs" / "20261207T000000Z-killed.json").write_text(json.dumps(record))
    (out / "runs" / "20261206T000000Z-torn.json").write_text('{"run_id": "20261206T')  # not anima's writes
    return out


def test_deleted_artifacts_show_missing_and_the_status_filter_keeps_only_error_rows(
    bad_output, chromium, tmp_path
):
    index = Path(write_report([str(bad_output)]))
    seen, dom, console = _selftest(chromium, index, tmp_path)
    assert sorted(seen["ids"]) == ["deleted", "failed", "kept"]
    assert seen["states"] == ["missing", "no output"] and seen["broken"] == [] and seen["images"] == 1
    assert seen["filtered"] == [["error"]]
    assert seen["errors"] == [] and console == []
    assert INJECTION not in dom and html.escape(INJECTION, quote=False) in dom  # shown as text, never run
    assert "20261207T000000Z-killed" in dom and "stopped before it finished" in dom
    assert "run 20261206T000000Z-torn not shown: its record" in dom  # named, and the rest still shown


def test_two_outputs_side_by_side_pair_the_same_ids(bad_output, chromium, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(bad_output, other, ignore=shutil.ignore_patterns("report"))
    results = other / "results" / "run.parquet"
    table = pq.read_table(results)
    pq.write_table(table.filter(pc.not_equal(table.column("id"), "failed")), results)
    index = Path(write_report([str(bad_output), str(other)], str(tmp_path / "compare")))
    page = index.read_text()
    data = json.loads(
        re.search(r'<script id="report-data" type="application/json">(.*?)</script>', page, re.S)[1]
    )
    assert data["outputs"] == ["out", "other"]
    cells = {row_id: cells for row_id, cells in data["rows"]}
    assert cells["failed"][1] is None and cells["failed"][0][CELL_FIELDS.index("status")] == "error"
    assert [c[CELL_FIELDS.index("clip_text")] for c in cells["kept"]] == [0.2, 0.2]
    seen, _, console = _selftest(chromium, index, tmp_path)
    assert sorted(seen["ids"]) == ["deleted", "failed", "kept"]
    assert seen["states"] == ["missing", "missing", "no output"]
    assert seen["errors"] == [] and console == []


def test_an_svg_thumbnail_keeps_the_shapes_and_nothing_that_runs(data_dir, tmp_path):
    """A browser runs the scripts of an SVG opened by itself, and an input sketch is the manifest's: its
    thumbnail, a file of the report, is the document's shapes alone (their paint and SMIL animation)."""
    from jobs.report import Thumb, make_thumbnail
    from pipelines.livesketch.svg import animated_svg, load_sketch, parse_svg

    hostile = tmp_path / "hostile.svg"
    hostile.write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="64"'
        ' height="64" onload="alert(1)"><script>alert(2)</script>'
        '<a xlink:href="javascript:alert(3)"><path d="M0 0 L5 5"/></a>'
        '<foreignObject><div xmlns="http://www.w3.org/1999/xhtml" onclick="alert(4)">x</div></foreignObject>'
        '<path d="M1 1 L20 20" stroke="red" style="fill:red" fill="url(http://tracker/p)" onclick="alert(5)">'
        '<animate attributeName="href" to="javascript:alert(6)"/><set attributeName="onclick" to="x()"/>'
        '<animate attributeName="stroke-width" values="1;3" dur="1s"/></path>'
        '<use href="http://elsewhere/x.svg#a"/><image href="http://elsewhere/p.png"/></svg>'
    )
    sketch_uri = str(sorted((data_dir / "sketches").glob("*.svg"))[0])
    sketch = load_sketch(sketch_uri)
    animated = tmp_path / "animated.svg"
    animated.write_text(animated_svg(sketch, np.stack([sketch.points.numpy()] * 3), fps=8))
    report = str(tmp_path / "report")
    for name, uri in (("hostile", hostile), ("sketch", sketch_uri), ("animated", animated)):
        assert make_thumbnail(Thumb(str(uri), f"thumbs/{name}.svg"), report) is None
    shown = (tmp_path / "report" / "thumbs" / "hostile.svg").read_text()
    assert shown.startswith('<svg width="64" height="64" xmlns="http://www.w3.org/2000/svg">')
    for word in ("alert", "script", "onload", "onclick", "href", "foreignObject", "style", "url(", "<use"):
        assert word not in shown, (word, shown)
    assert '<path d="M1 1 L20 20" stroke="red">' in shown and 'attributeName="stroke-width"' in shown
    same = parse_svg((tmp_path / "report" / "thumbs" / "sketch.svg").read_text())
    assert np.array_equal(same.points, sketch.points) and len(same.paths) == len(sketch.paths)
    loop = (tmp_path / "report" / "thumbs" / "animated.svg").read_text()
    assert loop.count('<animate attributeName="d"') == len(sketch.paths)

    # A CSS escape is url( to a browser; a nesting deep enough to exhaust recursion, and a file whose
    # declared encoding parses as bytes but not as the UTF-8 text read_svg returns, cost the preview only.
    escaped = tmp_path / "escaped.svg"
    escaped.write_text(
        '<svg xmlns="http://www.w3.org/2000/svg"><rect width="9" height="9"'
        ' fill="u\\rl(http://tracker/a#g) red" stroke="\\75 rl(http://tracker/b#g)"/></svg>'
    )
    deep = tmp_path / "deep.svg"
    deep.write_text('<svg xmlns="http://www.w3.org/2000/svg">' + "<g>" * 2000 + "</g>" * 2000 + "</svg>")
    latin = tmp_path / "latin.svg"
    latin.write_text(
        '<?xml version="1.0" encoding="ISO-8859-1"?><svg xmlns="http://www.w3.org/2000/svg">'
        '<path d="M0 0 \ufffe"/></svg>'
    )
    assert make_thumbnail(Thumb(str(escaped), "thumbs/escaped.svg"), report) is None
    assert "rl(" not in (tmp_path / "report" / "thumbs" / "escaped.svg").read_text()
    assert "nested more than 256 deep" in make_thumbnail(Thumb(str(deep), "thumbs/deep.svg"), report)
    assert "invalid XML" in make_thumbnail(Thumb(str(latin), "thumbs/latin.svg"), report)


def test_a_thumbnail_never_reads_an_input_past_its_own_limit(tmp_path, monkeypatch):
    """Thumbnails are made on the driver, several at once: an input is read for one only up to
    THUMB_INPUT_BYTES (a manifest's 2 GiB inputs would each take gigabytes of the head node)."""
    from jobs import report
    from jobs.report import Thumb, make_thumbnail

    demo_data = Path(__file__).resolve().parents[1] / "jobs" / "demo_data"
    clip, image = demo_data / "bird000.mp4", demo_data / "dance1.jpeg"
    out = str(tmp_path / "report")
    assert make_thumbnail(Thumb(str(clip), "thumbs/clip.webp"), out) is None
    assert make_thumbnail(Thumb(str(image), "thumbs/image.webp"), out) is None
    assert report._thumb("reference::http://elsewhere/refs.json", "") is None  # not even opened
    assert make_thumbnail(Thumb("foo://x.png", "thumbs/foo.webp"), out).startswith("unreadable")
    monkeypatch.setattr(report, "THUMB_INPUT_BYTES", 40_000)  # under both files' sizes
    for uri, name in ((clip, "big-clip"), (image, "big-image")):
        why = make_thumbnail(Thumb(str(uri), f"thumbs/{name}.webp"), out)
        assert why is not None and why.startswith("unreadable") and "MiB limit" in why, why
        assert not (tmp_path / "report" / "thumbs" / f"{name}.webp").exists()


def test_past_its_row_limit_the_table_shows_every_error_then_an_even_sample_and_the_rest_counts_all(
    tmp_path,
):
    """At 10^5-10^6 rows the page cannot carry every row, nor the report make every row's thumbnails; the
    counts, error reasons and histograms still cover every id."""
    from jobs.report import histograms, page_data, read_output, table_ids

    out = tmp_path / "out"
    (out / "results").mkdir(parents=True)
    rows = [
        ResultRow(id=f"r{i:03d}", method="evaluate", metrics={"clip_text": i / 100})
        if i % 10 != 3
        else ResultRow(id=f"r{i:03d}", method="evaluate", status=ERROR, error=f"video not found: /v/{i}.mp4")
        for i in range(100)
    ]
    pq.write_table(result_table(rows), out / "results" / "run1_a.parquet")
    output = read_output(str(out))
    errors = [f"r{i:03d}" for i in range(3, 100, 10)]
    ids, total = table_ids([output], limit=20)
    shown = ids.to_pylist()
    assert total == 100 and len(shown) == 20 and shown == sorted(shown)
    assert set(errors) <= set(shown) and {"r000", "r099"} <= set(shown)  # the sample spans the rest
    assert table_ids([output], limit=4)[0].to_pylist() == errors[:4]
    assert table_ids([output], limit=100)[0].to_pylist() == [f"r{i:03d}" for i in range(100)]
    data = page_data([output], str(tmp_path / "report"), table_rows=20)
    assert [row_id for row_id, _ in data["rows"]] == shown and data["total"] == 100
    (clip,) = [h for h in histograms([output]) if h["metric"] == "clip_text"]
    assert clip["n"] == [90] and sum(clip["counts"][0]) == 90
    page = Path(write_report([str(out)], str(tmp_path / "page"), table_rows=20)).read_text()
    assert "The table shows 20 of 100 ids" in page and "100 ids:" in page and "10 error" in page
    with pytest.raises(Exception, match="--table-rows must be at least 1"):
        write_report([str(out)], str(tmp_path / "page"), table_rows=0)
