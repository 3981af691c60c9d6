"""The runner at scale: cheap rows (every video missing), so the runner itself is measured.

For each size, in a fresh driver process on a local Ray instance: time to the first result file,
total wall time, driver peak RSS, result files left, and the time of a resume with nothing to do. Then
the evaluation job vs a plain loop over the same real-clip rows (`--clip none`, the default batch size;
the median of a few turns). The job's actor reads four rows of a batch at once and the plain loop one
at a time, so the loop also runs in the job's batches, reading as the actor does: the job against that
loop is the runner's own cost. Then the job's rows/s with its CPU decode stage vs with the actors
reading their own inputs (tiny CLIP); last, the plain loop again while Ray is up and idle: what Ray's
own processes cost a loop on this host.

    python bench/runner_scale.py [--rows 10000 100000 1000000] [--loop-rows 2000] [--repeats 3]

Targets on a 2-core machine: 10^6 rows start within 60 s with driver RSS <= 2 GB; a resume of 10^6
settled rows within 30 s; the job <= 1.2x the plain loop.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

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


def plain_loop(manifest: str, output: str, batch: str) -> None:
    """Run in its own process: the plain loop, as a user's script would run it, a row at a time, or in
    batches of `batch` rows, whose inputs the actor reads as it does in the job (`read_threads` at once);
    print its seconds over the rows alone."""
    from actors.base import JobConfig
    from actors.evaluate import EvaluateActor

    actor = EvaluateActor(JobConfig(method="evaluate", output=output, run_id="loop", models={}))
    rows, size = pq.read_table(manifest).to_pylist(), int(batch)
    start = time.perf_counter()
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        actor.process_rows(chunk, [actor.effective_params(row) for row in chunk])
    print(json.dumps({"rows_s": time.perf_counter() - start}))


def loop_vs_job(rows: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of the evaluation job and of a plain loop doing the same per-row work (no CLIP), taken
    in turns `repeats` times: one run of each on this shared 2-core host varies by 10% and more. Each
    job runs on a fresh local Ray instance (as a first `anima run` does, its start not counted) and
    each loop, with Ray down, in a fresh process timed from its start, so that both sides pay for
    starting a process and loading what the rows need (the actor's imports, 2 s of torch), as the job's
    actor does; the loop's seconds over its rows alone are kept too.

    Also: the job's rows' summed seconds in its actor (the rest of the job is start-up and hand-offs);
    the same plain loop while Ray is up and idle (Ray's own background cost on this host); and the job
    with tiny CLIP with and without its decode stage."""
    import ray

    from actors.evaluate import EvaluateActor
    from jobs.runner import JobSpec, run_job

    clips = sorted((REPO / "jobs" / "demo_data").glob("*.mp4"))
    directory = Path(tempfile.mkdtemp(prefix="runner-loop-"))
    table = pa.table(
        {"id": [f"r{i}" for i in range(rows)], "video": [str(clips[i % len(clips)]) for i in range(rows)]}
    )
    pq.write_table(table, directory / "m.parquet")
    manifest = str(directory / "m.parquet")
    times: dict[str, list[float]] = {}

    def loop(name: str, batch: int = 1) -> None:
        start = time.perf_counter()
        command = [sys.executable, __file__, "--loop", manifest, str(directory / "loop"), str(batch)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        times.setdefault(name, []).append(time.perf_counter() - start)
        times.setdefault(f"{name}_rows", []).append(json.loads(out.stdout.splitlines()[-1])["rows_s"])

    def job(name: str, output: str, **options: Any) -> None:
        start = time.perf_counter()
        report = run_job(JobSpec("evaluate", manifest, str(directory / output), **options))
        times.setdefault(name, []).append(time.perf_counter() - start)
        if name == "job":
            times.setdefault("in_actor", []).append(report["seconds_per_row"] * report["processed"])

    for n in range(repeats):
        loop("loop")
        loop("batched_loop", EvaluateActor.default_batch_size)
        ray.init(address="local", log_to_driver=False)
        job("job", f"job{n}", models={})
        ray.shutdown()
    ray.init(address="local", log_to_driver=False)
    loop("loop_with_ray")
    job("staged", "staged", models={"clip": "tiny"}, decode_stage=True)
    job("bare", "bare", models={"clip": "tiny"}, decode_stage=False)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--loop-rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3, help="turns of loop and job, for the median")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loop", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        plain_loop(*args.loop)
        return
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
    t = loop_vs_job(args.loop_rows, args.repeats)
    job, loop, rows_only, in_actor = (
        statistics.median(t[k]) for k in ("job", "loop", "loop_rows", "in_actor")
    )
    ratios = sorted(j / lo for j, lo in zip(t["job"], t["loop"], strict=True))
    print(
        f"{args.loop_rows} real-clip rows, median of {args.repeats} turns: job {job:.1f} s, plain loop "
        f"{loop:.1f} s ({rows_only:.1f} s of it over the rows), job / loop {job / loop:.2f} (each turn: "
        f"{', '.join(f'{r:.2f}' for r in ratios)}; against the loop's rows alone {job / rows_only:.2f})"
    )
    print(
        f"the job's rows took {in_actor:.1f} s in its actor ({in_actor / rows_only:.2f}x the loop's rows), "
        f"the other {job - in_actor:.1f} s were start-up and hand-offs"
    )
    from actors.evaluate import EvaluateActor

    batched = statistics.median(t["batched_loop"])
    ratios = sorted(j / lo for j, lo in zip(t["job"], t["batched_loop"], strict=True))
    print(
        f"the loop in batches of {EvaluateActor.default_batch_size}, reading as the job's actor does: "
        f"{batched:.1f} s ({statistics.median(t['batched_loop_rows']):.1f} s over the rows); job / that "
        f"loop {job / batched:.2f} (each turn: {', '.join(f'{r:.2f}' for r in ratios)}): the runner's cost"
    )
    with_ray, staged, bare = t["loop_with_ray_rows"][0], t["staged"][0], t["bare"][0]
    print(
        f"the loop's rows again with Ray up and idle: {with_ray:.1f} s ({with_ray / rows_only:.2f}x); "
        f"the job's rows in its actor / that loop's {in_actor / with_ray:.2f}"
    )
    print(
        f"with tiny CLIP: decode stage {args.loop_rows / staged:.1f} rows/s, actors reading their own inputs "
        f"{args.loop_rows / bare:.1f} rows/s, ratio {bare / staged:.2f}"
    )


if __name__ == "__main__":
    main()
