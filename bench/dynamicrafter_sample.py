"""DynamiCrafter sampling throughput: single vs multi-condition guidance, and videos per call.

Prints UNet passes per step (counted by a hook on the UNet) and seconds per video for the official
single CFG (2 passes) vs multi-condition CFG (3 passes), for batch 1 vs batch B (the official script
samples one video at a time), and for the guidance branches as separate UNet calls vs one batched call.
`--modelscope-size` builds random weights with the released UNet's shapes (320-640-1280-1280, 1024-wide
context; DynamiCrafter's UNet is this one with 8 input channels), a ViT-H-sized image tower and the
official context network; `--official 512` samples with that variant's defaults (16 frames at 320x512,
50 steps, v-prediction with zero terminal SNR, trailing spacing, guidance and dynamic rescale).

    python bench/dynamicrafter_sample.py [--batch 4] [--frames 8] [--size 64] [--steps 5]
    python bench/dynamicrafter_sample.py --device cuda --modelscope-size --official 512 --batch 2
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


def passes_per_step(model, request) -> float:
    """UNet evaluations per step and video, counted on the UNet's input batch."""
    from pipelines.dynamicrafter.sample import sample

    rows = []
    hook = model.backbone.unet.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    try:
        sample(model, [request])
    finally:
        hook.remove()
    return sum(rows) / request.params.steps  # the UNet takes [B, C, F, h, w]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modelscope-size", action="store_true")
    parser.add_argument("--official", choices=["256", "512", "1024"], default=None)
    args = parser.parse_args()

    from diffusers import DDIMScheduler

    from pipelines import media
    from pipelines.checkpoints.dynamicrafter import VARIANTS
    from pipelines.dynamicrafter.model import load_dynamicrafter
    from pipelines.dynamicrafter.sample import Request, SampleParams
    from pipelines.metrics import to_signed

    models = bench_models(args.modelscope_size, image_encoder=True)
    model = load_dynamicrafter(models, args.device, bench_dtype(args.device)).eval()
    if args.official:
        variant = VARIANTS[args.official]
        model.backbone.scheduler = DDIMScheduler.from_config(variant.scheduler_config())
        vars(model.backbone).pop("alphas_cumprod", None)  # the cached schedule of the old scheduler
        params = SampleParams.from_dict(variant.sample_defaults())
    else:
        params = SampleParams(steps=args.steps, num_frames=args.frames, height=args.size, width=args.size)
    size = (params.height, params.width)
    images = [to_signed(media.read_image(str(p), size)[None])[0] for p in image_paths()]
    requests = {
        guidance: [
            Request(images[i % len(images)], "a moving picture", replace(params, seed=i, guidance=guidance))
            for i in range(args.batch)
        ]
        for guidance in ("single", "multi")
    }
    print(
        f"device {args.device}, backbone {models['backbone']}, {params.num_frames} frames at "
        f"{params.height}x{params.width}, {params.steps} steps"
        + (f", official {args.official} sampling" if args.official else "")
    )
    times = {}
    for guidance, batch in requests.items():
        passes = passes_per_step(model, replace(batch[0], params=replace(batch[0].params, steps=2)))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times[guidance] = seconds_per_video(model, batch[:1])
        print(f"{guidance} CFG: {passes:.0f} UNet passes per step, {times[guidance]:.3f} s/video at batch 1")
        if torch.cuda.is_available():
            print(f"  peak GPU memory at batch 1: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"seconds per video, single / multi CFG: {times['single'] / times['multi']:.3f}")
    single = requests["single"]
    batched = seconds_per_video(model, single)
    separate = seconds_per_video(model, single, batched_cfg=False)
    print(f"batch {args.batch}: {batched:.3f} s/video; per-video ratio, batch {args.batch} / batch 1: "
          f"{batched / times['single']:.3f}")  # fmt: skip
    print(f"guidance branches as separate calls: {separate:.3f} s/video; one call / separate: "
          f"{batched / separate:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
