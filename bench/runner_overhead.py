"""What the Ray job runner costs over a plain Python loop doing the same per-row work.

The work is the evaluation job's: decode a clip, embed 16 frames and the prompt with a CLIP model, score.
A ViT-B-sized CLIP with random weights (built locally; no downloads) makes each row take about a second
on one core, like a real metric pass. Both sides use one torch thread per worker and include model
loading; the Ray side is a whole `run_job` (node preparation, actor start, result files, summary) on a
Ray instance started beforehand, as on a cluster.

    python bench/runner_overhead.py [--rows 30]

Prints ray/loop for 1 actor (target <= 1.15 on a 2-core machine) and 2 actors vs 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def build_manifest(rows: int, directory: Path) -> Path:
    videos = sorted((REPO / "jobs" / "demo_data").glob("*.mp4"))
    table = pa.table(
        {
            "id": [f"row-{i:04d}" for i in range(rows)],
            "video": [str(videos[i % len(videos)]) for i in range(rows)],
            "prompt": ["a short video clip of something moving"] * rows,
        }
    )
    path = directory / "manifest.parquet"
    pq.write_table(table, path)
    return path


def run_loop(manifest: Path, output: Path, clip_dir: str) -> float:
    """The same actor code, called row by row in this process: the work without Ray."""
    import torch

    from actors.base import JobConfig
    from actors.evaluate import EvaluateActor

    torch.set_num_threads(1)
    start = time.perf_counter()
    config = JobConfig(method="evaluate", output=str(output), run_id="loop", models={"clip": clip_dir},
                       params={"num_frames": 16})  # fmt: skip
    actor = EvaluateActor(config)
    table = pq.read_table(manifest)
    for i in range(table.num_rows):
        result = actor(table.slice(i, 1))
        assert result.column("status")[0].as_py() == "ok", result.column("error")[0]
    return time.perf_counter() - start


def run_ray(manifest: Path, output: Path, clip_dir: str, actors: int) -> float:
    from jobs.runner import JobSpec, run_job

    start = time.perf_counter()
    report = run_job(
        JobSpec(method="evaluate", manifest=str(manifest), output=str(output), models={"clip": clip_dir},
                params={"num_frames": 16}, actors=actors)
    )  # fmt: skip
    assert report["ok"] == report["rows"], report["top_errors"]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from pipelines import model_cache, tiny

    clip_dir = str(model_cache.build_once("bench-clip-vitb", lambda p: tiny.build_clip(p, 224, 768, 12)))
    work = Path(tempfile.mkdtemp(prefix="anima-bench-"))
    try:
        manifest = build_manifest(args.rows, work)
        loop = run_loop(manifest, work / "loop", clip_dir)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        one = run_ray(manifest, work / "ray1", clip_dir, actors=1)
        two = run_ray(manifest, work / "ray2", clip_dir, actors=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nrows {args.rows}, {loop / args.rows:.2f} s of work per row")
    print(f"plain loop          {loop:7.1f} s")
    print(f"ray job, 1 actor    {one:7.1f} s   ray/loop = {one / loop:.3f}  (target <= 1.15)")
    print(f"ray job, 2 actors   {two:7.1f} s   2 actors / 1 actor = {two / one:.3f}")


if __name__ == "__main__":
    main()
