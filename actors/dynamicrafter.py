"""DynamiCrafter on Ray: each actor holds one DynamiCrafter model and samples its batch's videos together."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar

import numpy as np
import torch

from actors.adapter_actor import AdapterActor
from actors.base import RowError, RowOutput, row_params
from pipelines import media
from pipelines.dynamicrafter.model import load_dynamicrafter
from pipelines.dynamicrafter.sample import BATCH_KEYS, Request, SampleParams, sample
from pipelines.metrics import to_signed, to_uint8


class DynamiCrafterActor(AdapterActor):
    method = "dynamicrafter"
    kind = "image"
    defaults: ClassVar[dict[str, Any]] = {**asdict(SampleParams()), "fps": 8, "precision": "auto"}
    load_model = staticmethod(load_dynamicrafter)
    sampler = staticmethod(sample)
    batch_keys = BATCH_KEYS

    def _request(self, row: dict[str, Any], params: dict[str, Any]) -> Request:
        prompt = (row.get("prompt") or "").strip()
        if not prompt:
            raise RowError("empty prompt: describe the motion (DynamiCrafter is text- and image-conditioned)")
        p = row_params(SampleParams.from_dict, params)
        if p.mode == "interpolate" and not row.get("end_image"):
            raise RowError("mode interpolate needs an end_image")
        size = (p.height, p.width)

        def load(uri: str) -> torch.Tensor:  # bilinear cover + centre crop, as the official script
            return to_signed(media.read_image(uri, size, resample="bilinear")[None])[0]

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
        frames = to_uint8(video)
        if request.params.mode == "loop":
            frames = frames[:-1]  # the last frame repeats the first: drop it so the clip loops seamlessly
        outputs = self.write_clip(row["id"], frames, float(params["fps"]))
        image = np.ascontiguousarray(to_uint8(request.image[None])[0])
        metrics, notes = self.scorer.score(frames, prompt=request.prompt, image=image)
        notes = [*self.notes, *notes, f"{per_step:.3f} s per sampling step"]
        return RowOutput(outputs=outputs, metrics=metrics, notes=notes)
