"""StyleCrafter on Ray: each actor holds one StyleCrafter model and samples its batch's videos together."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar

import numpy as np
import torch

from actors.base import JobConfig, RowActor, RowError, RowOutput, model_dtype
from pipelines import adapters, media
from pipelines.backbone import prepare_backbone
from pipelines.clip import prepare_clip
from pipelines.metrics import load_scorer
from pipelines.stylecrafter.model import load_stylecrafter
from pipelines.stylecrafter.sample import Request, SampleParams, sample

BATCH_KEYS = ("steps", "num_frames", "height", "width", "eta")


def image_encoder_ref(config: JobConfig) -> str:
    return adapters.image_encoder_ref(config.models.get("adapter"), config.models.get("backbone"))



class StyleCrafterActor(RowActor):
    method = "stylecrafter"
    kind = "style"
    # style_size: references are cover-resized and centre-cropped to this square, as the official code.
    defaults: ClassVar[dict[str, Any]] = {
        **asdict(SampleParams()),
        "fps": 8,
        "style_size": 512,
        "precision": "auto",
    }

    @classmethod
    def prepare(cls, config: JobConfig) -> None:
        prepare_backbone(config.models.get("backbone") or "tiny")
        prepare_clip(image_encoder_ref(config))
        if config.models.get("clip"):
            prepare_clip(config.models["clip"])

    def setup(self) -> None:
        dtype = model_dtype(self.device, self.config.params.get("precision", "auto"))
        self.model = load_stylecrafter(self.config.models, self.device, dtype).eval()
        models = self.config.models
        self.scorer = load_scorer(
            models.get("clip"), models.get("dreamsim"), models.get("lpips"), self.device
        )
        self.notes = [] if models.get("adapter") else ["no --adapter: untrained style adapter"]

    def process_row(self, row: dict[str, Any], params: dict[str, Any]) -> RowOutput:
        return self.process_rows([row], [params])[0]

    def process_rows(self, rows: list[dict[str, Any]], params: list[dict[str, Any]]) -> list[RowOutput]:
        def run(jobs: list[tuple[Request, np.ndarray]]) -> list[tuple[torch.Tensor, float]]:
            videos, per_step = sample(self.model, [request for request, _ in jobs])
            return [(video, per_step) for video in videos]

        key = lambda job: tuple(getattr(job[0].params, k) for k in BATCH_KEYS)  # noqa: E731
        return self.run_in_groups(rows, params, self._request, key, run, self._write)

    def _request(self, row: dict[str, Any], params: dict[str, Any]) -> tuple[Request, np.ndarray]:
        prompt = (row.get("prompt") or "").strip()
        if not prompt:
            raise RowError("empty prompt")
        uris = row.get("style") or []
        if not uris:
            raise RowError("no style images: give one or more URIs in the style column")
        try:
            p = SampleParams.from_dict(params)
        except (TypeError, ValueError) as exc:
            raise RowError(f"bad parameter: {exc}") from exc
        size = int(params["style_size"])
        styles = np.stack([media.read_image(uri, (size, size)) for uri in uris])
        tensor = torch.from_numpy(styles).permute(0, 3, 1, 2).float() / 127.5 - 1
        return Request(prompt=prompt, styles=tensor, params=p), styles

    def _write(
        self,
        row: dict[str, Any],
        params: dict[str, Any],
        request: tuple[Request, np.ndarray],
        result: tuple[torch.Tensor, float],
    ) -> RowOutput:
        video, per_step = result
        frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out_dir = self.config.artifacts_dir(row["id"])
        if len(frames) == 1:
            outputs = {"image": media.write_image(frames[0], media.join(out_dir, "image.png"))}
        else:
            fps = float(params["fps"])
            outputs = {
                "mp4": media.write_video(frames, media.join(out_dir, "video.mp4"), fps),
                "gif": media.write_video(frames, media.join(out_dir, "video.gif"), fps),
            }
        req, styles = request
        metrics, notes = self.scorer.score(frames, prompt=req.prompt, styles=list(styles))
        notes = [*self.notes, *notes, f"{per_step:.3f} s per sampling step"]
        return RowOutput(outputs=outputs, metrics=metrics, notes=notes)
