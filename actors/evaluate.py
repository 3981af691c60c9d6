"""The evaluation job's actor: metrics of existing videos against their prompts and references."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from actors.base import JobConfig, RowActor, RowError, RowOutput
from pipelines import media
from pipelines.clip import prepare_clip
from pipelines.metrics import load_scorer, outside_mask_psnr


class EvaluateActor(RowActor):
    method = "evaluate"
    kind = "eval"
    # num_frames: sample exactly this many frames (None = every frame, up to max_frames, sampled evenly).
    defaults: ClassVar[dict[str, Any]] = {"seed": 0, "num_frames": None, "max_frames": 64}
    # Rows take a second or less: calls of 32 rows amortise the per-call cost, tasks of 256 a few minutes.
    default_batch_size: ClassVar[int] = 32
    rows_per_task: ClassVar[int] = 256

    @classmethod
    def prepare(cls, config: JobConfig) -> None:
        if config.models.get("clip"):
            prepare_clip(config.models["clip"])
        # Loading here checks, on every node, that the metric models asked for exist and work.
        load_scorer(None, config.models.get("dreamsim"), config.models.get("lpips"))

    def setup(self) -> None:
        models = self.config.models
        self.scorer = load_scorer(
            models.get("clip"), models.get("dreamsim"), models.get("lpips"), self.device
        )

    def process_row(self, row: dict[str, Any], params: dict[str, Any]) -> RowOutput:
        prompt = row.get("prompt")
        if prompt is not None and not prompt.strip():
            raise RowError("empty prompt (leave it null to skip text metrics)")
        total = media.video_info(row["video"]).num_frames
        count = params["num_frames"] or min(total, params["max_frames"])
        frames = media.read_video(row["video"], num_frames=count)
        size = frames.shape[1:3]
        image = media.read_image(row["image"]) if row.get("image") else None
        source = (
            media.read_video(row["source_video"], num_frames=len(frames), size=size)
            if row.get("source_video")
            else None
        )
        styles = [media.read_image(uri) for uri in row.get("style") or []]
        metrics, notes = self.scorer.score(frames, prompt=prompt, image=image, source=source, styles=styles)

        if row.get("mask") and source is not None:
            mask = media.read_mask(row["mask"], size=size)
            if len(mask) == total:
                mask = mask[media.frame_indices(total, count)]
            elif len(mask) != 1:
                raise RowError(f"mask {row['mask']} has {len(mask)} frames, video has {total}")
            metrics["outside_mask_psnr"] = outside_mask_psnr(
                source, frames, np.broadcast_to(mask, frames.shape[:3])
            )
        else:
            notes.append("outside_mask_psnr: needs both mask and source_video")
        return RowOutput(metrics=metrics, notes=notes)
