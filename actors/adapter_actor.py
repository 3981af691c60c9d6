"""The actors of the adapter methods (DynamiCrafter, StyleCrafter): one model per actor, batched sampling."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from actors.base import JobConfig, RowActor, RowOutput, model_dtype
from pipelines import adapters, media
from pipelines.backbone import prepare_backbone
from pipelines.clip import prepare_clip
from pipelines.metrics import load_scorer


class AdapterActor(RowActor):
    """A method implements `_request(row, params)` (a request with `.params`) and `_write(...)`."""

    load_model: ClassVar[Callable[[dict[str, str | None], str, torch.dtype], nn.Module]]
    sampler: ClassVar[Callable[[nn.Module, list[Any]], tuple[torch.Tensor, float]]]
    batch_keys: ClassVar[tuple[str, ...]]  # request parameters that rows sampled together share

    @classmethod
    def prepare(cls, config: JobConfig) -> None:
        prepare_backbone(config.models["backbone"])
        adapter = adapters.adapter_of(config.models)
        prepare_clip(adapters.image_encoder_ref(adapter, config.models.get("backbone")))
        if config.models.get("clip"):
            prepare_clip(config.models["clip"])

    def setup(self) -> None:
        models = self.config.models
        dtype = model_dtype(self.device, self.config.params.get("precision", "auto"))
        self.model = type(self).load_model(models, self.device, dtype).eval()
        self.model_defaults = dict(getattr(self.model.config, "sample_defaults", {}))
        self.scorer = load_scorer(
            models.get("clip"), models.get("dreamsim"), models.get("lpips"), self.device
        )
        self.notes = [] if adapters.adapter_of(models) else [f"no --adapter: untrained {self.method} adapter"]

    def process_row(self, row: dict[str, Any], params: dict[str, Any]) -> RowOutput:
        return self.process_rows([row], [params])[0]

    def process_rows(self, rows: list[dict[str, Any]], params: list[dict[str, Any]]) -> list[RowOutput]:
        def run(requests: list[Any]) -> list[tuple[torch.Tensor, float]]:
            videos, per_step = type(self).sampler(self.model, requests)
            return [(video, per_step) for video in videos]

        def key(request: Any) -> tuple:
            return tuple(getattr(request.params, k) for k in type(self).batch_keys)

        return self.run_in_groups(rows, params, self._request, key, run, self._write)

    def write_clip(self, row_id: str, frames: Any, fps: float) -> dict[str, str]:
        """MP4 and GIF of a video; one frame is an image, written as PNG."""
        out_dir = self.config.artifacts_dir(row_id)
        if len(frames) == 1:
            return {"image": media.write_image(frames[0], media.join(out_dir, "image.png"))}
        return {
            "mp4": media.write_video(frames, media.join(out_dir, "video.mp4"), fps),
            "gif": media.write_video(frames, media.join(out_dir, "video.gif"), fps),
        }

    def _request(self, row: dict[str, Any], params: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _write(
        self, row: dict[str, Any], params: dict[str, Any], request: Any, result: tuple[torch.Tensor, float]
    ) -> RowOutput:
        raise NotImplementedError
