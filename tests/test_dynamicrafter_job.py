"""`anima generate dynamicrafter` end to end on the test Ray cluster: modes, outputs, metrics, bad rows."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import resume
from jobs.cli import main
from pipelines import media

SETS = ["steps=2", "num_frames=4", "height=64", "width=64"]


def test_generate_dynamicrafter_in_every_mode_with_bad_rows(ray_cluster, tmp_path, data_dir):
    folder = data_dir / "images" if (data_dir / "images").exists() else data_dir
    dance, guitar = str(folder / "dance1.jpeg"), str(folder / "guitar0.jpeg")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = [
        ("animate", dance, "two people dancing", None, "animate", None),
        ("loop", guitar, "bear playing guitar happily, snowing", None, "loop", None),
        ("interpolate", dance, "dancing", guitar, "interpolate", None),
        ("late_frame", guitar, "a bear", None, "animate", 2),
        ("broken", str(broken), "anything", None, "animate", None),
        ("missing", str(tmp_path / "none.png"), "anything", None, "animate", None),
        ("no_end", dance, "anything", None, "interpolate", None),
        ("no_prompt", dance, "", None, "animate", None),
    ]
    names = ["id", "image", "prompt", "end_image", "mode", "frame_index"]
    table = pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)})
    table = table.set_column(5, "frame_index", pa.array([r[5] for r in rows], pa.int64()))
    manifest = tmp_path / "images.parquet"
    pq.write_table(table, manifest)
    out = tmp_path / "out"
    args = ["generate", "dynamicrafter", "--manifest", str(manifest), "--output", str(out), "--clip", "tiny"]
    args += ["--backbone", "tiny"]
    args += [a for s in SETS for a in ("--set", s)] + ["--batch-size", "4", "--actors", "2"]
    assert main(args) == 0

    results = {r["id"]: r for r in resume.latest(resume.read_results(str(out / "results"))).to_pylist()}
    assert sorted(results) == sorted(r[0] for r in rows)
    errors = {i: r["error"] for i, r in results.items() if r["status"] == "error"}
    assert sorted(errors) == ["broken", "missing", "no_end", "no_prompt"]
    assert "broken.png" in errors["broken"] and "none.png" in errors["missing"]
    assert "needs an end_image" in errors["no_end"]
    assert "empty prompt" in errors["no_prompt"]
    for row_id in ("animate", "loop", "interpolate", "late_frame"):
        row = results[row_id]
        assert row["status"] == "ok", row["error"]
        info = media.video_info(dict(row["outputs"])["mp4"])
        # A loop drops its last frame, which repeats the first.
        assert (info.num_frames, info.height, info.width) == (3 if row_id == "loop" else 4, 64, 64)
        for metric in ("clip_image", "clip_text", "clip_temporal"):
            assert row[metric] is not None, metric
        assert row["pic"] is None and "no --adapter" in row["notes"]
