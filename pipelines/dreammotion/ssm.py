"""Space-time self-similarity of the UNet's decoder self-attention keys (DreamMotion's S-SSM and T-SSM).

Keys of the spatial self-attention (`attn1.to_k`) in the chosen decoder layers describe the video's
layout independently of its appearance. S-SSM matches, frame by frame, the cosine self-similarity of
all token pairs (HW × HW) between the edited and the source video; T-SSM matches the frame-by-frame
cosine similarity (N × N) of their spatial marginal means. The source side is a detached target.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

AUTO = "auto"


class StopForward(Exception):
    """Raised by the recorder after the last hooked layer: the rest of the UNet is not needed."""


def spatial_key_layers(unet: nn.Module, prefixes: list[str] | str = AUTO) -> list[str]:
    """Names of the spatial self-attention key projections under `prefixes` (module-name prefixes).

    `auto` picks the first decoder block with attention, the lowest-resolution one (ZeroScope and
    ModelScope: `up_blocks.1`, 10×18 tokens at 576×320), where keys carry layout at a cost that stays
    small ((HW)² entries per frame). Temporal attention (`temp_attentions`) is never hooked.
    """
    names = [
        name
        for name, _ in unet.named_modules()
        if name.endswith("attn1.to_k") and ".attentions." in name and "temp_attentions" not in name
    ]
    if prefixes == AUTO:
        decoder = [n for n in names if n.startswith("up_blocks.")]
        if not decoder:
            raise ValueError("the UNet has no decoder self-attention layers to hook")
        block = ".".join(decoder[0].split(".")[:2])
        return [n for n in decoder if n.startswith(block + ".")]
    wanted = [prefixes] if isinstance(prefixes, str) else list(prefixes)
    chosen = [n for n in names if any(n == p or n.startswith(p.rstrip(".") + ".") for p in wanted)]
    if not chosen:
        raise ValueError(f"no spatial self-attention keys under {wanted}; some that exist: {names[:6]}")
    return chosen


class KeyRecorder:
    """Captures the outputs of the chosen `to_k` layers while it is active."""

    def __init__(self, unet: nn.Module, layers: list[str]):
        modules = dict(unet.named_modules())
        self.layers = layers
        self.keys: dict[str, torch.Tensor] = {}
        self._stop_after_last = False
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in layers]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.keys[name] = output
            if self._stop_after_last and len(self.keys) == len(self.layers):
                raise StopForward

        return hook

    @contextlib.contextmanager
    def recording(self, stop_after_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Record keys of the passes inside; with `stop_after_last`, end each pass at the last layer."""
        self.keys = {}
        self._stop_after_last = stop_after_last
        try:
            yield self.keys
        except StopForward:
            pass
        finally:
            self._stop_after_last = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def spatial_self_similarity(keys: torch.Tensor) -> torch.Tensor:
    """Keys [frames, HW, C] -> per-frame cosine similarity of every token pair [frames, HW, HW]."""
    unit = F.normalize(keys.float(), dim=-1, eps=1e-8)
    return unit @ unit.transpose(1, 2)


def temporal_self_similarity(keys: torch.Tensor) -> torch.Tensor:
    """Keys [frames, HW, C] -> cosine similarity of the frames' spatial marginal means [frames, frames]."""
    unit = F.normalize(keys.float().mean(1), dim=-1, eps=1e-8)
    return unit @ unit.T


def s_ssm(edited: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ_n ‖SS^n(edited) − SS^n(source)‖², the paper's formula (sum over the map, mean over frames)."""
    diff = spatial_self_similarity(edited) - spatial_self_similarity(source).detach()
    return diff.pow(2).sum((1, 2)).mean()


def t_ssm(edited: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """‖TS(edited) − TS(source)‖², the paper's formula."""
    return (temporal_self_similarity(edited) - temporal_self_similarity(source).detach()).pow(2).sum()
