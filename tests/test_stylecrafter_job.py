"""`anima generate stylecrafter` end to end on the test Ray cluster: references, image mode, bad rows."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import resume
from jobs.cli import main
from pipelines import media

SETS = ["steps=2", "num_frames=3", "height=32", "width=48", "style_size=64"]


def test_generate_stylecrafter_with_one_and_two_references_and_bad_rows(ray_cluster, tmp_path, data_dir):
    folder = data_dir / "styles" if (data_dir / "styles").exists() else data_dir
    ink = str(folder / "ink_1.jpeg")
    other = str(folder / "oil_paint_2.jpg") if (folder / "oil_paint_2.jpg").exists() else ink
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    rows = [
        ("one", "A bear walking through a snowy forest", [ink], None),
        ("two", "A boat sailing on a lake", [ink, other], None),
        ("image", "A bear walking through a snowy forest", [ink], 1),
        ("none", "A boat", [], None),
        ("broken", "A boat", [str(broken)], None),
    ]
    table = pa.table(
        {
            "id": [r[0] for r in rows],
            "prompt": [r[1] for r in rows],
            "style": pa.array([r[2] for r in rows], pa.list_(pa.string())),
            "num_frames": pa.array([r[3] for r in rows], pa.int64()),
        }
    )
    manifest = tmp_path / "styles.parquet"
    pq.write_table(table, manifest)
    out = tmp_path / "out"
    args = ["generate", "stylecrafter", "--manifest", str(manifest), "--output", str(out), "--clip", "tiny"]
    args += ["--backbone", "tiny"]
    args += [a for s in SETS for a in ("--set", s)] + ["--batch-size", "3", "--actors", "2"]
    assert main(args) == 0

    results = {r["id"]: r for r in resume.latest(resume.read_results(str(out / "results"))).to_pylist()}
    assert sorted(results) == sorted(r[0] for r in rows)
    errors = {i: r["error"] for i, r in results.items() if r["status"] == "error"}
    assert sorted(errors) == ["broken", "none"]
    assert "no style images" in errors["none"] and "broken.jpg" in errors["broken"]
    for row_id in ("one", "two"):
        row = results[row_id]
        assert row["status"] == "ok", row["error"]
        info = media.video_info(dict(row["outputs"])["mp4"])
        assert (info.num_frames, info.height, info.width) == (3, 32, 48)
        for metric in ("clip_text", "clip_style", "clip_temporal"):
            assert row[metric] is not None, metric
    image = results["image"]
    assert image["status"] == "ok" and set(dict(image["outputs"])) == {"image"}
    assert image["clip_style"] is not None and image["clip_temporal"] is None
