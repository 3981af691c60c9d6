"""DreamMotion on Ray: each actor keeps one backbone loaded and edits its rows' videos one by one."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar

import numpy as np
import torch

from actors.base import JobConfig, RowActor, RowError, RowOutput, model_dtype, row_params
from pipelines import media
from pipelines.backbone import load_backbone, prepare_backbone
from pipelines.clip import prepare_clip
from pipelines.dreammotion.edit import EditParams, edit_video
from pipelines.metrics import load_scorer, outside_mask_psnr, to_signed, to_uint8


def mask_frames(count: int, uri: str, total: int, picked: np.ndarray) -> list[int]:
    """Which of a mask's `count` frames go with the edited video frames `picked`: one per video frame
    (picked with the same indices), one per edited frame, or one for all.

    A mask whose frame count cannot be matched to the video is the row's error, never guessed.
    """
    if count == total:
        return picked.tolist()
    if count == len(picked):
        return list(range(count))
    if count == 1:
        return [0] * len(picked)
    raise RowError(
        f"mask {uri} has {count} frames; the video has {total} and {len(picked)} are edited "
        "(give one mask frame per video frame, per edited frame, or a single frame)"
    )


class DreamMotionActor(RowActor):
    method = "dreammotion"
    kind = "video"
    # fps None: the clip's own rate divided by frame_stride, so the edit plays at the source's speed.
    defaults: ClassVar[dict[str, Any]] = {**asdict(EditParams()), "fps": None, "precision": "auto"}

    @classmethod
    def prepare(cls, config: JobConfig) -> None:
        prepare_backbone(config.models["backbone"])
        if config.models.get("clip"):
            prepare_clip(config.models["clip"])

    def setup(self) -> None:
        models = self.config.models
        dtype = model_dtype(self.device, self.config.params.get("precision", "auto"))
        self.backbone = load_backbone(models["backbone"], self.device, dtype)
        self.scorer = load_scorer(
            models.get("clip"), models.get("dreamsim"), models.get("lpips"), self.device
        )

    def process_row(self, row: dict[str, Any], params: dict[str, Any]) -> RowOutput:
        for column in ("source_prompt", "target_prompt"):
            if not (row.get(column) or "").strip():
                raise RowError(f"empty {column}")
        p = row_params(EditParams.from_dict, params)
        size = (p.height, p.width)
        info = media.video_info(row["video"])
        try:
            picked = p.frame_indices(info.num_frames)
        except ValueError as exc:
            raise RowError(f"{exc}: {row['video']}") from None
        source = media.read_video(row["video"], size=size, indices=picked)
        mask = None
        if row.get("mask"):
            uri = row["mask"]
            native = media.read_mask(uri, select=lambda n: mask_frames(n, uri, info.num_frames, picked))
            if native.shape[1:] != (info.height, info.width):
                mask_h, mask_w = native.shape[1:]
                raise RowError(f"mask {uri} is {mask_w}x{mask_h}, the video is {info.width}x{info.height}")
            mask = media.fit_masks(native, size)
        frames = to_signed(source)
        result = edit_video(
            self.backbone,
            frames,
            row["source_prompt"].strip(),
            row["target_prompt"].strip(),
            p,
            torch.from_numpy(mask) if mask is not None else None,
        )
        edited = to_uint8(result.frames)

        out_dir = self.config.artifacts_dir(row["id"])
        fps = float(params["fps"] or (info.fps / p.frame_stride if info.fps > 0 else 8.0))
        outputs = {
            "mp4": media.write_video(edited, media.join(out_dir, "edit.mp4"), fps),
            "gif": media.write_video(edited, media.join(out_dir, "edit.gif"), fps),
            "side_by_side": media.write_video(
                np.concatenate([source, edited], axis=2), media.join(out_dir, "source_and_edit.mp4"), fps
            ),
        }
        metrics, notes = self.scorer.score(edited, prompt=row["target_prompt"], source=source)
        if mask is not None and (~mask).any():
            metrics["outside_mask_psnr"] = outside_mask_psnr(source, edited, mask)
        else:
            notes.append("outside_mask_psnr: no mask, or the mask covers every pixel")
        notes.append(
            f"{result.seconds_per_step:.3f} s per iteration"
            + "".join(f"; final {k} {v:.4g}" for k, v in result.losses.items())
        )
        return RowOutput(outputs=outputs, metrics=metrics, notes=notes)
