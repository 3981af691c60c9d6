"""LiveSketch optimization: train one displacement field per sketch by score distillation.

Each step runs the official two passes (notes/livesketch.md §3.7): a local pass (guidance 30) that
steps the shared projection + local path, then a global pass (guidance 40) that steps the shared
projection + global path. A pass renders every frame, augments them with one shared random draw,
encodes them with the VAE (posterior sample, with gradient), and pushes the SDS gradient back into the
field's weights. With `use_local=False` the local pass still runs and steps the shared projection, as
the official `-predict_only_global` does (animate_svg.py:176-178 keep both passes; painter.py:431-432
only drops the local offsets); `use_global=False` and the `points` field run the local pass alone.

Precision follows the official code: the backbone's own dtype (fp16 for LiveSketch on a GPU, see
actors/livesketch.py) under autocast, while the field and the rasterizer stay in fp32.

Several sketches are optimized together: their videos go through the VAE and the UNet as one batch,
which is where a GPU's time goes, while every sketch keeps its own field, optimizers and random
generator. A batched run therefore draws the same random numbers as separate runs and gives the same
result up to floating-point reordering.

Deliberate difference from the official code: both optimizers' gradients are cleared before each pass
(the official code never clears the global path's, so its updates follow a running sum of gradients).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from pipelines.distill import Denoiser, gradient_loss, sample_noise, sample_timesteps, sds_gradient
from pipelines.livesketch.augment import augment
from pipelines.livesketch.field import FIELDS, DisplacementField, FieldConfig, make_field
from pipelines.livesketch.raster import render
from pipelines.livesketch.svg import STROKE_WIDTHS, Sketch
from pipelines.params import check_frame_size, from_values, shared_value

# (lr_local, lr_global) per field. official: the official code's (animate_svg.py:53, :71), which
# were tuned for its network. pooled: measured on the oracle prior (README, LiveSketch, "Fields side by
# side"): with the official rates its global path hardly moves and its local path runs away. points: the
# official no-network run steps the points with lr_local (painter.py:213, :477-479); it has no global path.
LEARNING_RATES: dict[str, tuple[float, float]] = {
    "official": (5e-3, 1e-4),
    "pooled": (1e-3, 5e-3),
    "points": (5e-3, 1e-4),
}


@dataclass(frozen=True)
class LiveSketchParams(FieldConfig):
    """Every hyperparameter (the field's too), with the official code's defaults; set per job or per row."""

    steps: int = 1000
    num_frames: int = 24
    size: int = 256
    seed: int = 1000
    guidance_local: float = 30.0
    guidance_global: float = 40.0
    # Adam learning rates; None takes the field's own (LEARNING_RATES).
    lr_local: float | None = None
    lr_global: float | None = None
    # LR multiplier: sine warm-up from lr_warmup_start over lr_warmup_steps, then log-linear decay
    # to lr_final_ratio at the last step (VectorFusion's schedule, as the official code).
    lr_warmup_steps: int = 100
    lr_warmup_start: float = 0.1
    lr_final_ratio: float = 0.4
    t_min: int = 50
    t_max: int = 950
    augment: bool = True
    perspective: float = 0.5
    crop_min_scale: float = 0.4
    tile: int = 32  # rasterizer tile side: 32 was fastest on CPU (bench/raster.py)
    # official: every stroke black and 3 px wide on the 256 canvas, as preprocess_sketch.py and
    # painter.py:150 make them; keep: the SVG's own widths and colours (scaled with the drawing).
    stroke_width: str = "official"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LiveSketchParams:
        """The known keys of `values` (a row's effective parameters), type-checked, the rest ignored."""
        params = from_values(cls, values)
        params.check()
        return params

    def check(self) -> None:
        problems = []
        if self.steps < 1 or self.num_frames < 1 or self.size < 8:
            problems.append("steps and num_frames must be >= 1 and size >= 8")
        try:
            check_frame_size(self.size, self.size, "size")
        except ValueError as exc:
            problems.append(str(exc))
        if not 0 <= self.t_min < self.t_max - 1:
            problems.append(f"need 0 <= t_min < t_max - 1, got t_min={self.t_min}, t_max={self.t_max}")
        if not self.use_local and not self.use_global:
            problems.append("use_local and use_global cannot both be false")
        if self.field not in FIELDS:
            problems.append(f"field must be one of {', '.join(FIELDS)}, got {self.field!r}")
        elif self.field == "points" and not self.use_local:
            problems.append("the points field has only a local path: use_local must be true")
        if self.stroke_width not in STROKE_WIDTHS:
            problems.append(
                f"stroke_width must be one of {', '.join(STROKE_WIDTHS)}, got {self.stroke_width!r}"
            )
        if any(lr is not None and lr <= 0 for lr in (self.lr_local, self.lr_global)):
            problems.append("lr_local and lr_global must be positive")
        if not 0 < self.crop_min_scale <= 1 or not 0 <= self.perspective < 1:
            problems.append("crop_min_scale must be in (0, 1] and perspective in [0, 1)")
        if problems:
            raise ValueError("; ".join(problems))

    def field_config(self) -> FieldConfig:
        return FieldConfig(**{f.name: getattr(self, f.name) for f in fields(FieldConfig)})

    def learning_rates(self) -> tuple[float, float]:
        """(local, global): the ones set, else the field's defaults."""
        local, global_ = LEARNING_RATES[self.field]
        return (self.lr_local or local, self.lr_global or global_)

    def passes(self) -> tuple[str, ...]:
        """The SDS passes of a step: local always (it also steps the shared projection), then global."""
        return ("local", "global") if self.use_global and self.field != "points" else ("local",)

    def lr_multiplier(self, step: int) -> float:
        warm = min(max(step / max(self.lr_warmup_steps, 1), 0.0), 1.0)
        delay = self.lr_warmup_start + (1 - self.lr_warmup_start) * math.sin(math.pi / 2 * warm)
        progress = min(max(step / self.steps, 0.0), 1.0)
        return delay * self.lr_final_ratio**progress


@dataclass
class SketchJob:
    sketch: Sketch
    prompt: str
    params: LiveSketchParams


@dataclass
class Animation:
    """The optimized animation of one sketch."""

    points: torch.Tensor  # [K, P, 2] control points per frame (canvas px), field in eval mode
    local: torch.Tensor  # [K, P, 2] the local path's share of the displacement
    global_: torch.Tensor  # [K, P, 2] the global path's share
    translation: torch.Tensor  # [K, 2] the global path's per-frame translation
    field_state: dict[str, torch.Tensor]
    seconds_per_step: float
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class _Track:
    """What one sketch carries through the batched optimization."""

    job: SketchJob
    field: DisplacementField
    generator: torch.Generator
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LambdaLR]


def _track(job: SketchJob, device: torch.device) -> _Track:
    p = job.params
    with torch.random.fork_rng(devices=[]):
        # The field's initial weights depend on the row's seed only, not on what ran before.
        torch.manual_seed(p.seed)
        net = make_field(job.sketch.points, p.num_frames, p.field_config()).to(device).train()
    adam = {"betas": (0.9, 0.9), "eps": 1e-6}
    rates = dict(zip(("local", "global"), p.learning_rates(), strict=True))
    params = {"local": net.local_parameters(), "global": net.global_parameters()}
    optimizers = {name: torch.optim.Adam(params[name], lr=rates[name], **adam) for name in p.passes()}
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, p.lr_multiplier) for o in optimizers.values()]
    generator = torch.Generator().manual_seed(p.seed)
    return _Track(job, net, generator, optimizers, schedulers)


def animate(
    model: Denoiser,
    jobs: list[SketchJob],
    states: list[dict[str, Any] | None] | None = None,
    on_checkpoint: Callable[[list[dict[str, Any]]], None] | None = None,
    checkpoint_every: int = 0,
    on_snapshot: Callable[[int, list[torch.Tensor]], None] | None = None,
    snapshot_every: int = 0,
) -> list[Animation]:
    """Optimize the sketches of `jobs` together (same steps, num_frames, size, field and passes) and
    return their animations.

    `model` is a backbone (pipelines.backbone.Backbone) or anything with its distillation interface.
    Every `checkpoint_every` steps `on_checkpoint` receives each sketch's complete optimization state
    (weights, optimizer moments, schedule, random generator); passing those `states` back resumes exactly
    where they were taken, so a preempted row loses at most `checkpoint_every` steps. Before every step
    that is a multiple of `snapshot_every` (0, N, 2N, …, as the official code's every-100-steps videos)
    `on_snapshot(step, points)` receives each sketch's control points [K, P, 2] (dropout off).
    """
    steps, size = shared_value(jobs, "steps"), shared_value(jobs, "size")
    shared_value(jobs, "num_frames")
    if len({j.params.passes() for j in jobs}) > 1:
        raise ValueError("sketches optimized together must run the same passes (field, use_global)")
    passes = jobs[0].params.passes()
    device = model.alphas_cumprod.device
    tracks = [_track(job, device) for job in jobs]
    first = 0
    if states is not None and any(s is not None for s in states):
        if any(s is None for s in states) or len({s["step"] for s in states}) > 1:
            raise ValueError("sketches resumed together must all resume from the same step")
        for track, state in zip(tracks, states, strict=True):
            _load_state(track, state)
        first = states[0]["step"]
    embeds = model.encode_prompt([j.prompt for j in jobs] + [""])
    cond, uncond = embeds[:-1], embeds[-1:].expand(len(jobs), *embeds.shape[1:])
    guidance = {
        name: torch.tensor([getattr(j.params, f"guidance_{name}") for j in jobs], device=device)
        for name in passes
    }
    start = time.perf_counter()
    for step in range(first, steps):
        if on_snapshot is not None and snapshot_every > 0 and step % snapshot_every == 0:
            on_snapshot(step, [_eval_points(track.field) for track in tracks])
        for name in passes:
            _distill_pass(model, tracks, name, guidance[name], cond, uncond, size)
        for track in tracks:
            for scheduler in track.schedulers:
                scheduler.step()
        done = step + 1
        if (
            on_checkpoint is not None
            and checkpoint_every > 0
            and done % checkpoint_every == 0
            and done < steps
        ):
            on_checkpoint([_state(track, done) for track in tracks])
    seconds_per_step = (time.perf_counter() - start) / max(steps - first, 1)
    return [_result(track, seconds_per_step) for track in tracks]


@torch.no_grad()
def _eval_points(net: torch.nn.Module) -> torch.Tensor:
    """The field's points without dropout; no random draw, so the optimization is unchanged."""
    net.eval()
    points = net().points.float().cpu()
    net.train()
    return points


def _state(track: _Track, step: int) -> dict[str, Any]:
    """A copy (the live tensors go on changing in place) of everything the optimization depends on."""
    return copy.deepcopy(
        {
            "step": step,
            "field": track.field.state_dict(),
            "optimizers": {name: o.state_dict() for name, o in track.optimizers.items()},
            "schedulers": [s.state_dict() for s in track.schedulers],
            "generator": track.generator.get_state(),
        }
    )


def _load_state(track: _Track, state: dict[str, Any]) -> None:
    track.field.load_state_dict(state["field"])
    for name, optimizer in track.optimizers.items():
        optimizer.load_state_dict(state["optimizers"][name])
    for scheduler, saved in zip(track.schedulers, state["schedulers"], strict=True):
        scheduler.load_state_dict(saved)
    track.generator.set_state(state["generator"])


def _distill_pass(
    model: Denoiser,
    tracks: list[_Track],
    name: str,
    guidance: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    size: int,
) -> None:
    videos = []
    for track in tracks:
        for optimizer in track.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        p = track.job.params
        frames = render(track.job.sketch, track.field(track.generator).points, size, tile=p.tile)
        if p.augment:
            frames = augment(frames, track.generator, p.perspective, p.crop_min_scale)
        videos.append(frames)
    generators = [t.generator for t in tracks]
    with _autocast(model):
        latents = model.encode_frames(torch.stack(videos) * 2 - 1, sample=True, generators=generators)
        num_train = len(model.alphas_cumprod)
        # Uniform on {t_min, …, min(t_max, T) − 2}: the official code's randint(t_min, min(t_max, T) − 1).
        ranges = [(t.job.params.t_min, min(t.job.params.t_max, num_train) - 1) for t in tracks]
        t = sample_timesteps(generators, ranges, latents.device)
        noise = sample_noise(generators, tuple(latents.shape[1:]), latents.device)
        grad = sds_gradient(model, latents, cond, uncond, guidance, t, noise)
    gradient_loss(latents, grad).backward()
    for track in tracks:
        track.optimizers[name].step()


def _autocast(model: Denoiser) -> AbstractContextManager:
    """Half-precision autocast on CUDA for a half-precision backbone, as the official code's VAE encode
    and UNet calls (losses.py); norms and reductions then run in fp32."""
    dtype = getattr(model, "dtype", torch.float32)
    device = model.alphas_cumprod.device
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return nullcontext()
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def _result(track: _Track, seconds_per_step: float) -> Animation:
    track.field.eval()
    out = track.field()
    return Animation(
        points=out.points.float().cpu(),
        local=out.local.float().cpu(),
        global_=out.global_.float().cpu(),
        translation=out.translation.float().cpu(),
        field_state={k: v.detach().float().cpu().contiguous() for k, v in track.field.state_dict().items()},
        seconds_per_step=seconds_per_step,
        stats={
            "mean_local_px": float(out.local.norm(dim=-1).mean()),
            "mean_global_px": float(out.global_.norm(dim=-1).mean()),
        },
    )
