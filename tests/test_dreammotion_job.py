"""`anima generate dreammotion` end to end on the test Ray cluster: outputs, metrics, masks, bad rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs import resume
from jobs.cli import main
from pipelines import media

SETS = ["steps=2", "num_frames=4", "height=32", "width=64"]


def _mask_folder(path, frames, height, width):
    mask = np.zeros((frames, height, width, 3), np.uint8)
    mask[:, :, : width // 2] = 255
    media.write_png_frames(mask, str(path))
    return str(path)


def test_generate_dreammotion_edits_with_masks_and_reports_bad_rows(ray_cluster, tmp_path, data_dir):
    shared = data_dir / "videos" / "locomotive.mp4"
    video = str(shared if shared.exists() else data_dir / "locomotive.mp4")
    info = media.video_info(video)  # 24 frames, 256x142
    short = tmp_path / "short.mp4"
    media.write_video(np.zeros((2, 32, 32, 3), np.uint8), str(short))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 then garbage")
    full_mask = _mask_folder(tmp_path / "mask", info.num_frames, info.height, info.width)
    wrong_count = _mask_folder(tmp_path / "mask5", 5, info.height, info.width)
    wrong_size = _mask_folder(tmp_path / "mask_small", info.num_frames, 50, 50)
    src, tgt = "A locomotive rides in a forest", "A car driving in a forest"
    rows = [
        ("masked", video, src, tgt, full_mask),
        ("whole", video, src, tgt, None),
        ("mask_frames", video, src, tgt, wrong_count),
        ("mask_size", video, src, tgt, wrong_size),
        ("short", str(short), src, tgt, None),
        ("broken", str(broken), src, tgt, None),
        ("no_target", video, src, " ", None),
    ]
    manifest = tmp_path / "videos.parquet"
    names = ["id", "video", "source_prompt", "target_prompt", "mask"]
    pq.write_table(pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)}), manifest)
    out = tmp_path / "out"
    args = ["generate", "dreammotion", "--manifest", str(manifest), "--output", str(out), "--clip", "tiny"]
    args += ["--backbone", "tiny"]
    args += [a for s in SETS for a in ("--set", s)] + ["--batch-size", "2", "--actors", "2"]
    assert main(args) == 0

    results = {r["id"]: r for r in resume.latest(resume.read_results(str(out / "results"))).to_pylist()}
    assert sorted(results) == sorted(r[0] for r in rows)
    errors = {i: r["error"] for i, r in results.items() if r["status"] == "error"}
    assert sorted(errors) == ["broken", "mask_frames", "mask_size", "no_target", "short"]
    assert "has 5 frames" in errors["mask_frames"] and "mask_frames" in errors["mask_frames"]
    assert "50x50" in errors["mask_size"]
    assert "2 frames, 4 requested" in errors["short"]
    assert "broken.mp4" in errors["broken"]
    assert "empty target_prompt" in errors["no_target"]

    for row_id in ("masked", "whole"):
        row = results[row_id]
        assert row["status"] == "ok", row["error"]
        outputs = dict(row["outputs"])
        assert set(outputs) == {"mp4", "gif", "side_by_side"}
        edit = media.video_info(outputs["mp4"])
        assert (edit.num_frames, edit.height, edit.width) == (4, 32, 64)
        side = media.video_info(outputs["side_by_side"])
        assert (side.height, side.width) == (32, 128)
        assert row["clip_text"] is not None and row["clip_temporal"] is not None
        assert row["lpips"] is None and "lpips: no LPIPS weights" in row["notes"]
    assert results["masked"]["outside_mask_psnr"] is not None
    assert results["whole"]["outside_mask_psnr"] is None
