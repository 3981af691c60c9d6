"""Rasterizer cost per tile size: one LiveSketch render (24 frames × 16 strokes at 256²), forward + backward.

The tile size trades Python and launch overhead (small tiles) against the memory of one tile's
[frames, paths, segments, tile²] distance tensors (large tiles). Seconds are the median of a few runs
after one warm-up. Peak memory is torch.cuda.max_memory_allocated on CUDA; on CPU it is the growth of
the process's max RSS, each tile size measured in a fresh child process so earlier runs do not hide it.

    python bench/raster.py [--device cuda] [--size 256] [--frames 24] [--repeats N] [--threads N]

On CPU it uses one torch thread unless told otherwise: on a shared 2-core machine, torch's default two
threads wait for each other at every op whenever another process holds a core, and the times stop
meaning anything (10-40× slower).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKETCH = REPO.parent / "shared" / "data" / "sketches" / "surfer0_scaled1.svg"
DEMO_SKETCH = REPO / "jobs" / "demo_data" / "sketches" / "surfer0_scaled1.svg"
TILES = (32, 64, 128, 256)


def load():
    """The shared surfer sketch, or 16 generated strokes like it when no data is around."""
    import numpy as np

    from pipelines.livesketch.svg import load_sketch, parse_svg

    for path in (SKETCH, DEMO_SKETCH):
        if path.exists():
            return load_sketch(str(path)), path.name
    rng = np.random.default_rng(0)
    paths = []
    for _ in range(16):
        p = rng.uniform(60, 190, size=(4, 2))
        d = f"M {p[0, 0]} {p[0, 1]} C " + " ".join(f"{x} {y}" for x, y in p[1:])
        paths.append(f'<path d="{d}" fill="none" stroke="black" stroke-width="3"/>')
    text = f'<svg xmlns="http://www.w3.org/2000/svg" width="256" height="256">{"".join(paths)}</svg>'
    return parse_svg(text), "16 generated strokes"


def measure(tile: int, device: str, size: int, frames: int, repeats: int) -> dict[str, float]:
    """Median seconds per forward+backward and peak memory (MiB) for one tile size."""
    import torch

    from pipelines.livesketch.raster import render

    sketch, _ = load()
    gen = torch.Generator().manual_seed(0)
    base = sketch.points[None] + torch.randn(frames, sketch.num_points, 2, generator=gen)
    weight = torch.rand(frames, 3, size, size, generator=gen).to(device)
    points = base.to(device).requires_grad_(True)

    def step() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        img = render(sketch, points, size, tile=tile)
        (img * weight).sum().backward()
        points.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
    step()  # warm-up
    seconds = statistics.median(step() for _ in range(repeats))
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - allocated_before) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024  # KiB on Linux
    return {"tile": tile, "seconds": seconds, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--repeats", type=int, help="timed runs per tile (default: CUDA 10, CPU 3 or 1)")
    parser.add_argument("--tiles", type=int, nargs="+", default=list(TILES))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # one tile, JSON out
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    def repeats(tile: int) -> int:
        # Large tiles take tens of seconds per step on a small CPU: one timed run keeps this under 2 min.
        return args.repeats or (10 if args.device == "cuda" else 3 if tile < 128 else 1)

    if args.child is not None:
        print(json.dumps(measure(args.child, args.device, args.size, args.frames, repeats(args.child))))
        return

    _, name = load()
    results = []
    for tile in args.tiles:
        if args.device == "cuda":
            result = measure(tile, "cuda", args.size, args.frames, repeats(tile))
        else:
            cmd = [sys.executable, __file__, "--size", str(args.size), "--frames", str(args.frames),
                   "--repeats", str(repeats(tile)), "--threads", str(args.threads),
                   "--child", str(tile)]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
        results.append({**result, "repeats": repeats(tile)})
        print(f"  tile {tile:4d}: {result['seconds']:.3f} s", flush=True)

    import torch

    cpu = f"CPU, {torch.get_num_threads()} threads"
    where = torch.cuda.get_device_name() if args.device == "cuda" else cpu
    memory = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "max RSS growth"
    fastest = min(r["seconds"] for r in results)
    print(f"\n{name}: {args.frames} frames at {args.size}², forward+backward, median after warm-up ({where})")
    print(f"{'tile':>6} {'s/step':>9} {'vs fastest':>11} {'peak MiB':>9} {'runs':>5}   (peak: {memory})")
    for r in results:
        print(f"{r['tile']:>6} {r['seconds']:>9.3f} {r['seconds'] / fastest:>11.2f} {r['peak_mib']:>9.0f} "
              f"{r['repeats']:>5}")  # fmt: skip


if __name__ == "__main__":
    main()
