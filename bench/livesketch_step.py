"""Seconds per LiveSketch optimization step, for each displacement field (official and pooled): one
sketch at a time vs several sketches in one batch, and each field's parameter count.

Batching puts the sketches' videos through the VAE and the UNet in one call; on a GPU that call is
where the time goes and a bigger batch uses the device better. On a CPU the work is compute-bound, so
expect a ratio near 1 there. `--backbone` takes any backbone reference; `--modelscope-size` builds a
randomly initialised backbone with ModelScope T2V's published configuration (UNet3D 320-640-1280-1280,
SD VAE, 1024-wide text encoder; no download) to time real-size work on a GPU.

    python bench/livesketch_step.py [--batch 4] [--frames 8] [--size 128] [--steps 3]
    python bench/livesketch_step.py --device cuda --modelscope-size --frames 24 --size 256 --full-row

Prints, per field, its parameters, seconds per step for batch 1 and batch B and the per-sketch ratio
(batch B / B) / batch 1 (< 1 means batching pays); with --full-row, also the minutes one 1000-step row
would take. `--fields official` times one field only.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from real_size import bench_dtype, bench_models
from timing import seconds

REPO = Path(__file__).resolve().parents[1]
SKETCHES = ["surfer0_scaled1.svg", "butterfly_3_scaled1.svg", "fish_scaled1.svg"]


def sketch_paths() -> list[Path]:
    shared = REPO.parent / "shared" / "data" / "sketches"
    folder = shared if shared.exists() else REPO / "jobs" / "demo_data" / "sketches"
    return [folder / name for name in SKETCHES]


def time_steps(backbone, jobs, steps: int) -> float:
    from pipelines.livesketch.animate import animate

    animate(backbone, [replace(j, params=replace(j.params, steps=1)) for j in jobs])  # warm-up
    return seconds(lambda: animate(backbone, jobs)) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--modelscope-size", action="store_true")
    parser.add_argument("--full-row", action="store_true", help="report the time of a 1000-step row")
    parser.add_argument("--fields", default="official,pooled", help="comma-separated fields to time")
    args = parser.parse_args()

    from pipelines.backbone import load_backbone
    from pipelines.livesketch.animate import LiveSketchParams, SketchJob
    from pipelines.livesketch.field import make_field
    from pipelines.livesketch.svg import load_sketch

    ref = bench_models(True)["backbone"] if args.modelscope_size else args.backbone
    backbone = load_backbone(ref, args.device, bench_dtype(args.device))
    paths = sketch_paths()
    sketches = [load_sketch(str(p)) for p in paths]
    size_note = " (ModelScope-size)" if args.modelscope_size else ""
    print(f"device {args.device}, backbone {ref}{size_note}, {args.frames} frames at {args.size}^2")
    for name in args.fields.split(","):
        params = LiveSketchParams(steps=args.steps, num_frames=args.frames, size=args.size, field=name)
        jobs = [SketchJob(sketches[i % len(sketches)], "a thing moving", params) for i in range(args.batch)]
        with torch.device("meta"):
            net = make_field(sketches[0].points.to("meta"), args.frames, params.field_config())
        count = sum(p.numel() for p in net.parameters())
        single = time_steps(backbone, jobs[:1], args.steps)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        batched = time_steps(backbone, jobs, args.steps)
        ratio = batched / args.batch / single
        print(
            f"field {name} ({count / 1e6:.2f}M parameters for {sketches[0].num_points} points): "
            f"batch 1 {single:.3f} s/step; batch {args.batch} {batched:.3f} s/step; "
            f"per-sketch ratio {ratio:.3f}"
        )
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"  peak GPU memory at batch {args.batch}: {peak:.1f} GiB")
        if args.full_row:
            alone, shared = single * 1000 / 60, batched * 1000 / args.batch / 60
            per = f"{shared:.1f} min per sketch in batch {args.batch}"
            print(f"  one 1000-step row: {alone:.1f} min alone, {per}")


if __name__ == "__main__":
    main()
