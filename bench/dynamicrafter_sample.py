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
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
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

    from pipelines import media, tiny
    from pipelines.adapters import load_image_encoder
    from pipelines.backbone import load_backbone_uncached
    from pipelines.dynamicrafter.model import ContextConfig, DynamiCrafter
    from pipelines.dynamicrafter.sample import Request, SampleParams

    ref, encoder_ref = "tiny", "tiny"
    if args.modelscope_size:
        ref = tempfile.mkdtemp(prefix="modelscope-size-")
        tiny.build_modelscope_size(Path(ref))
        encoder_ref = tempfile.mkdtemp(prefix="clip-h-size-")
        tiny.build_clip(Path(encoder_ref), image_size=224, width=1280, layers=32)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    backbone = load_backbone_uncached(ref, args.device, dtype)
    encoder = load_image_encoder(encoder_ref, args.device, dtype)
    width = backbone.unet.config.cross_attention_dim
    context = ContextConfig(encoder_ref) if width == 1024 else ContextConfig.small(encoder_ref, width)
    model = DynamiCrafter(backbone, encoder, context).eval()

    size = (args.size, args.size)
    images = [
        torch.from_numpy(media.read_image(str(p), size)).permute(2, 0, 1).float() / 127.5 - 1
        for p in image_paths()
    ]
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
    print(f"device {args.device}, backbone {ref}, {args.frames} frames at {args.size}^2, {args.steps} steps")
    print(f"batch 1: {single:.3f} s/video; batch {args.batch}: {batched:.3f} s/video")
    print(f"per-video ratio, batch {args.batch} / batch 1: {batched / single:.3f}")
    print(f"guidance branches as 3 calls: {separate:.3f} s/video; 1 call / 3 calls: {batched / separate:.3f}")
    if torch.cuda.is_available():
        print(f"peak GPU memory at batch {args.batch}: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
