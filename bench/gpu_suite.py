"""One accelerator run of every method at its real model size (random weights, no download).

For each method, at the paper's frames and resolution: seconds per item at batch 1 and batch 4, their
per-item ratio, and peak accelerator memory; then CLIP (ViT-L/14-sized) scoring rows per second, fed crops
by the decode stage and cropping in the actor.
Items: a LiveSketch optimization step (24 frames at 256², ModelScope-sized backbone), a DreamMotion
iteration (16 frames at 320×576, ZeroScope = ModelScope shapes), a 50-step DynamiCrafter 512 video
(16 frames at 320×512, official sampling) and a 50-step StyleCrafter video (16 frames at 320×512 on
VideoCrafter1's temporal layers).

Every item is timed as two short runs of k1 and k2 steps (after a warm-up): their difference gives the
seconds per step, free of the fixed cost (encoders, rendering, VAE decode, writing); a 50-step video is
that fixed cost plus 50 steps, extrapolated without running 50 steps, and the table says so. The suite
is sized to finish in under 8 minutes on one H100-class GPU; `--small` runs it at tiny sizes to check it
on a CPU (where its numbers mean little).

    python bench/gpu_suite.py [--json gpu_suite.json] [--small] [--only livesketch dynamicrafter ...]

Prints one table and writes the same numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dreammotion_step
import dynamicrafter_sample
import livesketch_step
import stylecrafter_sample
from real_size import bench_dtype, bench_models
from timing import seconds

METHODS = ("livesketch", "dreammotion", "dynamicrafter", "stylecrafter", "clip")
VIDEO_STEPS = 50
BATCH = 4


@dataclass
class Shape:
    frames: int
    height: int
    width: int
    short_steps: tuple[int, int]  # k1, k2: the two timed runs' step counts


REAL = Shape(frames=16, height=320, width=512, short_steps=(2, 5))
SMALL = Shape(frames=4, height=32, width=48, short_steps=(1, 3))


def _peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def per_item(run: Callable[[int], float]) -> dict[str, float | None]:
    """Seconds per item at batch 1 and BATCH (`run(batch)` returns seconds per item), and peak memory
    at BATCH."""
    one = run(1)
    _reset_peak()
    many = run(BATCH)
    return {"s_per_item_b1": one, f"s_per_item_b{BATCH}": many, "ratio": many / one, "peak_gb": _peak_gb()}


def linear(run_seconds: Callable[[int], float], shape: Shape) -> tuple[float, float]:
    """(seconds per step, fixed seconds) of a run that is linear in its step count, from two short runs
    after a one-step warm-up."""
    run_seconds(1)
    k1, k2 = shape.short_steps
    t1, t2 = run_seconds(k1), run_seconds(k2)
    per_step = (t2 - t1) / (k2 - k1)
    return per_step, t1 - per_step * k1


def per_step(run_seconds: Callable[[int], float], shape: Shape) -> float:
    return linear(run_seconds, shape)[0]


def video_seconds(run_seconds: Callable[[int], float], shape: Shape) -> float:
    step, fixed = linear(run_seconds, shape)
    return fixed + step * VIDEO_STEPS


def livesketch(models: dict[str, str], device: str, shape: Shape, small: bool) -> dict:
    from pipelines.backbone import load_backbone
    from pipelines.livesketch.animate import LiveSketchParams, SketchJob, animate
    from pipelines.livesketch.svg import load_sketch

    backbone = load_backbone(models["backbone"], device, bench_dtype(device))
    sketches = [load_sketch(str(p)) for p in livesketch_step.sketch_paths()]
    frames, size = (shape.frames, 64) if small else (24, 256)
    params = LiveSketchParams(num_frames=frames, size=size)

    def run(batch: int) -> float:
        def timed(steps: int) -> float:
            p = replace(params, steps=steps)
            jobs = [SketchJob(sketches[i % len(sketches)], "a thing moving", p) for i in range(batch)]
            return seconds(lambda: animate(backbone, jobs))

        return per_step(timed, shape) / batch

    return {"item": f"1 step, {frames} frames at {size}²", **per_item(run)}


def dreammotion(models: dict[str, str], device: str, shape: Shape, small: bool) -> dict:
    from pipelines import media
    from pipelines.backbone import load_backbone
    from pipelines.dreammotion.edit import EditParams, edit_video
    from pipelines.metrics import to_signed

    backbone = load_backbone(models["backbone"], device, bench_dtype(device))
    height, width = (shape.height, shape.width) if small else (320, 576)
    video = media.read_video(str(dreammotion_step.clip_path()), num_frames=shape.frames, size=(height, width))
    frames = to_signed(video)
    params = EditParams(num_frames=shape.frames, height=height, width=width)
    prompts = ("A locomotive rides in a forest", "A car driving in a forest")
    # An edit is one video: DreamMotion's actor runs rows one at a time, so there is no batch-4 number.
    s = per_step(
        lambda k: seconds(lambda: edit_video(backbone, frames, *prompts, replace(params, steps=k))), shape
    )
    return {"item": f"1 iteration, {shape.frames} frames at {height}×{width}", "s_per_item_b1": s,
            "peak_gb": _peak_gb()}  # fmt: skip


def dynamicrafter(models: dict[str, str], device: str, shape: Shape, small: bool) -> dict:
    from diffusers import DDIMScheduler

    from pipelines import media
    from pipelines.checkpoints.dynamicrafter import VARIANTS
    from pipelines.dynamicrafter.model import load_dynamicrafter
    from pipelines.dynamicrafter.sample import Request, SampleParams, sample
    from pipelines.metrics import to_signed

    model = load_dynamicrafter(models, device, bench_dtype(device)).eval()
    variant = VARIANTS["512"]
    model.backbone.scheduler = DDIMScheduler.from_config(variant.scheduler_config())
    vars(model.backbone).pop("alphas_cumprod", None)  # the cached schedule of the old scheduler
    params = SampleParams.from_dict(variant.sample_defaults())
    if small:
        params = replace(params, num_frames=shape.frames, height=shape.height, width=shape.width)
    size = (params.height, params.width)
    images = [to_signed(media.read_image(str(p), size)[None])[0] for p in dynamicrafter_sample.image_paths()]

    def run(batch: int) -> float:
        def timed(steps: int) -> float:
            requests = [
                Request(images[i % len(images)], "a moving picture", replace(params, seed=i, steps=steps))
                for i in range(batch)
            ]
            return seconds(lambda: sample(model, requests))

        return video_seconds(timed, shape) / batch

    item = f"{VIDEO_STEPS}-step video, {params.num_frames} frames at {size[0]}×{size[1]} (extrapolated)"
    return {"item": item, **per_item(run)}


def stylecrafter(models: dict[str, str], device: str, shape: Shape, small: bool) -> dict:
    from pipelines import media
    from pipelines.metrics import to_signed
    from pipelines.stylecrafter.model import load_stylecrafter
    from pipelines.stylecrafter.sample import Request, SampleParams, sample
    from pipelines.temporal import use_videocrafter_temporal_layers

    model = load_stylecrafter(models, device, bench_dtype(device)).eval()
    use_videocrafter_temporal_layers(model.backbone.unet, 16)
    model.backbone.unet.to(device, bench_dtype(device))
    style = to_signed(media.read_image(str(stylecrafter_sample.style_path()), (256, 256))[None])
    params = SampleParams(num_frames=shape.frames, height=shape.height, width=shape.width)

    def run(batch: int) -> float:
        def timed(steps: int) -> float:
            requests = [
                Request("A bear walking", style, replace(params, seed=i, steps=steps)) for i in range(batch)
            ]
            return seconds(lambda: sample(model, requests))

        return video_seconds(timed, shape) / batch

    frames = f"{params.num_frames} frames at {params.height}×{params.width}"
    item = f"{VIDEO_STEPS}-step video, {frames} (extrapolated)"
    return {"item": item, **per_item(run)}


def clip(models: dict[str, str], device: str, shape: Shape, small: bool) -> dict:
    """Rows per second of the evaluation actor's CLIP metrics on 16-frame rows, 32 rows per call: fed
    CLIP crops by the decode stage (a GPU pool's default), and cropping the frames itself."""
    import numpy as np

    from pipelines.metrics import Sample, load_scorer

    scorer = load_scorer(models["clip"], device=device)
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 255, (shape.frames, 256, 256, 3), dtype=np.uint8) for _ in range(32)]
    staged = [Sample(v, f"a clip {i}", clip_crops=scorer.clip.crop(v)) for i, v in enumerate(videos)]
    raw = [Sample(v, f"a clip {i}") for i, v in enumerate(videos)]
    scorer.score_many(staged[:2])  # warm-up
    _reset_peak()
    elapsed = seconds(lambda: scorer.score_many(staged))
    cropping = seconds(lambda: scorer.score_many(raw))
    item = f"a row of {shape.frames} frames at 256², 32 rows per call, crops from the decode stage"
    return {"item": item, "rows_per_s": len(staged) / elapsed, "s_per_item_b1": elapsed / len(staged),
            "rows_per_s_cropping_in_actor": len(raw) / cropping, "peak_gb": _peak_gb()}  # fmt: skip


def build_models(small: bool) -> dict[str, str]:
    """Random weights at the real sizes, built once and shared by every method."""
    import tempfile

    from pipelines import tiny

    if small:
        return {"backbone": "tiny", "image_encoder": "tiny", "clip": "tiny"}
    models = bench_models(True, image_encoder=True)
    models["clip"] = tempfile.mkdtemp(prefix="clip-l-size-")
    tiny.build_clip(Path(models["clip"]), image_size=224, width=1024, layers=24, patch_size=14)
    return models


def _cell(result: dict, key: str, width: int, fmt: str = ".3f") -> str:
    value = result.get(key)
    return f"{value:>{width}{fmt}}" if value is not None else f"{'-':>{width}}"


def table(results: dict[str, dict]) -> str:
    lines = [f"{'method':<14} {'s/item b1':>10} {f's/item b{BATCH}':>10} {'ratio':>6} {'peak GiB':>9}  item"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<14} failed: {r['error']}")
            continue
        extra = f", {r['rows_per_s']:.1f} rows/s" if "rows_per_s" in r else ""
        if "rows_per_s_cropping_in_actor" in r:
            extra += f" ({r['rows_per_s_cropping_in_actor']:.1f} rows/s cropping in the actor)"
        times = f"{_cell(r, 's_per_item_b1', 10)} {_cell(r, f's_per_item_b{BATCH}', 10)}"
        memory = f"{_cell(r, 'ratio', 6, '.2f')} {_cell(r, 'peak_gb', 9, '.1f')}"
        lines.append(f"{name:<14} {times} {memory}  {r['item']}{extra}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="gpu_suite.json")
    parser.add_argument("--small", action="store_true", help="tiny sizes, to check the suite on a CPU")
    parser.add_argument("--only", nargs="*", choices=METHODS, default=list(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    start = time.perf_counter()
    shape = SMALL if args.small else REAL
    models = build_models(args.small)
    built = time.perf_counter() - start
    measure = {"livesketch": livesketch, "dreammotion": dreammotion, "dynamicrafter": dynamicrafter,
               "stylecrafter": stylecrafter, "clip": clip}  # fmt: skip
    results: dict[str, dict] = {}
    for name in args.only:
        began = time.perf_counter()
        _reset_peak()
        try:
            results[name] = measure[name](models, args.device, shape, args.small)
        except Exception as exc:  # one method failing still leaves the others' numbers
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["wall_s"] = time.perf_counter() - began
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"device {device}, dtype {bench_dtype(args.device)}, models built in {built:.0f} s")
    print(table(results))
    print(f"total {time.perf_counter() - start:.0f} s")
    report = {"device": device, "small": args.small, "models_built_s": built, "results": results}
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
