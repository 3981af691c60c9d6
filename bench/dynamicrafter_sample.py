"""DynamiCrafter sampling throughput: videos per call and the three guidance branches in one UNet call.

Prints seconds per video for batch 1 vs batch B (the per-video ratio; the official script asserts
batch 1) and for the three classifier-free guidance branches as three UNet calls vs one batched call.
`--modelscope-size` builds random weights with the ModelScope/VideoCrafter UNet shapes (320-640-1280-1280,
1024-wide context; no download) and the official context network, to time real-size work on a GPU.

    python bench/dynamicrafter_sample.py [--batch 4] [--frames 8] [--size 64] [--steps 5]
    python bench/dynamicrafter_sample.py --device cuda --modelscope-size --frames 16 --size 256 --steps 50
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from real_size import bench_dtype, bench_models
from timing import seconds

REPO = Path(__file__).resolve().parents[1]


def image_paths() -> list[Path]:
    shared = REPO.parent / "shared" / "data" / "images"
    folder = shared if shared.exists() else REPO / "jobs" / "demo_data"
    return [folder / "dance1.jpeg", folder / "guitar0.jpeg"]


def seconds_per_video(model, requests, batched_cfg: bool = True) -> float:
    from pipelines.dynamicrafter.sample import sample

    sample(model, [replace(r, params=replace(r.params, steps=1)) for r in requests], batched_cfg)  # warm-up
    return seconds(lambda: sample(model, requests, batched_cfg)) / len(requests)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modelscope-size", action="store_true")
    args = parser.parse_args()

    from pipelines import media
    from pipelines.dynamicrafter.model import load_dynamicrafter
    from pipelines.dynamicrafter.sample import Request, SampleParams
    from pipelines.metrics import to_signed

    models = bench_models(args.modelscope_size, image_encoder=True)
    model = load_dynamicrafter(models, args.device, bench_dtype(args.device)).eval()

    size = (args.size, args.size)
    images = [to_signed(media.read_image(str(p), size)[None])[0] for p in image_paths()]
    params = SampleParams(steps=args.steps, num_frames=args.frames, height=args.size, width=args.size)
    requests = [
        Request(images[i % len(images)], "a moving picture", replace(params, seed=i))
        for i in range(args.batch)
    ]

    single = seconds_per_video(model, requests[:1])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    batched = seconds_per_video(model, requests)
    separate = seconds_per_video(model, requests, batched_cfg=False)
    print(
        f"device {args.device}, backbone {models['backbone']}, {args.frames} frames at {args.size}^2, "
        f"{args.steps} steps"
    )
    print(f"batch 1: {single:.3f} s/video; batch {args.batch}: {batched:.3f} s/video")
    print(f"per-video ratio, batch {args.batch} / batch 1: {batched / single:.3f}")
    print(f"guidance branches as 3 calls: {separate:.3f} s/video; 1 call / 3 calls: {batched / separate:.3f}")
    if torch.cuda.is_available():
        print(f"peak GPU memory at batch {args.batch}: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
