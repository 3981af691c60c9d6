"""Seconds per DreamMotion iteration with and without the self-similarity terms (S-SSM + T-SSM).

V-DDS alone is one no-grad UNet call on a batch of 4 (CFG × edited/source); the SSM terms add a
gradient-enabled pass over [edited; source] that stops after the last hooked decoder layer, plus the
backward through it. `--modelscope-size` builds random weights with ZeroScope's (= ModelScope's) UNet,
VAE and text encoder shapes, no download, for a real-size timing on a GPU.

    python bench/dreammotion_step.py [--frames 8] [--height 64] [--width 112] [--steps 3]
    python bench/dreammotion_step.py --device cuda --modelscope-size --frames 16 --height 320 --width 576 \
        --full-edit

Prints seconds per iteration for V-DDS only and for the full loss, their ratio, and with --full-edit the
time and peak memory of one 200-iteration edit (the paper: about 4 min for 16 frames on an A100).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from real_size import bench_dtype, bench_models
from timing import seconds

REPO = Path(__file__).resolve().parents[1]


def clip_path() -> Path:
    shared = REPO.parent / "shared" / "data" / "videos" / "locomotive.mp4"
    return shared if shared.exists() else REPO / "jobs" / "demo_data" / "locomotive.mp4"


def seconds_per_step(backbone, frames, params) -> float:
    from pipelines.dreammotion.edit import edit_video

    prompts = ("A locomotive rides in a forest", "A car driving in a forest")
    edit_video(backbone, frames, *prompts, replace(params, steps=1))  # warm-up
    return seconds(lambda: edit_video(backbone, frames, *prompts, params)) / params.steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=112)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--modelscope-size", action="store_true")
    parser.add_argument("--full-edit", action="store_true", help="also time one 200-iteration edit")
    args = parser.parse_args()

    from pipelines import media
    from pipelines.backbone import load_backbone
    from pipelines.dreammotion.edit import EditParams
    from pipelines.metrics import to_signed

    ref = bench_models(True)["backbone"] if args.modelscope_size else args.backbone
    backbone = load_backbone(ref, args.device, bench_dtype(args.device))
    video = media.read_video(str(clip_path()), num_frames=args.frames, size=(args.height, args.width))
    frames = to_signed(video)
    params = EditParams(steps=args.steps, num_frames=args.frames, height=args.height, width=args.width)

    plain = seconds_per_step(backbone, frames, replace(params, lambda_s=0.0, lambda_t=0.0))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    full = seconds_per_step(backbone, frames, params)
    print(f"device {args.device}, backbone {ref}, {args.frames} frames at {args.height}x{args.width}")
    print(f"V-DDS only: {plain:.3f} s/iteration; V-DDS + S-SSM + T-SSM: {full:.3f} s/iteration")
    print(f"cost of the self-similarity terms (full / V-DDS only): {full / plain:.2f}")
    if torch.cuda.is_available():
        print(f"peak GPU memory with SSM: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.full_edit:
        print(f"one 200-iteration edit: {full * 200 / 60:.1f} min (V-DDS only {plain * 200 / 60:.1f} min)")


if __name__ == "__main__":
    main()
