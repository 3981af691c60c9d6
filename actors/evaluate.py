"""The evaluation job's actor: metrics of existing videos against their prompts and references.

Its inputs are read in a CPU stage before the pool (`read_inputs`, see runner.run_job), which also
resizes and crops them for CLIP (`pipelines.clip_crop`), so the actors spend their time in the metric
models, and CLIP runs over the frames of a whole batch of rows at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from actors.base import JobConfig, RowActor, RowError, RowOutput
from pipelines import media
from pipelines.clip_crop import ClipCrop

if TYPE_CHECKING:
    from pipelines.metrics import Sample

# The metric models' modules (torch, transformers) are imported where they run, in the actors: the driver
# imports this class to plan a job of up to a million rows and should not carry them (about 180 MB).

_STYLE = "style."  # packed style images are style.0, style.1, ...
_CLIP_CROPS = "clip_crops"  # the frames, then the image and the styles, through CLIP's resize and crop
# Set when nothing but CLIP reads the frames, image and styles: then only their crops travel, and this
# holds [frame count, 1 if an image follows the frames else 0] to find them in the crops.
_CROPS_ONLY = "crops_only"


class EvaluateActor(RowActor):
    method = "evaluate"
    kind = "eval"
    # num_frames: sample exactly this many frames (None = every frame, up to max_frames, sampled evenly).
    defaults: ClassVar[dict[str, Any]] = {"seed": 0, "num_frames": None, "max_frames": 64}
    # Rows take a second or less: calls of 32 rows amortise the per-call cost, tasks of 256 a few minutes.
    default_batch_size: ClassVar[int] = 32
    rows_per_task: ClassVar[int] = 256
    # A row reads one video and runs the metric models: seconds, a minute on a CPU with every model.
    row_time_limit_s: ClassVar[float] = 120.0
    decode_stage: ClassVar[bool] = True
    read_threads: ClassVar[int] = 4

    @classmethod
    def prepare(cls, config: JobConfig) -> None:
        from pipelines.clip import prepare_clip
        from pipelines.metrics import load_scorer

        if config.models.get("clip"):
            prepare_clip(config.models["clip"])
        # Loading here checks, on every node, that the metric models asked for exist and work.
        load_scorer(None, config.models.get("dreamsim"), config.models.get("lpips"))

    @classmethod
    def decode_settings(cls, config: JobConfig) -> dict[str, Any]:
        from pipelines.clip import clip_crop

        ref = config.models.get("clip")
        return {"clip_crop": clip_crop(ref).to_dict()} if ref else {}

    def setup(self) -> None:
        from pipelines.metrics import load_scorer

        models = self.config.models
        self.scorer = load_scorer(
            models.get("clip"), models.get("dreamsim"), models.get("lpips"), self.device
        )

    @classmethod
    def read_inputs(
        cls, row: dict[str, Any], params: dict[str, Any], config: JobConfig
    ) -> dict[str, npt.NDArray[Any]]:
        """uint8 frames, the image, styles, and the source frames and mask picked at the same frames where
        LPIPS or outside-mask PSNR reads them; and
        the frames, image and styles cropped for CLIP when the job scores with it (in their place, when
        no other metric of the row reads them: fewer bytes to move to the actor)."""
        prompt = row.get("prompt")
        if prompt is not None and not prompt.strip():
            raise RowError("empty prompt (leave it null to skip text metrics)")
        for name, value in (("num_frames", params["num_frames"]), ("max_frames", params["max_frames"])):
            if (value is not None or name == "max_frames") and (type(value) is not int or value < 1):
                raise RowError(f"bad parameter: {name} must be a whole number >= 1, got {value!r}")
        frames, total = media.read_sampled_video(row["video"], params["num_frames"], params["max_frames"])
        size = frames.shape[1:3]
        arrays = {"frames": frames}
        # Each read is held to the decode limit alone, the row's inputs together after each one (64 style
        # images of 8192x8192 would take 12 GB).
        if row.get("image"):
            arrays["image"] = media.read_image(row["image"])
            _check_total(arrays)
        # The source video is read only for the metrics that compare against it (a whole second decode).
        if row.get("source_video") and (config.models.get("lpips") or row.get("mask")):
            arrays["source"] = media.read_video(row["source_video"], num_frames=len(frames), size=size)
            _check_total(arrays)
        for n, uri in enumerate(row.get("style") or []):
            arrays[f"{_STYLE}{n}"] = media.read_image(uri)
            _check_total(arrays)
        if row.get("mask") and "source" in arrays:

            def same_frames(count: int) -> Sequence[int]:  # only these of the mask's frames are decoded
                if count == total:
                    return media.frame_indices(total, len(frames)).tolist()
                if count == 1:
                    return [0]
                raise RowError(f"mask {row['mask']} has {count} frames, video has {total}")

            mask = media.read_mask(row["mask"], size=size, select=same_frames)
            _check_total({**arrays, "mask": mask})  # as decoded: one image of a still mask
            arrays["mask"] = np.broadcast_to(mask, frames.shape[:3])
        if "clip_crop" in config.decode:
            crop = ClipCrop.from_dict(config.decode["clip_crop"])
            names = ["frames", *(n for n in arrays if n == "image" or n.startswith(_STYLE))]
            crops = crop([*frames, *(arrays[n] for n in names[1:])])
            if not _reads_native_frames(config.models, arrays):  # fewer bytes to move to the actor
                arrays = {n: a for n, a in arrays.items() if n not in names}
                arrays[_CROPS_ONLY] = np.array([len(frames), "image" in names], np.int64)
            arrays[_CLIP_CROPS] = crops
        return arrays

    def process_row(self, row: dict[str, Any], params: dict[str, Any]) -> RowOutput:
        return self.process_rows([row], [params])[0]

    def process_rows(self, rows: list[dict[str, Any]], params: list[dict[str, Any]]) -> list[RowOutput]:
        return self.run_in_groups(
            rows,
            params,
            build=lambda row, p: (row, self.inputs(row, p)),
            key=lambda _: (),  # every row's frames go through CLIP together
            run=lambda jobs: self.scorer.score_many([self._sample(row, a) for row, a in jobs]),
            write=self._write,
        )

    @staticmethod
    def _sample(row: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> Sample:
        from pipelines.metrics import Sample

        crops = arrays.get(_CLIP_CROPS)
        if _CROPS_ONLY in arrays:  # views into the crops, which go to CLIP as they came
            count, has_image = (int(n) for n in arrays[_CROPS_ONLY])
            frames, image = crops[:count], crops[count] if has_image else None
            styles = list(crops[count + has_image :])
        else:
            frames, image = arrays["frames"], arrays.get("image")
            styles = [arrays[f"{_STYLE}{n}"] for n in range(sum(n.startswith(_STYLE) for n in arrays))]
        return Sample(frames, row.get("prompt"), image, arrays.get("source"), styles, clip_crops=crops)

    @staticmethod
    def _write(row: dict[str, Any], params: dict[str, Any], job: tuple, scored: tuple) -> RowOutput:
        from pipelines.metrics import outside_mask_psnr

        _, arrays = job
        metrics, notes = scored
        if "mask" in arrays:
            metrics["outside_mask_psnr"] = outside_mask_psnr(
                arrays["source"], arrays["frames"], arrays["mask"]
            )
        else:
            notes.append("outside_mask_psnr: needs both mask and source_video")
        return RowOutput(metrics=metrics, notes=notes)


def _reads_native_frames(models: dict[str, str | None], arrays: dict[str, npt.NDArray[Any]]) -> bool:
    """Whether a metric other than CLIP's reads the row's frames, image or styles at their own size: PIC
    (DreamSim, with an image), LPIPS (with a source video), outside-mask PSNR (source and mask)."""
    return bool(
        (models.get("dreamsim") and "image" in arrays)
        or (models.get("lpips") and "source" in arrays)
        or "mask" in arrays
    )


def _check_total(arrays: dict[str, npt.NDArray[Any]]) -> None:
    """A row's decoded inputs together stay within what one read may decode."""
    total = sum(a.nbytes for a in arrays.values())
    if total > media.MAX_DECODED_BYTES:
        raise RowError(
            f"the row's inputs decode to over {media.MAX_DECODED_BYTES / 2**30:.0f} GiB together "
            f"({total / 2**30:.1f} GiB with {len(arrays)} of them read)"
        )
