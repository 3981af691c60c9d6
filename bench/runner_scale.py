"""The runner at scale: cheap rows (every video missing), so the runner itself is measured.

For each size, in a fresh driver process on a local Ray instance: time to the first result file,
total wall time, driver peak RSS, result files left, and the time of a resume with nothing to do. Then
the evaluation job vs a plain loop over the same real-clip rows (`--clip none`, the default batch size),
and the job's rows/s with its CPU decode stage vs with the actors reading their own inputs (tiny CLIP);
last, the plain loop again while Ray is up and idle: what Ray's own processes cost a loop on this host.

    python bench/runner_scale.py [--rows 10000 100000 1000000] [--loop-rows 2000]

Targets on a 2-core machine: 10^6 rows start within 60 s with driver RSS <= 2 GB; a resume of 10^6
settled rows within 30 s; the job <= 1.2x the plain loop.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def one_size(rows: int) -> dict:
    """Run in its own process: the measurements of one manifest size."""
    import ray

    from jobs.runner import JobSpec, run_job

    directory = Path(tempfile.mkdtemp(prefix="runner-scale-"))
    manifest = directory / "manifest.parquet"
    # Built by Arrow, so the driver's memory is the runner's, not a million Python strings'.
    numbers = pc.cast(pa.array(range(rows)), pa.string())
    ids = pc.binary_join_element_wise("row-", numbers, "")
    videos = pc.binary_join_element_wise(f"{directory}/missing-", numbers, ".mp4", "")
    pq.write_table(pa.table({"id": ids, "video": videos}), manifest)
    del numbers, ids, videos
    output = directory / "out"
    ray.init(address="local", log_to_driver=False)  # its own instance, never a cluster found running
    first: list[float] = []
    start = time.perf_counter()

    def watch() -> None:
        while not first:
            if list((output / "results").glob("*.parquet")):
                first.append(time.perf_counter() - start)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    spec = JobSpec(method="evaluate", manifest=str(manifest), output=str(output), models={})
    run_job(spec)
    wall = time.perf_counter() - start
    first.append(wall)
    files = len(list((output / "results").glob("*.parquet")))
    start = time.perf_counter()
    again = run_job(spec)
    resume_s = time.perf_counter() - start
    assert again["processed"] == 0
    return {
        "rows": rows,
        "first_result_s": first[0],
        "wall_s": wall,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "result_files": files,
        "resume_s": resume_s,
    }


def loop_vs_job(rows: int) -> tuple[float, float, float, float, float, float]:
    """Seconds of the evaluation job and of a plain loop doing the same per-row work (no CLIP); then of
    the job with tiny CLIP with and without its decode stage; then the job's rows' summed seconds in
    its actor (the rest of the job is start-up and hand-offs); last, the same plain loop again while Ray
    is up and idle, which tells Ray's own background cost on this host from the runner's."""
    import ray

    from actors.base import JobConfig
    from actors.evaluate import EvaluateActor
    from jobs.runner import JobSpec, run_job

    clips = sorted((REPO / "jobs" / "demo_data").glob("*.mp4"))
    directory = Path(tempfile.mkdtemp(prefix="runner-loop-"))
    table = pa.table(
        {"id": [f"r{i}" for i in range(rows)], "video": [str(clips[i % len(clips)]) for i in range(rows)]}
    )
    pq.write_table(table, directory / "m.parquet")
    actor = EvaluateActor(
        JobConfig(method="evaluate", output=str(directory / "loop"), run_id="loop", models={})
    )

    def plain_loop() -> float:
        start = time.perf_counter()
        for row in table.to_pylist():
            actor.process_row(row, actor.effective_params(row))
        return time.perf_counter() - start

    loop = plain_loop()
    ray.init(address="local", log_to_driver=False, ignore_reinit_error=True)
    loop_with_ray = plain_loop()
    seconds, reports = [], []
    for name, models, decode in [
        ("job", {}, None),  # the default: no decode stage on a CPU-only pool
        ("staged", {"clip": "tiny"}, True),
        ("bare", {"clip": "tiny"}, False),
    ]:
        start = time.perf_counter()
        manifest, output = str(directory / "m.parquet"), str(directory / name)
        reports.append(run_job(JobSpec("evaluate", manifest, output, models=models, decode_stage=decode)))
        seconds.append(time.perf_counter() - start)
    in_actor = reports[0]["seconds_per_row"] * reports[0]["processed"]
    return seconds[0], loop, seconds[1], seconds[2], in_actor, loop_with_ray


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--loop-rows", type=int, default=2000)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one)))
        return
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    print("rows       first result  wall      driver RSS  result files  resume")
    for rows in args.rows:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(rows)], env=env, capture_output=True, text=True
        )
        if out.returncode:
            print(f"{rows:<10} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            continue
        # The last JSON line: Ray may print warnings after it.
        m = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
        line = f"{m['rows']:<10} {m['first_result_s']:>8.1f} s  {m['wall_s']:>6.1f} s"
        print(f"{line}  {m['driver_peak_rss_mb']:>7.0f} MB  {m['result_files']:>12}  {m['resume_s']:>5.1f} s")
    if not args.loop_rows:
        return
    job, loop, staged, bare, in_actor, loop_with_ray = loop_vs_job(args.loop_rows)
    print(
        f"{args.loop_rows} real-clip rows: job {job:.1f} s, plain loop {loop:.1f} s, "
        f"job / loop {job / loop:.2f}; the job's rows took {in_actor:.1f} s in its actor "
        f"({in_actor / loop:.2f}x the loop), the other {job - in_actor:.1f} s were start-up and hand-offs"
    )
    print(
        f"the plain loop again with Ray up and idle: {loop_with_ray:.1f} s ({loop_with_ray / loop:.2f}x); "
        f"the job's rows in its actor / that loop {in_actor / loop_with_ray:.2f}"
    )
    print(
        f"with tiny CLIP: decode stage {args.loop_rows / staged:.1f} rows/s, actors reading their own inputs "
        f"{args.loop_rows / bare:.1f} rows/s, ratio {bare / staged:.2f}"
    )


if __name__ == "__main__":
    main()
