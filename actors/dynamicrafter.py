"""DynamiCrafter on Ray: each actor holds one DynamiCrafter model and samples its batch's videos together."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar

import numpy as np
import torch

from actors.base import JobConfig, RowActor, RowError, RowOutput, model_dtype
from pipelines import adapters, media
from pipelines.backbone import prepare_backbone
from pipelines.clip import prepare_clip
from pipelines.dynamicrafter.model import load_dynamicrafter
from pipelines.dynamicrafter.sample import Request, SampleParams, sample
from pipelines.metrics import load_scorer

# Rows optimized together must agree on these.
BATCH_KEYS = ("steps", "num_frames", "height", "width", "eta")


def image_encoder_ref(config: JobConfig) -> str:
    return adapters.image_encoder_ref(config.models.get("adapter"), config.models.get("backbone"))



class DynamiCrafterActor(RowActor):
    method = "dynamicrafter"
    kind = "image"
    defaults: ClassVar[dict[str, Any]] = {**asdict(SampleParams()), "fps": 8, "precision": "auto"}

    @classmethod
    def prepare(cls, config: JobConfig) -> None:
        prepare_backbone(config.models.get("backbone") or "tiny")
        prepare_clip(image_encoder_ref(config))
        if config.models.get("clip"):
            prepare_clip(config.models["clip"])

    def setup(self) -> None:
        dtype = model_dtype(self.device, self.config.params.get("precision", "auto"))
        self.model = load_dynamicrafter(self.config.models, self.device, dtype)
        self.model.eval()
        models = self.config.models
        self.scorer = load_scorer(
            models.get("clip"), models.get("dreamsim"), models.get("lpips"), self.device
        )
        self.notes = (
            [] if models.get("adapter") else ["no --adapter: untrained DynamiCrafter (= the backbone)"]
        )

    def process_row(self, row: dict[str, Any], params: dict[str, Any]) -> RowOutput:
        return self.process_rows([row], [params])[0]

    def process_rows(self, rows: list[dict[str, Any]], params: list[dict[str, Any]]) -> list[RowOutput]:
        def run(requests: list[Request]) -> list[tuple[torch.Tensor, float]]:
            videos, per_step = sample(self.model, requests)
            return [(video, per_step) for video in videos]

        key = lambda request: tuple(getattr(request.params, k) for k in BATCH_KEYS)  # noqa: E731
        return self.run_in_groups(rows, params, self._request, key, run, self._write)

    def _request(self, row: dict[str, Any], params: dict[str, Any]) -> Request:
        prompt = (row.get("prompt") or "").strip()
        if not prompt:
            raise RowError("empty prompt: describe the motion (DynamiCrafter is text- and image-conditioned)")
        try:
            p = SampleParams.from_dict(params)
        except (TypeError, ValueError) as exc:
            raise RowError(f"bad parameter: {exc}") from exc
        if p.mode == "interpolate" and not row.get("end_image"):
            raise RowError("mode interpolate needs an end_image")
        size = (p.height, p.width)

        def load(uri: str) -> torch.Tensor:
            return torch.from_numpy(media.read_image(uri, size)).permute(2, 0, 1).float() / 127.5 - 1

        end = load(row["end_image"]) if p.mode == "interpolate" else None
        return Request(image=load(row["image"]), prompt=prompt, params=p, end_image=end)

    def _write(
        self,
        row: dict[str, Any],
        params: dict[str, Any],
        request: Request,
        result: tuple[torch.Tensor, float],
    ) -> RowOutput:
        video, per_step = result
        frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        if request.params.mode == "loop":
            frames = frames[:-1]  # the last frame repeats the first: drop it so the clip loops seamlessly
        out_dir = self.config.artifacts_dir(row["id"])
        fps = float(params["fps"])
        outputs = {
            "mp4": media.write_video(frames, media.join(out_dir, "video.mp4"), fps),
            "gif": media.write_video(frames, media.join(out_dir, "video.gif"), fps),
        }
        image = ((request.image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        metrics, notes = self.scorer.score(frames, prompt=request.prompt, image=np.ascontiguousarray(image))
        notes = [*self.notes, *notes, f"{per_step:.3f} s per sampling step"]
        return RowOutput(outputs=outputs, metrics=metrics, notes=notes)
