"""LiveSketch on Ray: each actor keeps one backbone loaded and animates the sketches of its batch together."""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from actors.base import JobConfig, RowActor, RowError, RowOutput, model_dtype, row_params
from pipelines import media
from pipelines.backbone import load_backbone, prepare_backbone
from pipelines.clip import prepare_clip
from pipelines.livesketch.animate import Animation, LiveSketchParams, SketchJob, animate
from pipelines.livesketch.raster import render
from pipelines.livesketch.svg import animated_svg, load_sketch, official_strokes, sketch_to_svg
from pipelines.metrics import load_scorer
from pipelines.params import square_side
from pipelines.xclip import DEFAULT_XCLIP, cached_default, prepare_xclip

# Parameters of the actor itself, beside the method's (LiveSketchParams). checkpoint_every: save each
# row's optimization state every N steps, so a preempted row resumes there (0: never). snapshot_every:
# a GIF of the animation so far every N steps, as the official code's every-100-steps videos (0: none).
OUTPUT_DEFAULTS: dict[str, Any] = {
    "height": None,
    "width": None,
    "fps": 8,
    "video_size": 512,
    "checkpoint_every": 100,
    "snapshot_every": 100,
}
CHECKPOINT = "_checkpoint.pt"
SNAPSHOTS = "snapshots"
# Parameters that must agree for rows to be optimized in one batch.
BATCH_KEYS = ("steps", "num_frames", "size", "field", "use_local", "use_global")


@dataclass
class _Item:
    """A row on its way through a batch: its job, and the state of an interrupted earlier attempt."""

    row_id: str
    job: SketchJob
    state: dict[str, Any] | None
    checkpoint_every: int
    snapshot_every: int
    fps: float


class LiveSketchActor(RowActor):
    method = "livesketch"
    kind = "sketch"
    defaults: ClassVar[dict[str, Any]] = {
        **asdict(LiveSketchParams()),
        **OUTPUT_DEFAULTS,
        "precision": "auto",
    }

    @classmethod
    def prepare(cls, config: JobConfig) -> None:
        prepare_backbone(config.models["backbone"])
        if config.models.get("clip"):
            prepare_clip(config.models["clip"])
        xclip = _xclip_ref(config.models)
        if xclip:
            prepare_xclip(xclip)

    def setup(self) -> None:
        models = self.config.models
        precision = self.config.params.get("precision", "auto")
        if precision == "auto":
            # The official code loads ModelScope in fp16 and runs it under autocast (losses.py:66, :94,
            # :150); bf16 is opt-in (precision=bf16). CPUs run fp32.
            precision = "fp16" if self.device == "cuda" else "fp32"
        self.backbone = load_backbone(models["backbone"], self.device, model_dtype(self.device, precision))
        xclip = _xclip_ref(models)
        self.scorer = load_scorer(
            models.get("clip"), models.get("dreamsim"), models.get("lpips"), self.device, xclip=xclip
        )
        if xclip is None and models.get("xclip") is None:
            self.scorer.absent["xclip"] = (
                f"X-CLIP {DEFAULT_XCLIP} is not cached on this node (fetch it with `huggingface-cli "
                f"download {DEFAULT_XCLIP}`, or pass --xclip REF)"
            )

    def process_row(self, row: dict[str, Any], params: dict[str, Any]) -> RowOutput:
        return self.process_rows([row], [params])[0]

    def process_rows(self, rows: list[dict[str, Any]], params: list[dict[str, Any]]) -> list[RowOutput]:
        """Read each row's sketch, optimize rows of matching shapes as one batch, write each row's outputs."""

        def build(row: dict[str, Any], p: dict[str, Any]) -> _Item:
            job = self._job(row, p)
            every = (int(p["checkpoint_every"] or 0), int(p["snapshot_every"] or 0))
            return _Item(row["id"], job, self._resume_state(row, job), *every, float(p["fps"]))

        def key(item: _Item) -> tuple:
            return (*(getattr(item.job.params, k) for k in BATCH_KEYS), item.state and item.state["step"])

        def run(items: list[_Item]) -> list[Animation]:
            return animate(
                self.backbone,
                [item.job for item in items],
                states=[item.state for item in items],
                on_checkpoint=lambda saved: self._checkpoint(items, saved),
                checkpoint_every=min(item.checkpoint_every for item in items),
                on_snapshot=lambda step, points: self._snapshot(items, step, points),
                # Every row's own multiples are among those of the gcd (0 when no row wants any).
                snapshot_every=math.gcd(*(item.snapshot_every for item in items)),
            )

        return self.run_in_groups(rows, params, build, key, run, self._write)

    def _checkpoint(self, items: list[_Item], states: list[dict]) -> None:
        for item, state in zip(items, states, strict=True):
            buffer = io.BytesIO()
            torch.save({**state, "params": asdict(item.job.params)}, buffer)
            media.write_bytes(
                buffer.getvalue(), media.join(self.config.artifacts_dir(item.row_id), CHECKPOINT)
            )

    def _snapshot(self, items: list[_Item], step: int, points: list[torch.Tensor]) -> None:
        """snapshots/step_NNNN.gif of each row whose own snapshot_every divides `step`."""
        for item, frames in zip(items, points, strict=True):
            if item.snapshot_every <= 0 or step % item.snapshot_every:
                continue
            with torch.no_grad():
                video = _to_uint8(render(item.job.sketch, frames, item.job.params.size))
            uri = media.join(self.config.artifacts_dir(item.row_id), SNAPSHOTS, f"step_{step:04d}.gif")
            media.write_video(video, uri, item.fps)

    def _resume_state(self, row: dict[str, Any], job: SketchJob) -> dict[str, Any] | None:
        """The checkpoint an interrupted earlier attempt at this row left, if it had the same parameters."""
        uri = media.join(self.config.artifacts_dir(row["id"]), CHECKPOINT)
        if not media.exists(uri):
            return None
        try:
            state = torch.load(io.BytesIO(media.read_bytes(uri)), map_location=self.device, weights_only=True)
        except Exception:
            return None  # a checkpoint that cannot be read is recomputed, not trusted
        return state if state.get("params") == asdict(job.params) else None

    def _job(self, row: dict[str, Any], params: dict[str, Any]) -> SketchJob:
        prompt = row.get("prompt")
        if not prompt or not prompt.strip():
            raise RowError("empty prompt: LiveSketch needs a text prompt describing the motion")
        height, width = params.get("height"), params.get("width")
        if height is not None or width is not None:
            if height is not None and width is not None and height != width:
                raise RowError(f"LiveSketch renders a square canvas; got height={height}, width={width}")
            params = {**params, "size": height or width}
        sketch_params = row_params(LiveSketchParams.from_dict, params)
        # Before minutes of GPU work: the video is rendered at this size at the end.
        row_params(lambda values: square_side(values, "video_size", frames=sketch_params.num_frames), params)
        sketch = load_sketch(row["svg"], size=LiveSketchParams().size)
        if sketch_params.stroke_width == "official":
            sketch = official_strokes(sketch)
        return SketchJob(sketch=sketch, prompt=prompt.strip(), params=sketch_params)

    def _write(
        self, row: dict[str, Any], params: dict[str, Any], item: _Item, animation: Animation
    ) -> RowOutput:
        from safetensors.torch import save as save_safetensors

        job, out_dir = item.job, self.config.artifacts_dir(row["id"])
        sketch, points = job.sketch, animation.points
        fps = float(params["fps"])
        outputs: dict[str, str] = {}
        frame_dir = media.join(out_dir, "frames")
        for k, frame in enumerate(points):
            media.write_text(sketch_to_svg(sketch, frame), media.join(frame_dir, f"frame_{k:03d}.svg"))
        outputs["svg_frames"] = frame_dir
        if item.snapshot_every > 0:
            outputs["snapshots"] = media.join(out_dir, SNAPSHOTS)
        outputs["animated_svg"] = media.write_text(
            animated_svg(sketch, points, fps), media.join(out_dir, "animation.svg")
        )
        with torch.no_grad():
            size = int(params["video_size"])  # checked by `_job`
            video = _to_uint8(render(sketch, points, size))
            initial = _to_uint8(render(sketch, sketch.points[None], size))[0]
        outputs["mp4"] = media.write_video(video, media.join(out_dir, "video.mp4"), fps)
        outputs["gif"] = media.write_video(video, media.join(out_dir, "video.gif"), fps)
        buffer = io.BytesIO()
        np.save(buffer, points.numpy().astype(np.float32))
        outputs["points"] = media.write_bytes(buffer.getvalue(), media.join(out_dir, "points.npy"))
        metadata = {"params": json.dumps(asdict(job.params)), "num_points": str(sketch.num_points)}
        outputs["field"] = media.write_bytes(
            save_safetensors(animation.field_state, metadata=metadata),
            media.join(out_dir, "field.safetensors"),
        )
        metrics, notes = self.scorer.score(video, prompt=job.prompt, image=initial)
        notes.append(
            f"{animation.seconds_per_step:.3f} s per optimization step; mean displacement local "
            f"{animation.stats['mean_local_px']:.2f} px, global {animation.stats['mean_global_px']:.2f} px"
        )
        if item.state is not None:
            notes.append(f"resumed from the checkpoint at step {item.state['step']}")
        checkpoint = media.join(out_dir, CHECKPOINT)
        if media.exists(checkpoint):
            media.remove(checkpoint)
        return RowOutput(outputs=outputs, metrics=metrics, notes=notes)


def _xclip_ref(models: dict[str, str | None]) -> str | None:
    """The X-CLIP to score with: the job's (`none` for none), else the default one when it is cached."""
    ref = models.get("xclip")
    if ref is None:
        return cached_default()
    return None if ref in ("", "none") else ref


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Rendered frames [K, 3, H, W] in [0, 1] -> uint8 [K, H, W, 3]."""
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
