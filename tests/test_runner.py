"""The Ray job runner end to end: every row accounted for, resume, multi-node GPU pools, killed workers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from actors.base import CHAOS_KILL_ENV, RowError, row_params
from jobs import resume
from jobs.cli import main
from jobs.runner import JobSpec, run_job
from pipelines.dreammotion.edit import EditParams
from pipelines.dynamicrafter.sample import SampleParams as AnimateParams
from pipelines.livesketch.animate import LiveSketchParams
from pipelines.stylecrafter.sample import SampleParams as StyleParams

FAST = {"num_frames": 4}


def _eval_manifest(data_dir: Path, tmp_path: Path, rows: int = 12) -> Path:
    """Rows over the example videos; the last three are bad: missing file, corrupt video, empty prompt."""
    videos = sorted((data_dir / "videos").glob("*.mp4")) or sorted(data_dir.glob("*.mp4"))
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    records = []
    for n in range(rows - 3):
        video = videos[n % len(videos)]
        records.append({"id": f"ok-{n:02d}", "video": str(video), "prompt": f"a video of {video.stem}"})
    records += [
        {"id": "bad-missing", "video": str(tmp_path / "nope.mp4"), "prompt": "a cat"},
        {"id": "bad-corrupt", "video": str(corrupt), "prompt": "a cat"},
        {"id": "bad-empty-prompt", "video": str(videos[0]), "prompt": "  "},
    ]
    path = tmp_path / "eval.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def _latest(output: Path) -> dict[str, dict]:
    table = resume.latest(resume.read_results(str(output / "results")))
    return {r["id"]: r for r in table.to_pylist()}


def _spec(manifest: Path, output: Path, **kw) -> JobSpec:
    return JobSpec(
        method="evaluate",
        manifest=str(manifest),
        output=str(output),
        models={"clip": "tiny"},
        params=dict(FAST),
        **kw,
    )


def test_bad_rows_become_error_rows_and_reruns_resume(ray_cluster, data_dir, tmp_path):
    manifest, output = _eval_manifest(data_dir, tmp_path), tmp_path / "out"
    first = run_job(_spec(manifest, output, batch_size=2))
    assert (first["processed"], first["ok"], first["error"]) == (12, 9, 3)
    rows = _latest(output)
    assert len(rows) == 12
    errors = {i: r["error"] for i, r in rows.items() if r["status"] == "error"}
    assert set(errors) == {"bad-missing", "bad-corrupt", "bad-empty-prompt"}
    assert "'bad-missing'" in errors["bad-missing"] and "not found" in errors["bad-missing"]
    assert "cannot decode" in errors["bad-corrupt"]
    assert "empty prompt" in errors["bad-empty-prompt"]
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert all(r["clip_text"] is not None and r["clip_temporal"] is not None for r in ok)
    assert all(r["clip_image"] is None and "clip_image: no image" in r["notes"] for r in ok)
    assert all(r["seconds"] > 0 and r["peak_memory_mb"] > 0 and r["attempt"] == 1 for r in rows.values())
    assert json.loads(ok[0]["params"])["num_frames"] == 4
    saved = json.loads((output / "summary.json").read_text())
    assert saved["run_id"] == first["run_id"] and saved["ok"] == 9
    metrics = json.loads((output / "metrics_summary.json").read_text())
    assert metrics["clip_temporal"]["n"] == 9 and metrics["clip_temporal"]["std"] >= 0

    second = run_job(_spec(manifest, output))
    assert (second["processed"], second["skipped"]) == (0, 12)

    # Forget two ok rows, as if the job had been preempted before writing them.
    forgotten = {"ok-01", "ok-05"}
    for path in (output / "results").glob("*.parquet"):
        table = pq.read_table(path)
        kept = table.filter(pc.invert(pc.is_in(table.column("id"), pa.array(sorted(forgotten)))))
        if kept.num_rows != table.num_rows:
            pq.write_table(kept, path)
    third = run_job(_spec(manifest, output))
    assert (third["processed"], third["ok"]) == (2, 2)
    run_ids = {i: r["run_id"] for i, r in _latest(output).items()}
    assert {i for i, r in run_ids.items() if r == third["run_id"]} == forgotten

    # Bad-input errors are retried only when asked, and count as a second attempt.
    fourth = run_job(_spec(manifest, output, retry_errors=True))
    assert (fourth["processed"], fourth["error"]) == (3, 3)
    assert _latest(output)["bad-corrupt"]["attempt"] == 2


def test_gpu_actor_pool_spreads_over_two_simulated_nodes(ray_cluster, data_dir, tmp_path):
    import ray

    manifest, output = _eval_manifest(data_dir, tmp_path, rows=11), tmp_path / "out"
    report = run_job(_spec(manifest, output, actors=2, gpus_per_actor=1))
    assert (report["processed"], report["ok"]) == (11, 8)
    assert report["gpu_seconds_per_row"] > 0 and report["items_per_gpu_hour"] > 0
    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}
    used = {r["node"] for r in _latest(output).values()}
    assert used == gpu_nodes and len(used) == 2


def test_a_worker_killed_mid_job_loses_no_row(ray_cluster, data_dir, tmp_path):
    manifest, output = _eval_manifest(data_dir, tmp_path, rows=9), tmp_path / "out"
    victim = "ok-02"
    report = run_job(_spec(manifest, output, runtime_env={"env_vars": {CHAOS_KILL_ENV: victim}}))
    assert report["processed"] == 9 and report["ok"] == 6
    rows = _latest(output)
    assert len(rows) == 9
    assert rows[victim]["status"] == "ok"
    assert "died 1 time(s) on this row before" in rows[victim]["notes"]


def test_a_row_that_keeps_killing_workers_is_given_up(ray_cluster, data_dir, tmp_path):
    manifest, output = _eval_manifest(data_dir, tmp_path, rows=5), tmp_path / "out"
    victim = "ok-00"
    report = run_job(
        _spec(manifest, output, max_row_crashes=1, runtime_env={"env_vars": {CHAOS_KILL_ENV: victim}})
    )
    assert report["processed"] == 5
    rows = _latest(output)
    assert rows[victim]["status"] == "error" and rows[victim]["retryable"]
    assert "died 1 times" in rows[victim]["error"]
    assert rows["ok-01"]["status"] == "ok"


def test_cli_refuses_a_broken_manifest_before_any_work(ray_cluster, tmp_path, capsys):
    manifest = tmp_path / "broken.parquet"
    pq.write_table(pa.table({"id": ["a", "a"], "prompt": ["x", None]}), manifest)
    code = main(
        ["evaluate", "--manifest", str(manifest), "--output", str(tmp_path / "out"), "--clip", "tiny"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "missing required column 'video'" in err and "duplicate id(s): 'a'" in err
    assert not (tmp_path / "out" / "results").exists()


def test_cli_exit_codes_for_unknown_parameters_missing_manifest_and_unloadable_models(
    ray_cluster, data_dir, tmp_path, capsys
):
    manifest = _eval_manifest(data_dir, tmp_path, rows=4)
    out = str(tmp_path / "out")
    assert main(["evaluate", "--manifest", str(manifest), "--output", out, "--set", "stesp=3"]) == 2
    assert "unknown parameter(s) stesp" in capsys.readouterr().err
    assert main(["evaluate", "--manifest", str(tmp_path / "none.parquet"), "--output", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(["evaluate", "--manifest", str(manifest), "--output", out, "--clip", str(tmp_path / "no-clip")])
        == 3
    )
    assert "does not exist" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert (
        main(["evaluate", "--manifest", str(manifest), "--output", str(blocker / "out"), "--clip", "tiny"])
        == 2
    )
    assert "cannot write to output" in capsys.readouterr().err
    assert main(["generate", "stylecrafter", "--manifest", str(manifest), "--output", out]) == 2
    assert "missing required column" in capsys.readouterr().err.replace("\n", " ")
    assert main(["train", "livesketch", "--stage", "1", "--data", str(manifest), "--output", out]) == 2
    assert "not implemented" in capsys.readouterr().err


def test_demo_runs_every_job_over_the_shipped_examples(ray_cluster, tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "demo outputs are under" in out
    rows = _latest(tmp_path / "demo" / "evaluate")
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows.values())
    assert rows["dance1"]["clip_image"] is not None and rows["bird000"]["clip_style"] is not None
    sketches = _latest(tmp_path / "demo" / "livesketch")
    assert sorted(sketches) == ["butterfly_3", "fish", "surfer0"]
    assert all(r["status"] == "ok" and r["clip_image"] is not None for r in sketches.values())
    artifacts = tmp_path / "demo" / "livesketch" / "artifacts"
    assert all((artifacts / i / "animation.svg").exists() for i in sketches)
    edits = _latest(tmp_path / "demo" / "dreammotion")
    assert sorted(edits) == ["bird000", "locomotive"] and all(r["status"] == "ok" for r in edits.values())
    animated = _latest(tmp_path / "demo" / "dynamicrafter")
    assert sorted(animated) == ["dance1", "guitar0"] and all(r["status"] == "ok" for r in animated.values())
    styled = _latest(tmp_path / "demo" / "stylecrafter")
    assert sorted(styled) == ["chef", "performer"] and all(r["status"] == "ok" for r in styled.values())
    shutil.rmtree(tmp_path / "demo")


def test_a_bad_method_parameter_becomes_that_rows_error():
    cases = [
        (LiveSketchParams.from_dict, {"steps": "many"}),
        (EditParams.from_dict, {"num_frames": 2.5}),
        (AnimateParams.from_dict, {"mode": "sideways"}),
        (StyleParams.from_dict, {"height": 30}),
    ]
    for parse, values in cases:
        with pytest.raises(RowError, match=r"^bad parameter: .+"):
            row_params(parse, values)
    assert row_params(StyleParams.from_dict, {"steps": 3}).steps == 3


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_hostile_ids_stop_the_job_before_anything_is_written(tmp_path, capsys):
    hostile = ["../../escape_dir", "../x", "a/b", "..", "", "x" * 300]
    manifest = tmp_path / "jobs" / "eval.parquet"
    manifest.parent.mkdir()
    ids = [*hostile, "fine"]
    pq.write_table(pa.table({"id": ids, "video": [str(tmp_path / "v.mp4")] * len(ids)}), manifest)
    output = tmp_path / "jobs" / "run" / "out"
    before = _tree(tmp_path)
    code = main(["evaluate", "--manifest", str(manifest), "--output", str(output), "--clip", "none"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{len(hostile)} id(s) cannot name an artifact folder" in err
    for row_id in hostile:
        assert repr(row_id) in err
    assert "'fine'" not in err
    assert _tree(tmp_path) == before  # not OUTPUT, not a directory beside it, nothing


def test_an_actor_given_a_hostile_id_anyway_writes_nothing_outside_output(tmp_path):
    """Defence in depth: rows that reach an actor without validation still cannot choose where it writes."""
    from actors.base import JobConfig
    from actors.evaluate import EvaluateActor

    output = tmp_path / "a" / "out"
    output.mkdir(parents=True)
    before = _tree(tmp_path)
    actor = EvaluateActor(JobConfig(method="evaluate", output=str(output), run_id="r1", models={}))
    rows = [
        {"id": "../../escape_dir", "video": str(tmp_path / "missing.mp4"), "prompt": None},
        {"id": "good", "video": str(tmp_path / "missing.mp4"), "prompt": None},
    ]
    results = {r["id"]: r for r in actor(pa.Table.from_pylist(rows)).to_pylist()}
    assert "cannot name an artifact folder" in results["../../escape_dir"]["error"]
    assert results["../../escape_dir"]["retryable"] is False
    assert "not found" in results["good"]["error"]
    assert {p for p in _tree(tmp_path) - before if not p.startswith("a/out")} == set()
    with pytest.raises(RowError):
        actor.config.artifacts_dir("../x")
