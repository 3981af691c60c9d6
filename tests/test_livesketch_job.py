"""`anima generate livesketch` end to end on the test Ray cluster: outputs, metrics, bad rows."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from jobs import resume
from jobs.cli import main
from pipelines import media
from pipelines.livesketch.svg import load_sketch

SETS = ["steps=2", "num_frames=3", "height=32", "width=32", "dim=16", "video_size=48"]


def test_generate_livesketch_writes_every_output_and_one_row_per_input(ray_cluster, tmp_path, data_dir):
    sketches = data_dir / "sketches"
    not_svg = tmp_path / "photo.svg"
    not_svg.write_bytes(b"\x89PNG\r\n\x1a\n not an svg")
    empty = tmp_path / "empty.svg"
    empty.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="256" height="256"><g/></svg>')
    rows = [
        (
            "surfer",
            sketches / "surfer0_scaled1.svg",
            "A surfer riding and maneuvering on waves on a surfboard.",
        ),
        ("fish", sketches / "fish_scaled1.svg", "A fish swimming."),
        ("not_svg", not_svg, "anything"),
        ("empty_svg", empty, "anything"),
        ("missing", tmp_path / "nope.svg", "anything"),
        ("no_prompt", sketches / "butterfly_3_scaled1.svg", "   "),
    ]
    manifest = tmp_path / "sketches.parquet"
    pq.write_table(
        pa.table(
            {"id": [r[0] for r in rows], "svg": [str(r[1]) for r in rows], "prompt": [r[2] for r in rows]}
        ),
        manifest,
    )
    out = tmp_path / "out"
    args = [
        "generate",
        "livesketch",
        "--manifest",
        str(manifest),
        "--output",
        str(out),
        "--backbone",
        "tiny",
        "--clip",
        "tiny",
        "--xclip",
        "tiny",
        "--batch-size",
        "3",
        "--actors",
        "2",
    ]
    for s in SETS:
        args += ["--set", s]
    assert main(args) == 0

    table = resume.latest(resume.read_results(str(out / "results")))
    results = {r["id"]: r for r in table.to_pylist()}
    assert sorted(results) == sorted(r[0] for r in rows)
    errors = {i: r["error"] for i, r in results.items() if r["status"] == "error"}
    assert sorted(errors) == ["empty_svg", "missing", "no_prompt", "not_svg"]
    assert "no drawable paths" in errors["empty_svg"] and "empty_svg" in errors["empty_svg"]
    assert "not an SVG" in errors["not_svg"] or "not SVG" in errors["not_svg"]
    assert "nope.svg" in errors["missing"]
    assert "empty prompt" in errors["no_prompt"]
    assert not any(results[i]["retryable"] for i in errors)

    for row_id, svg in (("surfer", rows[0][1]), ("fish", rows[1][1])):
        row = results[row_id]
        assert row["status"] == "ok", row["error"]
        outputs = dict(row["outputs"])
        assert set(outputs) == {"svg_frames", "animated_svg", "mp4", "gif", "points", "field", "snapshots"}
        # snapshot_every=100 and 2 steps: the snapshot before the first step (the input, as official).
        [snapshot] = sorted(Path(outputs["snapshots"]).iterdir())
        assert snapshot.name == "step_0000.gif" and media.video_info(str(snapshot)).num_frames == 3
        for name in ("mp4", "gif"):
            info = media.video_info(outputs[name])
            assert (info.num_frames, info.height, info.width) == (3, 48, 48)
        points = np.load(outputs["points"])
        sketch = load_sketch(str(svg))
        assert points.shape == (3, sketch.num_points, 2)
        # Every per-frame SVG parses back to that frame's points, with the input's stroke style.
        for k in range(3):
            frame = load_sketch(media.join(outputs["svg_frames"], f"frame_{k:03d}.svg"))
            np.testing.assert_allclose(frame.points.numpy(), points[k], atol=1e-2)
            assert frame.paths[0].stroke_width == sketch.paths[0].stroke_width
        animation = ET.fromstring(media.read_bytes(outputs["animated_svg"]))
        assert len(animation.findall(".//{http://www.w3.org/2000/svg}animate")) == len(sketch.paths)
        assert "project.0.weight" in load_file(outputs["field"])
        for metric in ("clip_image", "clip_text", "clip_temporal", "xclip_text"):
            assert row[metric] is not None and -1 <= row[metric] <= 1, metric
        params = json.loads(row["params"])
        assert params["steps"] == 2 and params["num_frames"] == 3 and params["guidance_local"] == 30.0
        assert row["seconds"] > 0 and row["peak_memory_mb"] > 0


def test_generate_livesketch_rejects_unknown_parameters(tmp_path, capsys):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a"], "svg": ["a.svg"], "prompt": ["p"]}), manifest)
    code = main(
        [
            "generate",
            "livesketch",
            "--manifest",
            str(manifest),
            "--output",
            str(tmp_path / "o"),
            "--set",
            "guidance=3",
        ]
    )
    assert code == 2
    assert "unknown parameter(s) guidance" in capsys.readouterr().err


class Preempted(Exception):
    pass


def test_a_preempted_row_resumes_from_its_checkpoint(tmp_path, data_dir):
    from actors.base import JobConfig
    from actors.livesketch import CHECKPOINT, LiveSketchActor

    row = {"id": "fish", "svg": str(data_dir / "sketches" / "fish_scaled1.svg"), "prompt": "a fish swimming"}
    params = {"steps": 3, "num_frames": 2, "height": 32, "width": 32, "dim": 16, "video_size": 32}

    def actor(output):
        config = JobConfig(
            "livesketch", str(output), "run", {"backbone": "tiny"}, {**params, "checkpoint_every": 1}
        )
        return LiveSketchActor(config)

    whole = actor(tmp_path / "whole")
    [expected] = whole.process_rows([row], [whole.effective_params(row)])

    interrupted = actor(tmp_path / "resumed")
    save = interrupted._checkpoint

    def save_then_die(items, states):
        save(items, states)
        if states[0]["step"] == 2:
            raise Preempted

    interrupted._checkpoint = save_then_die
    with pytest.raises(Preempted):
        interrupted.process_rows([row], [interrupted.effective_params(row)])
    checkpoint = tmp_path / "resumed" / "artifacts" / "fish" / CHECKPOINT
    assert checkpoint.exists()

    again = actor(tmp_path / "resumed")
    [resumed] = again.process_rows([row], [again.effective_params(row)])
    assert resumed.error is None and "resumed from the checkpoint at step 2" in resumed.notes
    assert not checkpoint.exists()
    np.testing.assert_allclose(
        np.load(resumed.outputs["points"]), np.load(expected.outputs["points"]), atol=1e-5
    )


@pytest.mark.parametrize(
    ("method", "kind", "model"),
    [
        ("livesketch", "svg", "ali-vilab/text-to-video-ms-1.7b"),
        ("dreammotion", "video", "cerspense/zeroscope_v2_576w"),
    ],
)
def test_generate_without_backbone_needs_the_real_model_and_says_how_to_get_it(
    ray_cluster, tmp_path, capsys, method, kind, model
):
    columns = {"id": ["a"], kind: [str(tmp_path / "never-read")]}  # no row is read: the job stops first
    columns |= {"prompt": ["x"]} if kind == "svg" else {"source_prompt": ["x"], "target_prompt": ["y"]}
    pq.write_table(pa.table(columns), tmp_path / "m.parquet")
    args = ["generate", method, "--manifest", str(tmp_path / "m.parquet"), "--output", str(tmp_path / "out")]
    assert main([*args, "--clip", "tiny"]) == 3  # offline (conftest), nothing cached: no silent tiny model
    err = " ".join(capsys.readouterr().err.split())
    assert model in err and "HF_HUB_OFFLINE" in err and f"huggingface-cli download {model}" in err
    assert not (tmp_path / "out" / "results").exists()
