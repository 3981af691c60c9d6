"""StyleCrafter sampling: the three guidance branches as three UNet calls vs one batched call.

`--modelscope-size` builds random weights with the ModelScope/VideoCrafter UNet shapes, a ViT-H-sized
CLIP tower and the official adapter sizes (no download), to time real-size work on a GPU;
`--videocrafter1` gives that UNet VideoCrafter1's temporal layers (relative-position temporal attention,
no temporal convolutions), the released base's architecture. `--image` times the image mode (temporal
layers skipped, 2 guidance branches) at `--height`².

    python bench/stylecrafter_sample.py [--batch 2] [--frames 8] [--height 64] [--width 96] [--steps 5]
    python bench/stylecrafter_sample.py --device cuda --modelscope-size --videocrafter1 --frames 16 \
        --height 320 --width 512 --steps 50

Prints seconds per video for both and their ratio (the paper: ~85 s per 16-frame 320×512 video on an
A100-40G).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from real_size import bench_dtype, bench_models
from timing import seconds

REPO = Path(__file__).resolve().parents[1]


def style_path() -> Path:
    shared = REPO.parent / "shared" / "data" / "styles" / "ink_1.jpeg"
    return shared if shared.exists() else REPO / "jobs" / "demo_data" / "ink_1.jpeg"


def seconds_per_video(model, requests, batched_cfg: bool) -> float:
    from pipelines.stylecrafter.sample import sample

    sample(model, [replace(r, params=replace(r.params, steps=1)) for r in requests], batched_cfg)  # warm-up
    return seconds(lambda: sample(model, requests, batched_cfg)) / len(requests)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modelscope-size", action="store_true")
    parser.add_argument("--videocrafter1", action="store_true")
    parser.add_argument("--image", action="store_true")
    args = parser.parse_args()

    from pipelines import media
    from pipelines.metrics import to_signed
    from pipelines.stylecrafter.model import load_stylecrafter
    from pipelines.stylecrafter.sample import Request, SampleParams
    from pipelines.temporal import use_videocrafter_temporal_layers

    models = bench_models(args.modelscope_size, image_encoder=True)
    model = load_stylecrafter(models, args.device, bench_dtype(args.device)).eval()
    if args.videocrafter1:
        use_videocrafter_temporal_layers(model.backbone.unet, 16)
        model.backbone.unet.to(args.device, bench_dtype(args.device))
    style = to_signed(media.read_image(str(style_path()), (256, 256))[None])
    frames = 1 if args.image else args.frames
    params = SampleParams(
        steps=args.steps, num_frames=frames, height=args.height, width=args.width, image_size=args.height
    )
    requests = [
        Request("A bear walking in a snowy forest", style, replace(params, seed=i)) for i in range(args.batch)
    ]

    separate = seconds_per_video(model, requests, batched_cfg=False)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    batched = seconds_per_video(model, requests, batched_cfg=True)
    base = "VideoCrafter1 temporal layers" if args.videocrafter1 else "ModelScope temporal layers"
    shape = f"an image at {args.height}^2" if args.image else f"{frames} frames at {args.height}x{args.width}"
    print(f"device {args.device}, {base}, {shape}, {args.steps} steps")
    branches = 2 if args.image else 3
    print(f"{branches} guidance calls: {separate:.3f} s/video; 1 batched call: {batched:.3f} s/video")
    print(f"batched / separate: {batched / separate:.3f}")
    if torch.cuda.is_available():
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
