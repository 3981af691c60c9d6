"""The Ray job runner end to end: every row accounted for, resume, multi-node GPU pools, killed workers."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors.base import CHAOS_KILL_ENV, RowError, row_params
from jobs import resume
from jobs.cli import main
from jobs.runner import JobSpec, run_job
from pipelines import media
from pipelines.dreammotion.edit import EditParams
from pipelines.dynamicrafter.sample import SampleParams as AnimateParams
from pipelines.livesketch.animate import LiveSketchParams
from pipelines.params import square_side
from pipelines.stylecrafter.sample import SampleParams as StyleParams
from schemas import ResultRow, result_table

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


def _no_models(spec: JobSpec) -> JobSpec:
    """`spec` without CLIP, for tests of crash accounting, which no model takes part in: the job then
    starts no node-preparation task, and each restart of the killed actor loads nothing (half the time)."""
    return dataclasses.replace(spec, models={})


def test_bad_rows_become_error_rows_and_reruns_resume(ray_cluster, data_dir, tmp_path):
    manifest, output = _eval_manifest(data_dir, tmp_path), tmp_path / "out"
    # Inputs decoded by the CPU stage, as in a GPU job: its errors must reach the rows as the actor's do.
    first = run_job(_spec(manifest, output, batch_size=2, decode_stage=True))
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
    assert second["kept_from_other_settings"] == []
    # Rerun with other models and parameters: resumed by id all the same, and the kept rows are named.
    other = run_job(dataclasses.replace(_spec(manifest, output), models={}, params={"max_frames": 2}))
    assert other["processed"] == 0
    assert other["kept_from_other_settings"] == [
        {"run_id": first["run_id"], "rows": 12, "models": {"clip": "tiny"}, "params": dict(FAST)}
    ]
    record = json.loads((output / "runs" / f"{other['run_id']}.json").read_text())
    assert (record["models"], record["params"]) == ({}, {"max_frames": 2})
    # A record that cannot be read costs the comparison, never the rerun.
    (output / "runs" / f"{first['run_id']}.json").write_text('{"models": ')
    again = run_job(dataclasses.replace(_spec(manifest, output), models={}, params={"max_frames": 2}))
    assert (again["processed"], again["kept_from_other_settings"]) == (0, [])

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


def test_gpu_actor_pool_spreads_over_two_simulated_nodes(ray_cluster, data_dir, tmp_path, monkeypatch):
    import ray
    from ray.data import DataContext

    # Rows go out only once both actors are up, and all blocks are ready at once (no CPU decode stage,
    # which test_bad_rows_become_error_rows_and_reruns_resume runs): the pool then hands the first two
    # blocks to both actors in one step. Otherwise an actor that is quicker than the blocks arrive,
    # or up before the other, takes every row (CI here: one node in the results, twice).
    monkeypatch.setattr(DataContext.get_current(), "wait_for_min_actors_s", 300)
    manifest, output = _eval_manifest(data_dir, tmp_path, rows=11), tmp_path / "out"
    report = run_job(_spec(manifest, output, actors=2, gpus_per_actor=1, decode_stage=False))
    assert (report["processed"], report["ok"]) == (11, 8)
    assert report["gpu_seconds_per_row"] > 0 and report["items_per_gpu_hour"] > 0
    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}
    used = {r["node"] for r in _latest(output).values()}
    assert used == gpu_nodes and len(used) == 2


def test_a_worker_killed_mid_job_loses_no_row(ray_cluster, data_dir, tmp_path):
    manifest, output = _eval_manifest(data_dir, tmp_path, rows=9), tmp_path / "out"
    victim = "ok-02"
    report = run_job(_no_models(_spec(manifest, output, runtime_env={"env_vars": {CHAOS_KILL_ENV: victim}})))
    assert report["processed"] == 9 and report["ok"] == 6
    rows = _latest(output)
    assert len(rows) == 9
    assert rows[victim]["status"] == "ok"
    assert "died 1 time(s) on this row before" in rows[victim]["notes"]


def test_a_row_that_keeps_killing_workers_is_given_up(ray_cluster, data_dir, tmp_path):
    manifest, output = _eval_manifest(data_dir, tmp_path, rows=5), tmp_path / "out"
    victim = "ok-00"
    report = run_job(
        _no_models(
            _spec(manifest, output, max_row_crashes=1, runtime_env={"env_vars": {CHAOS_KILL_ENV: victim}})
        )
    )
    assert report["processed"] == 5
    rows = _latest(output)
    assert rows[victim]["status"] == "error" and rows[victim]["retryable"]
    assert "died 1 times" in rows[victim]["error"]
    assert rows["ok-01"]["status"] == "ok"


def test_only_this_runs_worker_deaths_count_against_a_row(tmp_path):
    """A batch's in-flight marker left by a run whose driver died (preempted twice with the row in flight)
    does not make the next run give the row up: only deaths in the same run are the row's doing."""
    from actors.base import JobConfig
    from actors.evaluate import EvaluateActor

    rows = pa.Table.from_pylist([{"id": "x", "video": str(tmp_path / "missing.mp4"), "prompt": None}])
    for marker_run, gives_up in [("earlier-run", False), ("this-run", True)]:
        config = JobConfig(method="evaluate", output=str(tmp_path / "out"), run_id="this-run", models={})
        actor = EvaluateActor(config)
        media.write_text(json.dumps({"starts": 2, "run_id": marker_run}), actor._marker(["x"]))
        (result,) = actor(rows).to_pylist()
        assert ("died 2 times" in result["error"]) is gives_up, result["error"]
        assert ("not found" in result["error"]) is not gives_up  # the row itself was run


def test_a_row_stopped_at_the_time_limit_is_given_up_only_in_the_run_that_stopped_it(tmp_path):
    """The marker the time limit leaves makes the retry give the row up, with the limit in its error and
    no second run of it, and stays, so that every later retry in the run does the same; a later run
    (perhaps with a higher limit) tries the row again."""
    from actors.base import JobConfig
    from actors.evaluate import EvaluateActor

    rows = pa.Table.from_pylist([{"id": "x", "video": str(tmp_path / "missing.mp4"), "prompt": None}])
    for marker_run, gives_up in [("earlier-run", False), ("this-run", True)]:
        config = JobConfig(method="evaluate", output=str(tmp_path / "out"), run_id="this-run", models={})
        actor = EvaluateActor(config)
        stopped = {"starts": 1, "run_id": marker_run, "stopped_after_s": 30.0}
        media.write_text(json.dumps(stopped), actor._marker(["x"]))
        (result,) = actor(rows).to_pylist()
        assert ("row time limit (30 s)" in result["error"]) is gives_up, result["error"]
        assert ("not found" in result["error"]) is not gives_up  # the row itself was run
        assert (
            result["retryable"] is False
        )  # a rerun would cost the limit again, as a missing file fails again
        # A given-up row's marker stays for the run: a retry of its batch gives it up again at once.
        assert media.exists(actor._marker(["x"])) is gives_up


def test_a_time_limit_inside_another_leaves_the_outer_ones_faulthandler_deadline(monkeypatch):
    """faulthandler keeps one deadline per process: a read's limit inside its batch's must neither
    replace the batch's backstop nor cancel it when the read ends."""
    import faulthandler

    from actors.base import stop_after

    calls: list[tuple] = []
    monkeypatch.setattr(faulthandler, "dump_traceback_later", lambda s, exit: calls.append(("arm", s)))
    monkeypatch.setattr(faulthandler, "cancel_dump_traceback_later", lambda: calls.append(("cancel",)))
    with stop_after(100.0, "2 row(s)", lambda: None):
        with stop_after(50.0, "reading row 'a'", lambda: None):
            pass
        assert calls == [("arm", 160.0)]
    with stop_after(10.0, "1 row(s)", lambda: None):
        pass
    assert calls == [("arm", 160.0), ("cancel",), ("arm", 70.0), ("cancel",)]


def test_a_stalled_read_in_a_batch_is_stopped_after_one_rows_limit_not_the_batchs(
    data_dir, tmp_path, stalling_server
):
    """An evaluate actor that reads its own inputs (no decode stage) held a stalled read in a batch of B
    rows for B times the limit (32 x 120 s by default): the read alone is stopped at the limit, the retry
    splits the batch, and only the stalled row is given up."""
    import subprocess
    import sys

    video = str((sorted((data_dir / "videos").glob("*.mp4")) or sorted(data_dir.glob("*.mp4")))[0])
    records = [
        {"id": i, "video": v, "prompt": None, "num_frames": 4}
        for i, v in [("a", video), ("stalled", f"{stalling_server}/clip.mp4"), ("b", video)]
    ]
    attempt = f"""
import pyarrow as pa
from actors.base import JobConfig
from actors.evaluate import EvaluateActor
config = JobConfig("evaluate", {str(tmp_path / "out")!r}, "run-1", models={{}}, row_time_limit_s=2.0)
print(EvaluateActor(config)(pa.Table.from_pylist({records!r})).to_pylist())
"""
    from actors.base import JobConfig, inflight_marker
    from actors.evaluate import EvaluateActor

    output = str(tmp_path / "out")
    # The batch, stopped in the read; then the row alone after the split, whose limit is the row's.
    for ids, what in [(["a", "stalled", "b"], "reading row 'stalled'"), (["stalled"], "1 row(s)")]:
        run = subprocess.run([sys.executable, "-c", attempt], capture_output=True, text=True, timeout=120)
        assert run.returncode == 1, run.stderr[-2000:]
        assert f"{what} ran past the row time limit (2 s)" in run.stderr
        assert json.loads(media.read_bytes(inflight_marker(output, ids)))["stopped_after_s"] == 2.0
    config = JobConfig("evaluate", output, "run-1", models={}, row_time_limit_s=2.0)
    rows = {r["id"]: r for r in EvaluateActor(config)(pa.Table.from_pylist(records)).to_pylist()}
    assert rows["a"]["status"] == rows["b"]["status"] == "ok", rows
    assert "ran past the row time limit (2 s)" in rows["stalled"]["error"]


def test_a_parameter_bomb_is_stopped_at_the_row_time_limit_and_the_job_finishes(
    ray_cluster, data_dir, tmp_path
):
    """LiveSketch with steps=10**9 in one row's column would hold its actor for years: the row time
    limit restarts the worker, the row is given up with the limit in its error, and its batch-mate,
    which shared the stopped call, is rerun alone and finishes."""
    sketches = data_dir / "sketches"
    manifest = tmp_path / "bomb.parquet"
    pq.write_table(
        pa.table(
            {
                "id": ["fish", "bomb"],
                "svg": [str(sketches / "fish_scaled1.svg"), str(sketches / "surfer0_scaled1.svg")],
                "prompt": ["A fish swimming.", "A surfer riding waves."],
                "steps": [2, 10**9],
            }
        ),
        manifest,
    )
    sets = ["num_frames=3", "height=32", "width=32", "dim=16", "video_size=48"]
    args = ["generate", "livesketch", "--manifest", str(manifest), "--output", str(tmp_path / "out")]
    args += ["--backbone", "tiny", "--clip", "none", "--xclip", "none", "--batch-size", "2"]
    args += ["--row-time-limit", "4", *(a for s in sets for a in ("--set", s))]
    assert main(args) == 0
    rows = _latest(tmp_path / "out")
    assert rows["fish"]["status"] == "ok", rows["fish"]["error"]
    assert rows["bomb"]["status"] == "error" and not rows["bomb"]["retryable"]
    assert "row time limit (4 s)" in rows["bomb"]["error"] and "bomb" in rows["bomb"]["error"]
    assert not (tmp_path / "out" / "artifacts" / "bomb" / "animation.svg").exists()


def test_the_no_progress_timeout_outlasts_a_row_stopped_at_its_time_limit(tmp_path, capsys):
    from jobs.runner import no_progress_timeout

    spec = JobSpec("livesketch", "m.parquet", str(tmp_path), batch_size=1)
    assert no_progress_timeout(spec, 0.0) == 3600  # no limit: an hour, as Ray Data's own default
    assert no_progress_timeout(spec, 600.0) == 3600
    batched = dataclasses.replace(spec, batch_size=4)
    assert no_progress_timeout(batched, 3000.0) == 5 * 3000 + 600  # the call, the row alone, restarts
    chosen = dataclasses.replace(batched, no_progress_timeout_s=7200.0)
    assert no_progress_timeout(chosen, 3000.0) == 7200  # the user's own value stands, with a warning
    assert "below the 15600 s a row stopped at --row-time-limit" in capsys.readouterr().out


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
    # 0 gave every row up before it ran, and a decode task's accounting failed on its first row.
    assert main(["evaluate", "--manifest", str(manifest), "--output", out, "--max-row-crashes", "0"]) == 2
    assert "--max-row-crashes must be at least 1" in capsys.readouterr().err.replace("\n", " ")
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


def test_demo_runs_every_job_over_the_shipped_examples(demo_output):
    demo, out = demo_output
    assert "demo outputs are under" in out
    for method in ("evaluate", "livesketch", "dreammotion", "dynamicrafter", "stylecrafter"):
        assert f"report: {demo / method / 'report' / 'index.html'}" in out
    rows = _latest(demo / "evaluate")
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows.values())
    assert rows["dance1"]["clip_image"] is not None and rows["bird000"]["clip_style"] is not None
    sketches = _latest(demo / "livesketch")
    assert sorted(sketches) == ["butterfly_3", "fish", "surfer0"]
    assert all(r["status"] == "ok" and r["clip_image"] is not None for r in sketches.values())
    artifacts = demo / "livesketch" / "artifacts"
    assert all((artifacts / i / "animation.svg").exists() for i in sketches)
    edits = _latest(demo / "dreammotion")
    assert sorted(edits) == ["bird000", "locomotive"] and all(r["status"] == "ok" for r in edits.values())
    animated = _latest(demo / "dynamicrafter")
    assert sorted(animated) == ["dance1", "guitar0"] and all(r["status"] == "ok" for r in animated.values())
    styled = _latest(demo / "stylecrafter")
    assert sorted(styled) == ["chef", "performer"] and all(r["status"] == "ok" for r in styled.values())


def test_a_bad_method_parameter_becomes_that_rows_error():
    cases = [
        (LiveSketchParams.from_dict, {"steps": "many"}),
        (EditParams.from_dict, {"num_frames": 2.5}),
        (AnimateParams.from_dict, {"mode": "sideways"}),
        (StyleParams.from_dict, {"height": 30}),
        # Sizes past an input frame's pixel limit: host tensors of 12288x12288 took 4 GB before any GPU.
        (AnimateParams.from_dict, {"height": 12288, "width": 12288}),
        (StyleParams.from_dict, {"image_size": 16384}),
        (LiveSketchParams.from_dict, {"size": 10000}),
        (lambda values: square_side(values, "video_size"), {"video_size": 20000}),
        # 64 style images of 8192x8192: each within the pixel limit, 12 GB together.
        (lambda values: square_side(values, "style_size", frames=64), {"style_size": 8192}),
    ]
    for parse, values in cases:
        with pytest.raises(RowError, match=r"^bad parameter: .+"):
            row_params(parse, values)
    assert row_params(StyleParams.from_dict, {"steps": 3}).steps == 3
    assert row_params(AnimateParams.from_dict, {"height": 1024, "width": 1024}).height == 1024


def test_a_rows_own_error_quoting_a_cuda_error_restarts_no_worker(monkeypatch):
    """The markers of a fatal device error are read only in torch's errors (RuntimeError): a missing file
    named `CUDA error.mp4` made DreamMotion's worker exit, costing two restarts and model loads, and the
    row was charged them as deaths."""
    from actors import base

    exits: list[int] = []
    monkeypatch.setattr(base.os, "_exit", exits.append)
    for own in (
        media.MediaError("video not found: /data/CUDA error.mp4"),
        RowError("bad parameter: prompt 'device-side assert'"),
        base.DecodeError("video not found: /data/CUBLAS_STATUS.mp4", False),
    ):
        base._exit_if_fatal(own)
    assert exits == []
    base._exit_if_fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert exits == [1]


@pytest.mark.parametrize(
    "params", [{"max_frames": 0}, {"max_frames": -1}, {"num_frames": -2}, {"num_frames": 2.5}]
)
def test_a_bad_frame_count_is_that_evaluation_rows_error(data_dir, tmp_path, params):
    """max_frames=0 would read every frame (up to the 4 GiB cap), a negative count failed as retryable."""
    from actors.base import JobConfig
    from actors.evaluate import EvaluateActor

    video = str((sorted((data_dir / "videos").glob("*.mp4")) or sorted(data_dir.glob("*.mp4")))[0])
    actor = EvaluateActor(JobConfig(method="evaluate", output=str(tmp_path), run_id="r", models={}))
    rows = pa.Table.from_pylist([{"id": "a", "video": video, **params}, {"id": "b", "video": video}])
    bad, good = actor(rows).to_pylist()
    assert bad["status"] == "error" and bad["retryable"] is False
    assert f"bad parameter: {next(iter(params))} must be a whole number >= 1" in bad["error"]
    assert good["status"] == "ok"


def test_an_evaluation_rows_inputs_are_held_to_the_decode_limit_together(data_dir, tmp_path, monkeypatch):
    """Each style image is held to the pixel limit alone: 64 of 8192x8192 would take 12 GB."""
    from actors.base import JobConfig
    from actors.evaluate import EvaluateActor

    video = str((sorted((data_dir / "videos").glob("*.mp4")) or sorted(data_dir.glob("*.mp4")))[0])
    image = str((sorted((data_dir / "images").glob("*.png")) or sorted(data_dir.glob("*.jpeg")))[0])
    actor = EvaluateActor(JobConfig(method="evaluate", output=str(tmp_path), run_id="r", models={}))
    row = {"id": "b", "video": video, "image": None, "style": [image, image]}
    read = actor.read_inputs(row, actor.effective_params(row), actor.config)
    monkeypatch.setattr(media, "MAX_DECODED_BYTES", sum(a.nbytes for a in read.values()))  # two images
    alone = {"id": "c", "video": video, "image": image, "style": [image, image]}  # the image counts too
    rows = pa.Table.from_pylist([{**row, "id": "a", "style": [image] * 3}, row, alone])
    bad, good, also_bad = actor(rows).to_pylist()
    assert bad["status"] == "error" and bad["retryable"] is False
    assert "the row's inputs decode to over" in bad["error"] and "with 4 of them read" in bad["error"]
    assert good["status"] == "ok"
    assert also_bad["status"] == "error" and "with 4 of them read" in also_bad["error"]


def test_an_actor_reads_a_batchs_rows_at_once_and_each_row_gets_what_it_gets_read_alone(
    data_dir, tmp_path, monkeypatch
):
    """An evaluate actor that reads its own inputs (no decode stage: a job on CPUs) reads `read_threads`
    rows of a batch at once, so that object-store requests and decoders' idle cores overlap. Every row's
    result, a bad row's error included, is the one it gets when the rows are read one at a time."""
    import threading
    import time

    from actors.base import JobConfig
    from actors.evaluate import EvaluateActor

    videos = sorted((data_dir / "videos").glob("*.mp4")) or sorted(data_dir.glob("*.mp4"))
    images = sorted((data_dir / "images").glob("*.png")) or sorted(data_dir.glob("*.jpeg"))
    records = [
        {"id": f"r{i}", "video": str(videos[i % len(videos)]), "image": str(images[i % len(images)])}
        for i in range(9)
    ]
    records[3]["video"] = str(tmp_path / "missing.mp4")
    records[6]["image"] = str(data_dir / "README.md")  # not an image
    active, peak, lock = 0, 0, threading.Lock()
    read = EvaluateActor.read_inputs.__func__

    def slow_read(cls, row, params, config):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.2)  # an object store's answer
        try:
            return read(cls, row, params, config)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(EvaluateActor, "read_inputs", classmethod(slow_read))
    config = JobConfig(method="evaluate", output=str(tmp_path / "out"), run_id="r", models={"clip": "tiny"})
    config.decode = EvaluateActor.decode_settings(config)  # the reads also crop for CLIP, on the threads
    assert config.decode
    results = {}
    assert EvaluateActor.read_threads > 1
    for threads in (EvaluateActor.read_threads, 1):
        monkeypatch.setattr(EvaluateActor, "read_threads", threads)
        actor, peak = EvaluateActor(config), 0
        results[threads] = actor(pa.Table.from_pylist(records)).to_pylist()
        assert peak == threads
    at_once, alone = results.values()
    kept = ["id", "status", "error", "retryable", "clip_image", "clip_temporal"]
    assert [[r[k] for k in kept] for r in at_once] == [[r[k] for k in kept] for r in alone]
    assert [r["status"] for r in at_once] == ["ok"] * 3 + ["error"] + ["ok"] * 2 + ["error"] + ["ok"] * 2
    assert "missing.mp4" in at_once[3]["error"] and "README.md" in at_once[6]["error"]
    assert all(r["clip_image"] and r["clip_temporal"] for r in at_once if r["status"] == "ok")


def test_an_unexpected_error_in_one_read_of_a_batch_is_raised_once_no_read_goes_on(tmp_path):
    """It fails the batch, which the actor then runs row by row (`RowActor._run`): no read of the batch
    may still be going on beside that. Reads not yet begun are dropped."""
    import threading
    import time

    from actors.base import JobConfig
    from actors.evaluate import EvaluateActor

    actor = EvaluateActor(JobConfig(method="evaluate", output=str(tmp_path), run_id="r", models={}))
    rows = [{"id": f"r{i}"} for i in range(12)]
    started, finished, lock = set(), set(), threading.Lock()

    def build(row, params):
        with lock:
            started.add(row["id"])
        if row["id"] == "r1":
            time.sleep(0.05)
            raise KeyError("a bug, not the row's fault")
        time.sleep(0.2)
        with lock:
            finished.add(row["id"])
        return row

    with pytest.raises(KeyError, match="a bug"):
        actor.run_in_groups(rows, [{}] * len(rows), build, lambda _: (), lambda jobs: jobs, lambda *_: None)
    with lock:
        assert started - {"r1"} == finished and len(finished) >= actor.read_threads - 1
    time.sleep(0.3)
    assert started - {"r1"} == finished  # none began after the error was raised


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_hostile_ids_stop_the_job_before_anything_is_written(tmp_path, capsys):
    hostile = ["../../escape_dir", "../x", "a/b", "..", "", "x" * 300, "fine::x"]
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


def test_an_output_holding_another_methods_rows_is_refused_before_they_settle_this_jobs_ids(tmp_path, capsys):
    manifest, output = tmp_path / "eval.parquet", tmp_path / "out"
    pq.write_table(pa.table({"id": ["a", "b"], "video": [str(tmp_path / "v.mp4")] * 2}), manifest)
    earlier = [ResultRow(id=i, method="livesketch", status="ok", run_id="r0") for i in ("a", "b")]
    (output / "results").mkdir(parents=True)
    pq.write_table(result_table(earlier), output / "results" / "r0_part-0.parquet")
    code = main(["evaluate", "--manifest", str(manifest), "--output", str(output), "--clip", "none"])
    assert code == 2
    assert "holds result rows of livesketch, not evaluate" in " ".join(capsys.readouterr().err.split())
    assert sorted(p.name for p in (output / "results").iterdir()) == ["r0_part-0.parquet"]


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
    with pytest.raises(RowError, match="'::'"):  # would write into the folder of the row with id "good"
        actor.config.artifacts_dir("good::x")
    assert results["../../escape_dir"]["retryable"] is False
    assert "not found" in results["good"]["error"]
    assert {p for p in _tree(tmp_path) - before if not p.startswith("a/out")} == set()
    with pytest.raises(RowError):
        actor.config.artifacts_dir("../x")


def test_twenty_thousand_rows_leave_a_handful_of_files_and_a_rerun_skips_them_all(ray_cluster, tmp_path):
    rows = 20_000
    missing = [str(tmp_path / f"missing-{i}.mp4") for i in range(rows)]
    manifest = tmp_path / "big.parquet"
    pq.write_table(pa.table({"id": [f"row-{i:05d}" for i in range(rows)], "video": missing}), manifest)
    output = tmp_path / "out"
    spec = JobSpec(method="evaluate", manifest=str(manifest), output=str(output), models={})
    first = run_job(spec)
    assert (first["processed"], first["error"]) == (rows, rows)
    files = list((output / "results").glob("*.parquet"))
    assert 1 <= len(files) <= 3, files  # compacted at the end of the run
    table = pq.read_table(output / "results")
    assert table.num_rows == rows and set(table.column("status").to_pylist()) == {"error"}
    assert pc.all(pc.match_substring(table.column("error"), "not found")).as_py()
    second = run_job(spec)  # bad-input errors are settled: nothing to do
    assert (second["processed"], second["skipped"]) == (0, rows)


def test_media_bombs_become_error_rows_and_the_other_rows_finish(ray_cluster, data_dir, tmp_path):
    import av
    import numpy as np
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(bomb)  # 400 Mpixel in a few kB
    long_video = tmp_path / "long.mp4"
    with av.open(str(long_video), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = 32
        stream.pix_fmt, stream.options = "yuv420p", {"preset": "ultrafast", "g": "100000"}
        frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 100, np.uint8), format="rgb24")
        for _ in range(100_000):
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    pipe = tmp_path / "pipe.mp4"
    os.mkfifo(pipe)
    videos = sorted((data_dir / "videos").glob("*.mp4")) or sorted(data_dir.glob("*.mp4"))
    records = [
        {"id": "bomb_image", "video": str(videos[0]), "image": str(bomb), "num_frames": 4},
        {"id": "long_video", "video": str(long_video), "image": None, "num_frames": 16},
        {"id": "fine", "video": str(videos[0]), "image": None, "num_frames": 4},
        # A pipe blocked its reader forever; a device such as /dev/zero was read until memory ran out.
        {"id": "pipe", "video": str(pipe), "image": None, "num_frames": 4},
        {"id": "device", "video": str(videos[0]), "image": "/dev/null", "num_frames": 4},
    ]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "bombs.parquet")
    output = tmp_path / "out"
    run_job(
        JobSpec(method="evaluate", manifest=str(tmp_path / "bombs.parquet"), output=str(output), models={})
    )
    rows = _latest(output)
    assert "pixel limit" in rows["bomb_image"]["error"]
    for name in ("pipe", "device"):
        assert "not a regular file" in rows[name]["error"] and not rows[name]["retryable"]
    assert rows["long_video"]["status"] == "ok" and rows["fine"]["status"] == "ok"
    assert rows["long_video"]["peak_memory_mb"] < 2000  # 16 of its 10^5 frames were decoded


def test_unreadable_and_duplicated_result_files_do_not_break_resume(tmp_path):
    """A writer killed mid-file leaves a broken file; a compaction killed midway leaves rows twice."""

    results = tmp_path / "results"
    results.mkdir()
    rows = [ResultRow(id=f"r{i}", method="evaluate", run_id="run1") for i in range(3)]
    pq.write_table(result_table(rows), results / "run1_a.parquet")
    pq.write_table(result_table(rows[:2]), results / "run1_part-x-00000.parquet")  # the same rows again
    (results / "run1_b.parquet").write_bytes(b"PAR1 half a file")
    last = resume.latest(resume.read_results(str(results)))
    assert sorted(last.column("id").to_pylist()) == ["r0", "r1", "r2"]
    assert set(last.column("attempts").to_pylist()) == {1}  # one run, whatever its duplicates
    settled, _, runs = resume.settled_and_attempts(str(results))
    assert sorted(settled.to_pylist()) == ["r0", "r1", "r2"] and runs == {"run1": 3}
    assert resume.settled_and_attempts(str(results), ids=pa.array(["r0", "elsewhere"]))[2] == {"run1": 1}


def test_latest_takes_each_ids_last_row_and_counts_its_runs_once_each():
    """Against the definition, over random histories: several runs, rows seen twice, shuffled files."""
    import datetime as dt
    import random

    from schemas import RESULT_SCHEMA, ResultRow, result_table

    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for seed in range(30):
        rng = random.Random(seed)
        rows = []
        for run in range(rng.randint(1, 4)):
            for i in rng.sample(range(40), rng.randint(1, 40)):
                when = start + dt.timedelta(seconds=100 * run + rng.randint(0, 50))
                row = ResultRow(id=f"r{i}", method="evaluate", run_id=f"run{run}", finished_at=when)
                rows += [row] * rng.choice([1, 1, 1, 2])  # a row seen twice: an interrupted compaction
        rng.shuffle(rows)
        last = resume.latest(result_table(rows).cast(RESULT_SCHEMA)).to_pylist()
        expected = {}
        for row in rows:
            if row.id not in expected or row.finished_at > expected[row.id][0]:
                expected[row.id] = (row.finished_at, row.run_id)
        runs = {i: len({r.run_id for r in rows if r.id == i}) for i in expected}
        assert {r["id"]: (r["finished_at"], r["run_id"], r["attempts"]) for r in last} == {
            i: (*expected[i], runs[i]) for i in expected
        }


def test_the_summary_counts_error_reasons_across_batches_by_kind_without_their_row_prefix():
    from jobs.summary import render, top_errors

    batches = [
        pa.record_batch({"error": ["row 'a': video not found: x.mp4", "row 'b': empty prompt", None]}),
        pa.record_batch({"error": ["row 'c': video not found: x.mp4", "row 'd': bad mask"]}),
        pa.record_batch({"error": pa.array([], pa.string())}),
    ]
    assert top_errors((b.column("error") for b in batches), most=2) == [
        {"count": 2, "error": "video not found: <uri>", "example": "video not found: x.mp4"},
        {"count": 1, "error": "bad mask", "example": "bad mask"},  # ties in text order
    ]
    assert top_errors([]) == []
    # Each missing file names its own path or URI: one kind, counted across batches, with an example.
    errors = [
        pa.array([f"row 'r{i}': video not found: /data/clips/{i}.mp4" for i in range(3)]),
        pa.array(
            [
                "row 's': cannot decode video s3://bucket/k 1/v.mp4: Invalid data",  # a space in the key
                "row 't': cannot decode video s3://bucket/w.mp4: Invalid data",
                "row 'u': cannot open image C:\\data\\a.png: FileNotFoundError: [Errno 2] 'C:\\data\\a.png'",
                "row 'v': mask m.png is 64x64, the video is 256x256",
                "row 'w': video has 3 frames, 16 requested: https://host/a.mp4?sig=1",
                # Slashes inside words are not paths, so these stay apart.
                "row 'x': cannot load model openai/clip-vit-base: I/O error",
                "row 'y': cannot load model laion/CLIP-ViT-H: I/O error",
            ]
        ),
        pa.array(["row 'r9': video not found: gs://b/9.mp4"]),
        # Longer than the 200 characters kept: masked before the cut, so the cut falls in the same place.
        pa.array(
            [
                f"row 'l{i}': cannot read s3://b/{'k' * i}.mp4: {'retried with backoff; ' * 12}"
                for i in range(1, 4)
            ]
        ),
    ]
    top = top_errors(errors, most=None)
    assert top[0] == {
        "count": 4,
        "error": "video not found: <uri>",
        "example": "video not found: /data/clips/0.mp4",
    }
    kinds = {e["error"]: e["count"] for e in top}
    assert kinds == {
        "video not found: <uri>": 4,
        "cannot decode video <uri>: Invalid data": 1,
        "cannot decode video <uri> <uri>: Invalid data": 1,
        "cannot open image <uri>: FileNotFoundError: [Errno 2] '<uri>'": 1,
        "mask <uri> is 64x64, the video is 256x256": 1,
        "video has 3 frames, 16 requested: <uri>": 1,
        "cannot load model openai/clip-vit-base: I/O error": 1,
        "cannot load model laion/CLIP-ViT-H: I/O error": 1,
        f"cannot read <uri>: {'retried with backoff; ' * 12}"[:200]: 3,
    }
    assert all(len(e["example"]) <= 200 for e in top)
    report = {
        "method": "evaluate",
        "run_id": "r",
        "rows": 9,
        "processed": 9,
        "ok": 0,
        "error": 9,
        "skipped": 0,
        "overall": {"ok": 0, "not_ok": 9},
        "wall_seconds": 1.0,
        "rows_per_second": None,
        "seconds_per_row": None,
        "items_per_gpu_hour": None,
        "top_errors": top[:1],
        "metrics": {},
        "outputs": {},
        "kept_from_other_settings": [{"run_id": "r0", "rows": 3, "models": {}, "params": {"num_frames": 8}}],
    }
    rendered = render(report)
    assert "error x4: video not found: <uri> (e.g. video not found: /data/clips/0.mp4)" in rendered
    assert (
        "kept 3 settled row(s) of run r0, which had other settings: models {}, params {'num_frames': 8}"
        in (rendered)
    )


def test_compaction_streams_a_runs_files_into_files_of_a_fixed_row_count(tmp_path):

    results = tmp_path / "results"
    results.mkdir()
    for n in range(5):
        rows = [ResultRow(id=f"r{n}-{i}", method="evaluate", run_id="run1") for i in range(7)]
        pq.write_table(result_table(rows), results / f"run1_{n}.parquet")
    pq.write_table(
        result_table([ResultRow(id="other", method="evaluate", run_id="run0")]), results / "run0_a.parquet"
    )
    assert resume.compact(str(results), "run1", rows_per_file=10) == 4
    files = sorted(p.name for p in results.iterdir())
    assert files[0] == "run0_a.parquet" and all(f.startswith("run1_part-") for f in files[1:])
    sizes = [pq.read_metadata(results / f).num_rows for f in files[1:]]
    assert sizes == [10, 10, 10, 5]
    ids = resume.read_results(str(results), ["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(["other"] + [f"r{n}-{i}" for n in range(5) for i in range(7)])
    assert resume.compact(str(results), "run1", rows_per_file=10) == 0  # nothing small left

    # A run killed before its end (run2) leaves its small files; the next run to end compacts them, but
    # keeps the file it cannot read (run2_9, alone), whose writer may still be writing it.
    for n in range(3):
        rows = [ResultRow(id=f"k{n}-{i}", method="evaluate", run_id="run2") for i in range(4)]
        pq.write_table(result_table(rows), results / f"run2_{n}.parquet")
    (results / "run2_9.parquet").write_bytes(b"PAR1 half a file")
    assert resume.compact_stopped_runs(str(results), "run3") == 1
    files = sorted(p.name for p in results.iterdir())
    assert "run2_9.parquet" in files
    assert sum(f.startswith("run2_part-") for f in files) == 1 and len(files) == 7
    ids = resume.read_results(str(results), ["id"]).column("id").to_pylist()
    assert len(ids) == 48 and len(set(ids)) == 48  # every row once
    assert resume.compact_stopped_runs(str(results), "run3") == 0  # run0's one file is no small files
    # Nothing to merge (two broken files), or a run that started after the caller: left alone.
    for name in ("run1b_0", "run1b_1", "run4_0", "run4_1"):
        pq.write_table(result_table([ResultRow(id=name, method="evaluate")]), results / f"{name}.parquet")
    for name in ("run1b_0", "run1b_1"):
        (results / f"{name}.parquet").write_bytes(b"PAR1 half a file")
    assert resume.compact_stopped_runs(str(results), "run3") == 0
    assert {"run1b_0.parquet", "run4_0.parquet", "run4_1.parquet"} <= {p.name for p in results.iterdir()}


def test_a_compaction_stopped_midway_is_finished_by_the_next_one_without_keeping_rows_twice(tmp_path):
    """A run killed in its own compaction leaves compacted files beside the small files they merged.
    The next compaction neither merges those rows again nor loses any."""
    results = tmp_path / "results"

    def run_files(small: range, part: range | None) -> None:
        shutil.rmtree(results, ignore_errors=True)
        results.mkdir()
        for n in small:
            pq.write_table(result_table(_rows(n)), results / f"run1_{n}.parquet")
        if part is not None:
            merged = [row for n in part for row in _rows(n)]
            pq.write_table(result_table(merged), results / "run1_part-dead0000-00000.parquet")

    def _rows(n: int) -> list[ResultRow]:
        return [ResultRow(id=f"r{n}-{i}", method="evaluate", run_id="run1") for i in range(3)]

    def stored_ids() -> list[str]:
        return resume.read_results(str(results), ["id"]).column("id").to_pylist()

    every = sorted(f"r{n}-{i}" for n in range(5) for i in range(3))
    # Killed while writing its compacted files: they hold only some rows; the small files are all there.
    run_files(small=range(5), part=range(2))
    assert resume.compact_stopped_runs(str(results), "run2") == 1
    assert sorted(stored_ids()) == every  # each row once
    assert all(p.name.startswith("run1_part-") for p in results.iterdir())
    # Killed while removing the small files: the compacted file holds every row; one small file is left.
    run_files(small=range(4, 5), part=range(5))
    assert resume.compact_stopped_runs(str(results), "run2") == 0  # nothing to write, one file to remove
    assert sorted(stored_ids()) == every and len(list(results.iterdir())) == 1
    # A small file that the stopped compaction merged part of.
    run_files(small=range(5), part=range(3))
    pq.write_table(result_table(_rows(3)[:1]), results / "run1_part-dead0000-00001.parquet")
    assert resume.compact_stopped_runs(str(results), "run2") == 1
    assert sorted(stored_ids()) == every
    assert all(p.name.startswith("run1_part-") for p in results.iterdir())


def test_a_read_or_compaction_meeting_files_compacted_away_meanwhile_loses_and_doubles_no_row(
    tmp_path, monkeypatch, capsys
):
    """A job submitted twice, or a report made as a job ends: another process compacts a run between a
    reader's listing of its files and the read. A reader lists again; a compaction leaves the run to the
    other one."""
    results = tmp_path / "results"
    ids = sorted(f"r{n}-{i}" for n in range(4) for i in range(3))
    original = resume._dataset

    def small_files() -> None:
        for path in results.glob("*.parquet"):
            path.unlink()
        for n in range(4):
            rows = [ResultRow(id=f"r{n}-{i}", method="evaluate", run_id="run1") for i in range(3)]
            pq.write_table(result_table(rows), results / f"run1_{n}.parquet")

    def compacted_meanwhile(fs, files):
        dataset = original(fs, files)
        if any("_part-" not in f for f in files):
            monkeypatch.setattr(resume, "_dataset", original)  # the other process, at work
            assert resume.compact(str(results), "run1") == 1
            monkeypatch.setattr(resume, "_dataset", compacted_meanwhile)
        return dataset  # of files that are gone now

    results.mkdir()
    monkeypatch.setattr(resume, "_dataset", compacted_meanwhile)
    small_files()
    assert sorted(resume.read_results(str(results), ["id"]).column("id").to_pylist()) == ids
    small_files()
    batches = resume.scan_results(str(results), ["id"])
    assert sorted(i for batch in batches for i in batch.column("id").to_pylist()) == ids
    small_files()
    assert resume.compact(str(results), "run1", rows_per_file=5) == 0
    assert "being compacted by another process" in capsys.readouterr().err
    assert len(list(results.iterdir())) == 1  # the other one's file (this one had written none)
    monkeypatch.setattr(resume, "_dataset", original)
    assert sorted(resume.read_results(str(results), ["id"]).column("id").to_pylist()) == ids


def test_rows_lost_by_failed_tasks_get_one_retryable_error_row_each_written_a_slice_at_a_time(
    tmp_path, monkeypatch
):
    from actors.base import JobConfig
    from jobs import runner
    from schemas.manifests import ATTEMPT_COLUMN

    results = tmp_path / "out" / "results"
    results.mkdir(parents=True)
    done = [ResultRow(id="r1", method="evaluate", run_id="run2"), ResultRow(id="r3", method="evaluate")]
    pq.write_table(result_table(done[:1]), results / "run2_a.parquet")
    pq.write_table(result_table(done[1:]), results / "run1_a.parquet")  # an earlier run's row is no help
    todo = pa.table({"id": [f"r{i}" for i in range(6)], ATTEMPT_COLUMN: [1, 1, 2, 1, 3, 1]})
    monkeypatch.setattr(runner, "LOST_ROWS_PER_WRITE", 2)
    config = JobConfig(method="evaluate", output=str(tmp_path / "out"), run_id="run2", models={})
    runner.backfill_lost(todo, str(results), config)
    lost = pq.read_table(results / "run2_lost.parquet")
    assert [len(group) for group in lost.to_batches()] == [2, 2, 1]
    assert lost.column("id").to_pylist() == ["r0", "r2", "r3", "r4", "r5"]
    assert lost.column("attempt").to_pylist() == [1, 2, 1, 3, 1]
    assert set(lost.column("status").to_pylist()) == {"error"} and all(lost.column("retryable").to_pylist())
    assert set(lost.column("run_id").to_pylist()) == {"run2"}
    assert lost.column("error")[1].as_py().startswith("row 'r2': no result came back")
    runner.backfill_lost(todo, str(results), config)  # every row has one now: nothing more is written
    assert resume.read_results(str(results), ["id"], prefix="run2").num_rows == 6


def test_a_driver_killed_halfway_resumes_to_every_id_ok_once(ray_cluster, data_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    videos = sorted((data_dir / "videos").glob("*.mp4")) or sorted(data_dir.glob("*.mp4"))
    rows = 160
    records = [
        {"id": f"row-{i:03d}", "video": str(videos[i % len(videos)]), "prompt": "a clip"} for i in range(rows)
    ]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(records), manifest)
    output = tmp_path / "out"
    results = output / "results"
    args = ["evaluate", "--manifest", str(manifest), "--output", str(output), "--clip", "tiny"]
    args += ["--batch-size", "1", "--set", "num_frames=4"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    driver = subprocess.Popen([sys.executable, "-m", "jobs", *args], env=env, cwd=Path(__file__).parents[1])
    deadline = time.time() + 120
    while time.time() < deadline and len(list(results.glob("*.parquet"))) < 2:  # two of its four tasks'
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)  # as a preempted head node would lose it
    driver.wait()
    # Ray ends a dead driver's workers soon after it, not at once: a writer may still finish its file, or
    # leave it empty (seen here on a loaded machine). Resume once the results stop changing, as the check
    # that no row ran twice needs.
    before, deadline = None, time.time() + 60
    while time.time() < deadline:
        now = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in results.glob("*"))
        if now == before:
            break
        before = now
        time.sleep(2)
    written = resume.read_results(str(results)).num_rows  # an unreadable file is left out, as resume does
    assert 0 < written < rows, written  # killed halfway
    left = json.loads((output / "lease.json").read_text())  # the killed driver's: taken over, not waited out
    assert left["pid"] == driver.pid

    report = run_job(JobSpec(method="evaluate", manifest=str(manifest), output=str(output),
                             models={"clip": "tiny"}, params={"num_frames": 4}))  # fmt: skip
    assert report["skipped"] >= written and report["processed"] == rows - report["skipped"]
    assert not (output / "lease.json").exists()
    # The killed run left the record of what it was asked, which the CLI and this call ask alike.
    killed = [json.loads(p.read_text()) for p in (output / "runs").glob("*.json")]
    killed = [r for r in killed if r["run_id"] != report["run_id"]]
    assert len(killed) == 1 and "processed" not in killed[0] and killed[0]["models"] == {"clip": "tiny"}
    assert killed[0]["run_id"] == left["run_id"]
    assert report["kept_from_other_settings"] == []
    table = resume.read_results(str(results))
    latest = resume.latest(table)
    assert latest.num_rows == rows and set(latest.column("status").to_pylist()) == {"ok"}
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    assert ok.num_rows == rows and len(set(ok.column("id").to_pylist())) == rows  # none ran twice

    # The killed run's files were compacted by the run that resumed it: what is left of them but its
    # part files cannot be read (a writer killed mid-file).
    def readable(path: Path) -> bool:
        try:
            pq.read_metadata(path)
        except pa.ArrowInvalid:
            return False
        return True

    left = [p.name for p in results.glob(f"{killed[0]['run_id']}_*.parquet")]
    assert any("_part-" in name for name in left), left
    assert not [name for name in left if "_part-" not in name and readable(results / name)], left


def test_a_manifest_may_be_a_folder_or_a_glob_of_parquet_files(tmp_path):
    from jobs.runner import JobError, read_manifest

    folder = tmp_path / "manifest"
    folder.mkdir()
    for part in range(3):
        ids = [f"p{part}-{i}" for i in range(4)]
        pq.write_table(pa.table({"id": ids, "video": ["v.mp4"] * 4}), folder / f"part-{part}.parquet")
    assert read_manifest(str(folder)).num_rows == 12
    assert read_manifest(str(folder / "part-[01].parquet")).num_rows == 8
    with pytest.raises(JobError, match="does not exist"):
        read_manifest(str(tmp_path / "none-*.parquet"))
    # The report's shown rows: some columns and ids, also from a file that wrote its ids as string views.
    view = pa.table({"id": pa.array(["p3-0", "p3-1"], pa.string_view()), "video": ["w.mp4"] * 2})
    pq.write_table(view, folder / "part-3.parquet")
    shown = read_manifest(str(folder), ["id", "video", "prompt"], pa.array(["p0-1", "p3-1", "gone"]))
    assert shown.column_names == ["id", "video"]
    assert shown.to_pylist() == [{"id": "p0-1", "video": "v.mp4"}, {"id": "p3-1", "video": "w.mp4"}]


def test_manifest_files_written_apart_are_read_under_one_plain_schema_and_a_conflict_names_its_file(tmp_path):
    from jobs.runner import JobError, as_kind, manifest_ids, open_manifest, read_manifest
    from schemas import ManifestError

    folder = tmp_path / "manifest"
    folder.mkdir()
    # As pandas writes a part whose prompts are all missing, and another tool a part with int32 seeds.
    no_prompts = pa.array([None, None], pa.null())
    pq.write_table(
        pa.table({"id": ["a", "b"], "video": ["v.mp4"] * 2, "prompt": no_prompts}), folder / "p0.parquet"
    )
    pq.write_table(pa.table({"id": ["c"], "video": ["v.mp4"], "prompt": ["a cat"]}), folder / "p1.parquet")
    seeds = pa.array([7], pa.int32())
    pq.write_table(pa.table({"id": ["d"], "video": ["v.mp4"], "seed": seeds}), folder / "p2.parquet")
    pq.write_table(pa.table({"id": ["e"], "video": ["v.mp4"], "seed": [8]}), folder / "p3.parquet")
    # A categorical of pandas, string views of polars, large lists: read as plain strings and lists.
    ids, videos = pa.array(["g"], pa.string_view()), pa.array(["v.mp4"]).dictionary_encode()
    styles = pa.array([["s.png"]], pa.large_list(pa.large_string()))
    pq.write_table(pa.table({"id": ids, "video": videos, "style": styles}), folder / "p3b.parquet")
    manifest = open_manifest(str(folder))
    assert manifest.schema.field("prompt").type == pa.string()
    assert manifest.schema.field("seed").type == pa.int64()
    assert manifest.schema.field("video").type == pa.string()
    assert manifest.schema.field("style").type == pa.list_(pa.string())
    assert manifest_ids(manifest, "eval", str(folder)).to_pylist() == ["a", "b", "c", "d", "e", "g"]
    table = read_manifest(str(folder))
    assert table.column("prompt").to_pylist() == [None, None, "a cat", None, None, None]
    assert table.column("seed").to_pylist() == [None, None, None, 7, 8, None]  # not dropped for p0's lack
    assert table.column("style").to_pylist() == [None] * 5 + [["s.png"]]

    # pandas writes an integer column with a missing value as float64: read as the integers they were.
    frames = pa.array([8.0, None])
    pq.write_table(
        pa.table({"id": ["h", "i"], "video": ["v.mp4"] * 2, "num_frames": frames}), folder / "p3c.parquet"
    )
    # Beside a file of 64-bit seeds, which no float holds exactly: each file is checked as written.
    big = pa.table({"id": ["h2"], "video": ["v.mp4"], "num_frames": pa.array([2**53 + 1], pa.int64())})
    pq.write_table(big, folder / "p3c2.parquet")
    manifest = open_manifest(str(folder))
    assert manifest.schema.field("num_frames").type == pa.float64()  # as the files are unified
    assert len(manifest_ids(manifest, "eval", str(folder))) == 9  # valid: its values are whole
    typed = as_kind(manifest, "eval")  # as run_job scans its rows
    assert typed.to_table().column("num_frames").to_pylist()[-3:] == [8, None, 2**53 + 1]
    (folder / "p3c2.parquet").unlink()
    assert read_manifest(str(folder)).column("num_frames").to_pylist()[-2:] == [8.0, None]
    # A value that is no whole number refuses the manifest before Ray starts, naming its row and value.
    frames = pa.array([16.0, 7.5, None, float("nan")])
    pq.write_table(
        pa.table({"id": ["j", "k", "l", "m"], "video": ["v.mp4"] * 4, "num_frames": frames}),
        folder / "p3d.parquet",
    )
    with pytest.raises(
        ManifestError, match=r"'num_frames' .* not one in 2 row\(s\): 'k' \(7\.5\), 'm' \(nan\)"
    ):
        manifest_ids(open_manifest(str(folder)), "eval", str(folder))
    (folder / "p3d.parquet").unlink()

    # The odd file sorts first here: the message names both files, since either may be the odd one.
    pq.write_table(pa.table({"id": ["f"], "video": ["v.mp4"], "seed": ["eight"]}), folder / "p0-odd.parquet")
    with pytest.raises(JobError, match=r"'seed' is int32 in file .*p2\.parquet but string in file .*p0-odd"):
        open_manifest(str(folder))
    (folder / "p0-odd.parquet").unlink()
    (folder / "p4.parquet").write_bytes(b"not parquet")
    (folder / "p4.parquet").write_bytes(b"not parquet")
    with pytest.raises(JobError, match=r"p4\.parquet"):
        open_manifest(str(folder))


def test_the_rows_to_run_are_scanned_into_blocks_of_a_tasks_rows_with_their_attempt_numbers(
    ray_cluster, tmp_path
):
    """The driver scans the manifest a batch at a time (here row groups of 3 rows in 3 files): settled
    ids are left out, each row carries its attempt number, and every block but the last has exactly
    the task's rows, across file boundaries. A manifest rewritten after validation is refused rather
    than run unchecked; a corrupt file is a JobError, not a crash."""
    import ray

    from jobs.runner import JobError, manifest_ids, open_manifest, pending_rows, put_blocks
    from schemas.manifests import ATTEMPT_COLUMN

    folder = tmp_path / "manifest"
    folder.mkdir()
    for part in range(3):
        ids = [f"p{part}-{i}" for i in range(7)]
        pq.write_table(
            pa.table({"id": ids, "video": [f"{i}.mp4" for i in ids]}),
            folder / f"part-{part}.parquet",
            row_group_size=3,
        )
    settled = pa.array(["p0-0", "p1-3", "p1-4", "p2-6", "elsewhere"])
    attempts = pa.table({"id": ["p0-1", "p1-3", "p2-0"], "attempts": [2, 1, 1]})
    manifest = open_manifest(str(folder))
    ids = manifest_ids(manifest, "eval", str(folder))
    todo = pending_rows(pa.table({"id": ids}), settled, attempts)
    blocks = ray.get(put_blocks(manifest, ids, todo, 4, str(folder)))
    assert [b.num_rows for b in blocks] == [4, 4, 4, 4, 1]
    rows = pa.concat_tables(blocks).to_pylist()
    expected = [f"p{p}-{i}" for p in range(3) for i in range(7) if f"p{p}-{i}" not in settled.to_pylist()]
    assert [r["id"] for r in rows] == expected  # manifest order
    assert {r["id"]: r[ATTEMPT_COLUMN] for r in rows if r[ATTEMPT_COLUMN] != 1} == {"p0-1": 3, "p2-0": 2}
    assert all(r["video"] == f"{r['id']}.mp4" for r in rows)

    pq.write_table(pa.table({"id": ["late"], "video": ["late.mp4"]}), folder / "part-3.parquet")
    with pytest.raises(JobError, match="changed while the job started"):
        put_blocks(open_manifest(str(folder)), ids, todo, 4, str(folder))
    # A file whose footer reads but whose pages do not: found only when the scan reaches it.
    corrupt = bytearray((folder / "part-0.parquet").read_bytes())
    corrupt[40:80] = b"\xff" * 40  # inside the first column's compressed pages
    (folder / "part-9.parquet").write_bytes(bytes(corrupt))
    manifest = open_manifest(str(folder))
    with pytest.raises(JobError, match="cannot read manifest"):
        manifest_ids(manifest, "eval", str(folder))


def test_the_decode_stage_gives_the_actor_the_inputs_it_would_read_itself(data_dir, tmp_path):
    """Rows decoded by the CPU stage score exactly as rows the actor reads; a row that cannot be read
    carries its error (and whether a rerun may help) to the actor, which writes its error row."""
    from actors.base import JobConfig
    from actors.evaluate import EvaluateActor
    from actors.read_stage import decode_rows

    video = str(sorted((data_dir / "videos").glob("*.mp4"))[0])
    image = str(sorted((data_dir / "images").glob("*"))[0])
    mask = tmp_path / "mask.png"
    half = np.zeros((32, 32), np.uint8)
    half[:, :16] = 255
    Image.fromarray(half).save(mask)
    rows = pa.Table.from_pylist(
        [
            {
                "id": "a",
                "video": video,
                "prompt": "a dance",
                "image": image,
                "source_video": video,
                "mask": str(mask),
                "style": [image, image],
            },
            {
                "id": "b",
                "video": video,
                "prompt": None,
                "image": None,
                # No LPIPS and no mask: nothing compares against a source, so it is not read at all.
                "source_video": str(tmp_path / "never-read.mp4"),
                "mask": None,
                "style": None,
            },
            {
                "id": "c",
                "video": str(tmp_path / "gone.mp4"),
                "prompt": "x",
                "image": None,
                "source_video": None,
                "mask": None,
                "style": None,
            },
            {
                "id": "d",
                "video": video,
                "prompt": "a dance",
                "image": image,
                "source_video": None,
                "mask": None,
                "style": [image, image],
            },
        ]
    )
    config = JobConfig(
        method="evaluate",
        output=str(tmp_path / "out"),
        run_id="r",
        models={"clip": "tiny"},
        params=dict(FAST),
    )
    actor = EvaluateActor(config)  # no decode settings: it reads and crops for CLIP itself
    # As the runner does: the settings found where the models were prepared, for the decode stage.
    staged_config = dataclasses.replace(config, decode=EvaluateActor.decode_settings(config))
    assert staged_config.decode == {
        "clip_crop": {"shortest_edge": 32, "size": None, "crop": (32, 32), "resample": 3}
    }
    decoded = decode_rows(rows, EvaluateActor, staged_config)
    assert decoded.column("_decoded").null_count == 1
    assert "not found" in decoded.column("_decode_error")[2].as_py()
    # The CPU stage did CLIP's resize and crop: FAST's 4 frames, the image and the two styles, uint8.
    # Row a's outside-mask PSNR reads its frames at their own size too; rows b and d (CLIP only) send the
    # crops alone, with where the image starts in them.
    arrays, only_crops, with_references = (
        media.unpack_arrays(decoded.column("_decoded")[i].as_py()) for i in (0, 1, 3)
    )
    assert arrays["clip_crops"].shape == (4 + 1 + 2, 32, 32, 3) and arrays["clip_crops"].dtype == np.uint8
    assert arrays["frames"].shape[1:3] == arrays["source"].shape[1:3] != (32, 32)
    assert set(only_crops) == set(with_references) == {"clip_crops", "crops_only"}
    assert only_crops["clip_crops"].shape == (4, 32, 32, 3)
    assert np.array_equal(only_crops["clip_crops"], arrays["clip_crops"][:4])  # same video, same crops
    assert np.array_equal(with_references["clip_crops"], arrays["clip_crops"])
    assert with_references["crops_only"].tolist() == [4, 1] and only_crops["crops_only"].tolist() == [4, 0]
    direct, staged = actor(rows).to_pylist(), actor(decoded).to_pylist()
    assert [r["status"] for r in staged] == ["ok", "ok", "error", "ok"]
    assert (
        staged[2]["retryable"] is False and "'c'" in staged[2]["error"] and "not found" in staged[2]["error"]
    )
    for one, other in zip(direct, staged, strict=True):
        for name in ("clip_text", "clip_image", "clip_style", "clip_temporal", "outside_mask_psnr", "error"):
            assert one[name] == other[name]  # the same crops, whichever process made them
        assert json.loads(other["params"]) == json.loads(one["params"])  # no bookkeeping column leaked
    assert staged[0]["outside_mask_psnr"] == float("inf")  # the source is the video itself
    assert None not in (staged[3]["clip_image"], staged[3]["clip_style"])  # found in the crops-only layout


def test_jobs_built_in_python_get_the_released_defaults_too():
    """`tiny` only when asked for by name: the Python API fills in the same defaults as the CLI."""
    from jobs.runner import with_default_models

    assert with_default_models(JobSpec("livesketch", "m", "o")).models == {
        "backbone": "ali-vilab/text-to-video-ms-1.7b"
    }
    assert with_default_models(JobSpec("stylecrafter", "m", "o", models={"clip": None})).models == {
        "clip": None,
        "backbone": "VideoCrafter/Text2Video-512",
        "adapter": "liuhuohuo/StyleCrafter",
    }
    assert with_default_models(JobSpec("dreammotion", "m", "o", models={"backbone": "tiny"})).models == {
        "backbone": "tiny"
    }
    assert with_default_models(JobSpec("evaluate", "m", "o")).models == {}


def test_a_job_that_names_no_model_starts_no_prepare_task(monkeypatch):
    """Nothing to fetch or check: the job goes straight to its actors (a Ray task start-up saved)."""
    from actors.base import JobConfig
    from jobs import runner

    def no_cluster_call():
        raise AssertionError("prepare_on_nodes looked for nodes")

    monkeypatch.setattr(runner.ray, "nodes", no_cluster_call)
    config = JobConfig(method="evaluate", output="out", run_id="r", models={"clip": None, "lpips": None})
    runner.prepare_on_nodes(config, JobSpec("evaluate", "m", "out", models=config.models))
    with pytest.raises(AssertionError, match="looked for nodes"):
        named = JobConfig(method="evaluate", output="out", run_id="r", models={"clip": "tiny"})
        runner.prepare_on_nodes(named, JobSpec("evaluate", "m", "out"))


def test_a_node_that_leaves_while_models_are_prepared_is_left_out(ray_cluster, tmp_path, monkeypatch, capsys):
    """The preparation task pinned to a node preempted after it was listed cannot run anywhere: the job
    goes on with the nodes left (before, the job failed with Ray's TaskUnschedulableError)."""
    import ray

    from actors.base import JobConfig
    from jobs import runner

    leaving = ray_cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=150 * 2**20)
    ray_cluster.wait_for_nodes()
    listing = ray.nodes

    def listed_then_preempted() -> list:
        nodes = listing()
        if leaving in ray_cluster.worker_nodes:  # the first listing still has it
            ray_cluster.remove_node(leaving)
        return nodes

    monkeypatch.setattr(runner.ray, "nodes", listed_then_preempted)
    config = JobConfig(method="evaluate", output=str(tmp_path), run_id="r", models={"clip": "tiny"})
    settings = runner.prepare_on_nodes(config, JobSpec("evaluate", "m", str(tmp_path), gpus_per_actor=1))
    assert "clip_crop" in settings
    assert f"node {leaving.node_id} left the cluster while it prepared models" in capsys.readouterr().out


def test_the_decode_stage_gives_up_a_read_stopped_at_the_limit_or_killing_its_process(data_dir, tmp_path):
    """Ray Data retries a decode task whose process died without end: the batch's marker tells the retry
    which row's read was stopped at the time limit or died, so that only that row is given up (a stop at
    once, deaths after `max_row_crashes`), and only within the run that saw it. A retry of a task that
    failed in another batch charges no death to this one."""
    from actors.base import (
        DECODE_ERROR_COLUMN,
        DECODE_RETRYABLE_COLUMN,
        DECODED_COLUMN,
        JobConfig,
        inflight_marker,
    )
    from actors.evaluate import EvaluateActor
    from actors.read_stage import decode_rows

    video = str((sorted((data_dir / "videos").glob("*.mp4")) or sorted(data_dir.glob("*.mp4")))[0])
    config = JobConfig(method="evaluate", output=str(tmp_path / "out"), run_id="this-run", max_row_crashes=2)
    run = {"run_id": "this-run"}
    stop = {**run, "reading": "x", "stopped": {"x": 30.0}}  # what the time limit leaves
    for ids, record, x_error, kept in [
        (["x", "y"], {**stop, "starts": 1}, "row time limit (30 s)", True),
        (["x", "y"], {**run, "starts": 2, "reading": "x", "deaths": {"x": 1}}, "died 2 times", True),
        (["x", "y"], {**run, "starts": 2, "reading": "x"}, None, False),  # one death: read it again
        (["x", "y"], {**stop, "starts": 1, "run_id": "earlier-run"}, None, False),  # not this run's
        # Kept after x was given up; the task failed later, in another batch: y did not die.
        (["x", "y"], {**run, "starts": 2, "stopped": {"x": 30.0}, "finished": True}, "row time limit", True),
        # A batch of one died before its rows were noted (the first attempt): the death is x's.
        (["x"], {**run, "starts": 1}, None, False),
        (["x"], {**run, "starts": 2, "deaths": {"x": 1}}, "died 2 times", True),
    ]:
        rows = pa.Table.from_pylist([{"id": i, "video": video, "prompt": None} for i in ids])
        marker = inflight_marker(config.output, ids, "decode")
        media.write_text(json.dumps(record), marker)
        out = decode_rows(rows, EvaluateActor, config).to_pylist()
        assert all(r[DECODED_COLUMN] is not None and r[DECODE_ERROR_COLUMN] is None for r in out[1:])  # y
        assert (out[0][DECODED_COLUMN] is None) is (x_error is not None)
        if x_error:
            assert x_error in out[0][DECODE_ERROR_COLUMN]
            assert out[0][DECODE_RETRYABLE_COLUMN] is ("died" in x_error)  # a stop is not retryable
        assert media.exists(marker) is kept  # a given-up row's marker stays for the run's later retries
        if kept:
            assert "y" not in json.loads(media.read_bytes(marker))["deaths"]


def test_a_stalled_read_in_the_decode_stage_is_stopped_at_the_row_time_limit(
    ray_cluster, data_dir, tmp_path, stalling_server
):
    """A server that accepts the connection and never answers held a decode task forever, and so the
    whole job: the read is stopped at the limit, the row given up, and its batch-mate finishes."""
    video = str((sorted((data_dir / "videos").glob("*.mp4")) or sorted(data_dir.glob("*.mp4")))[0])
    stalled = f"{stalling_server}/clip.mp4"
    records = [{"id": "fine", "video": video, "num_frames": 4}, {"id": "stalled", "video": stalled}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "m.parquet")
    output = tmp_path / "out"
    # A GPU pool, as in the jobs that have the stage: its CPU tasks are then not fused with the actors.
    spec = JobSpec(
        "evaluate", str(tmp_path / "m.parquet"), str(output), models={}, batch_size=2, gpus_per_actor=1
    )
    report = run_job(dataclasses.replace(spec, row_time_limit_s=3))
    rows = _latest(output)
    assert report["processed"] == 2 and rows["fine"]["status"] == "ok"
    assert "reading its inputs ran past the row time limit (3 s)" in rows["stalled"]["error"]
    assert not rows["stalled"]["retryable"]


def test_a_decode_worker_reports_a_bad_row_without_importing_torch(data_dir, tmp_path):
    """The decode stage's CPU workers read media only: the first error row made each import torch (1.6 s
    and about 170 MB a process) to tell a missing file from a CUDA out-of-memory error."""
    import subprocess
    import sys

    check = f"""
import sys, pyarrow as pa
from actors.base import DECODE_ERROR_COLUMN, JobConfig
from actors.read_stage import decode_rows
from actors.evaluate import EvaluateActor
rows = pa.Table.from_pylist([{{"id": "a", "video": {str(tmp_path / "missing.mp4")!r}, "prompt": None}}])
config = JobConfig(method="evaluate", output={str(tmp_path / "out")!r}, run_id="r")
(row,) = decode_rows(rows, EvaluateActor, config).to_pylist()
print("torch" in sys.modules, row[DECODE_ERROR_COLUMN])
"""
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    imported, error = out.stdout.strip().split(" ", 1)
    assert "not found" in error and imported == "False"


def test_a_node_lost_mid_job_takes_no_row_with_it(ray_cluster, data_dir, tmp_path):
    """A GPU node preempted with a batch in flight: its actor comes back on another node, the batch is
    run again, and every row ends ok. Two GPUs are held while the job starts, so its one actor lands on
    the node that is then removed; its batch is held in the read of a row served from loopback until the
    node is gone."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import ray

    video = (sorted((data_dir / "videos").glob("*.mp4")) or sorted(data_dir.glob("*.mp4")))[0]
    asked, node_gone = threading.Event(), threading.Event()

    class HeldUntilTheNodeIsGone(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.set()
            node_gone.wait(120)
            body = video.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), HeldUntilTheNodeIsGone)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    held_uri = f"http://127.0.0.1:{server.server_address[1]}/clip.mp4"
    records = [{"id": f"r{i}", "video": str(video)} for i in range(6)] + [{"id": "held", "video": held_uri}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "m.parquet")

    @ray.remote(num_gpus=1, num_cpus=0)
    class Hold:
        def ready(self) -> None:
            pass

    holds = [Hold.remote() for _ in range(2)]  # the two GPUs of the session's nodes
    spec = JobSpec("evaluate", str(tmp_path / "m.parquet"), str(tmp_path / "out"), params=dict(FAST),
                   gpus_per_actor=1, batch_size=7, decode_stage=False)  # fmt: skip
    report: dict = {}
    job = threading.Thread(target=lambda: report.update(run_job(spec)), daemon=True)
    spare = None
    try:  # whatever happens, the session's cluster is left as it was: both GPUs free, no third node
        ray.get([h.ready.remote() for h in holds], timeout=120)
        spare = ray_cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=150 * 2**20)
        job.start()
        assert asked.wait(120), "the held row was never read"
        ray.kill(holds[0])  # room for the actor to come back
        ray_cluster.remove_node(spare)
        node_gone.set()
        job.join(240)
    finally:
        node_gone.set()
        for h in holds:
            ray.kill(h)
        if spare is not None and spare in ray_cluster.worker_nodes:
            ray_cluster.remove_node(spare)
        if job.is_alive():
            job.join(240)
        server.shutdown()
    assert not job.is_alive() and report["processed"] == 7
    rows = _latest(tmp_path / "out")
    assert {r["status"] for r in rows.values()} == {"ok"} and len(rows) == 7
    assert spare.node_id not in {r["node"] for r in rows.values()}  # the whole batch ran again elsewhere
