"""The progress line's arithmetic and its once-per-id error messages (the job-submit test sees it live)."""

from __future__ import annotations

import io

import pytest

from jobs.progress import Progress
from schemas import OK


def test_rows_are_counted_once_and_each_error_is_reported_once_with_its_id():
    progress = Progress(total=4, gpus=2.0, stream=io.StringIO())
    first = progress.add([("a", "ok", None), ("b", "error", "row 'b': cannot decode video")])
    again = progress.add(
        [("b", "error", "row 'b': cannot decode video"), ("c", "ok", None)]
    )  # a retried task
    assert first == ["[anima] error: row 'b': cannot decode video"] and again == []
    line = progress.line(now=progress.started + 30.0)
    # 3 rows in 30 s on 2 GPUs: 0.1 rows/s, 1 row left -> 10 s; 3 / (30 s x 2 GPUs) = 180 items per GPU-hour.
    assert line == "[anima] 3/4 rows (ok 2, error 1), 0.10 rows/s, ETA 10s, 180.0 items/GPU-h"


def test_a_cpu_job_says_it_has_no_gpus_and_a_finished_one_says_done():
    progress = Progress(total=1, gpus=0.0, stream=io.StringIO())
    assert progress.line(now=progress.started + 1.0).endswith("ETA unknown, no GPUs")
    progress.add([("a", "ok", None)])
    assert "ETA done" in progress.line(now=progress.started + 2.0)


@pytest.mark.parametrize("runtime_env", [None, {"env_vars": {"ANIMA_TEST": "1"}}])
def test_the_tap_and_the_result_writer_run_as_one_task_per_block(ray_cluster, tmp_path, runtime_env):
    """Unequal remote args would keep them apart: a second task per block, and on a small machine more
    worker processes started while the first ones import Ray Data."""
    import pyarrow as pa
    import ray

    from jobs.runner import JobSpec, writer_args

    args = writer_args(JobSpec("evaluate", "m", "o", runtime_env=runtime_env))
    rows = ray.data.from_blocks([pa.table({"id": ["a", "b"], "status": [OK, "error"], "error": [None, "x"]})])
    line = Progress(2, 0, io.StringIO())
    with line:
        tapped = line.tap(rows, args)
        tapped.write_parquet(str(tmp_path), ray_remote_args=args)
    assert "MapBatches(_report)->Write" in tapped.stats()
    assert (len(line.done), line.ok) == (2, 1)


def test_the_tally_process_does_not_import_ray_data():
    """The tally's actor process imports this module while the job's other processes start beside it."""
    import subprocess
    import sys

    check = "import sys, jobs.progress; print(sorted(m for m in sys.modules if m.startswith('ray.data')))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_tally_lives_on_the_drivers_node_and_its_loss_costs_only_the_count(ray_cluster, monkeypatch):
    """On a node that was preempted, the tally took every later block's write down, and with it the job
    (seen on the simulated cluster: a job of 600 rows failed at row 16). Now it lives on the driver's node,
    and a tally that is gone costs the progress line its counts, never a block or the job."""
    import time

    import pyarrow as pa
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from jobs import progress
    from jobs.progress import _report

    placed: dict = {}
    tally_class = progress._Tally

    class Placement:  # Ray's default would often place it here too: the request itself is checked
        @staticmethod
        def options(**options):
            placed.update(options)
            return tally_class.options(**options)

    monkeypatch.setattr(progress, "_Tally", Placement)
    stream = io.StringIO()
    line = Progress(3, 0, stream)
    line.tap(ray.data.from_blocks([pa.table({"id": ["a"]})]), {})
    where = placed["scheduling_strategy"]
    assert isinstance(where, NodeAffinitySchedulingStrategy) and not where.soft
    assert where.node_id == ray.get_runtime_context().get_node_id()

    batch = pa.table({"id": ["a", "b"], "status": [OK, "error"], "error": [None, "x"]})
    assert _report(batch, line._tally) is batch
    asked, get = [], ray.get

    def slow_once(ref, timeout=None):  # the first drain outlasts its timeout, then answers
        asked.append(ref)
        if len(asked) == 1:
            raise ray.exceptions.GetTimeoutError("slow")
        return get(ref, timeout=timeout)

    with monkeypatch.context() as patch:
        patch.setattr(progress.ray, "get", slow_once)
        line._update()
        assert line.line().startswith("[anima] 0/3 rows")
        line._update()  # waits for the same drain: its rows are not lost with the timeout
    assert asked[0] is asked[1] and line.line().startswith("[anima] 2/3 rows (ok 1, error 1)")
    tally = line._tally
    ray.kill(tally)
    deadline = time.monotonic() + 30
    with pytest.raises(ray.exceptions.ActorDiedError):  # gone before the tap meets it
        while time.monotonic() < deadline:
            ray.get(tally.drain.remote())
            time.sleep(0.05)
    assert _report(batch, tally) is batch  # the block goes on to its writer
    line._update()
    line._update()  # and the line goes on without its count
    assert stream.getvalue().count("progress count was lost") == 1
    assert line.line().startswith("[anima] 2/3 rows (ok 1, error 1)")
