"""Training memory and time of one step with and without gradient checkpointing of the UNet.

Each mode runs in a fresh process: one training step of the method's recipe (forward, backward) on
random clips. Peak memory is the GPU's peak allocation on CUDA, or the growth of the process's peak RSS
over the step on CPU (the model is loaded and warmed up first, so only the step's activations count).
`--modelscope-size` builds random weights with the ModelScope/VideoCrafter UNet shapes (no download).

    python bench/train_memory.py [--method stylecrafter --stage 2] [--frames 8] [--height 64] [--width 64]
    python bench/train_memory.py --device cuda --modelscope-size --frames 16 --height 320 --width 512
"""

from __future__ import annotations

import argparse
import resource

import numpy as np
import torch
import torch.multiprocessing as mp
from real_size import bench_models
from timing import seconds


def step(args: argparse.Namespace, checkpointing: bool, out: dict) -> None:
    from actors.train_worker import recipe_of
    from pipelines import training

    recipe = recipe_of(args.method)
    config = recipe.config(
        {"stage": args.stage, "num_frames": args.frames, "height": args.height, "width": args.width}
    )
    model = recipe.load(args.models, args.device, torch.float32)
    if args.device == "cpu":
        training.contiguous_group_norm_inputs(model.backbone.unet)
    if checkpointing:
        training.checkpoint_unet_blocks(model.backbone.unet)
    recipe.trainable(model, config)
    rng = np.random.default_rng(0)
    frames = args.frames if args.method == "dynamicrafter" or args.stage == 2 else 1
    side = min(args.height, args.width)
    batch = {
        "frames": rng.integers(0, 256, (args.batch, frames, args.height, args.width, 3), dtype=np.uint8),
        "style": rng.integers(0, 256, (args.batch, side, side, 3), dtype=np.uint8),
        "prompt": ["a red fox running through snow"] * args.batch,
        "frame_stride": np.full(args.batch, 3),
    }
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=args.device == "cuda")

    def run() -> None:
        with autocast:
            loss = recipe.loss(model, batch, config, torch.Generator().manual_seed(0))
        loss.backward()

    with torch.no_grad(), autocast:
        recipe.loss(model, batch, config, torch.Generator().manual_seed(0))  # warm-up, no activations kept
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    elapsed = seconds(run)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    out[checkpointing] = (peak, elapsed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="stylecrafter", choices=["stylecrafter", "dynamicrafter"])
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modelscope-size", action="store_true")
    args = parser.parse_args()

    args.models = bench_models(args.modelscope_size, image_encoder=True)
    context = mp.get_context("spawn")
    with context.Manager() as manager:
        out = manager.dict()
        for checkpointing in (False, True):
            process = context.Process(target=step, args=(args, checkpointing, out))
            process.start()
            process.join()
            if process.exitcode:
                raise SystemExit(f"the step (checkpointing={checkpointing}) failed: exit {process.exitcode}")
        results = dict(out)
    (plain, plain_s), (ckpt, ckpt_s) = results[False], results[True]
    print(f"{args.method} stage {args.stage}, {args.device}, batch {args.batch}, {args.frames} frames at "
          f"{args.height}x{args.width}")  # fmt: skip
    print(f"without checkpointing: {plain / 2**20:.0f} MiB, {plain_s:.2f} s/step")
    print(f"with checkpointing:    {ckpt / 2**20:.0f} MiB, {ckpt_s:.2f} s/step")
    print(f"memory ratio (with / without): {ckpt / plain:.2f}; time ratio: {ckpt_s / plain_s:.2f}")


if __name__ == "__main__":
    main()
