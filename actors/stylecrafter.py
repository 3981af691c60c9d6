"""StyleCrafter on Ray: each actor holds one StyleCrafter model and samples its batch's videos together."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar

import numpy as np
import torch

from actors.adapter_actor import AdapterActor
from actors.base import RowError, RowOutput, row_params
from pipelines import media
from pipelines.metrics import to_signed, to_uint8
from pipelines.params import square_side
from pipelines.stylecrafter.model import load_stylecrafter
from pipelines.stylecrafter.sample import BATCH_KEYS, Request, SampleParams, sample


class StyleCrafterActor(AdapterActor):
    method = "stylecrafter"
    kind = "style"
    # style_size: references are cover-resized and centre-cropped to this square, as the official code.
    defaults: ClassVar[dict[str, Any]] = {
        **asdict(SampleParams()),
        "fps": 8,
        "style_size": 512,
        "precision": "auto",
    }
    load_model = staticmethod(load_stylecrafter)
    sampler = staticmethod(sample)
    batch_keys = BATCH_KEYS

    def _request(self, row: dict[str, Any], params: dict[str, Any]) -> Request:
        prompt = (row.get("prompt") or "").strip()
        if not prompt:
            raise RowError("empty prompt")
        uris = row.get("style") or []
        if not uris:
            raise RowError("no style images: give one or more URIs in the style column")
        p = row_params(SampleParams.from_dict, params)
        size = row_params(lambda values: square_side(values, "style_size", frames=len(uris)), params)
        # As the official loader: the short side resized to style_size (bilinear), the centre cropped.
        styles = np.stack([media.read_image(uri, (size, size), resample="bilinear") for uri in uris])
        return Request(prompt=prompt, styles=to_signed(styles), params=p)

    def _write(
        self,
        row: dict[str, Any],
        params: dict[str, Any],
        request: Request,
        result: tuple[torch.Tensor, float],
    ) -> RowOutput:
        video, per_step = result
        frames = to_uint8(video)
        outputs = self.write_clip(row["id"], frames, float(params["fps"]))
        styles = list(to_uint8(request.styles))
        metrics, notes = self.scorer.score(frames, prompt=request.prompt, styles=styles)
        notes = [*self.notes, *notes, f"{per_step:.3f} s per sampling step"]
        return RowOutput(outputs=outputs, metrics=metrics, notes=notes)
