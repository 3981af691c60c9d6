"""The one strict key-mapping mechanism every converter uses: each checkpoint tensor is used exactly once.

A converter lists `Rule`s from checkpoint key prefixes to anima key prefixes (or to nothing, with the
reason the official model never reads that tensor). `remap` then refuses, naming the keys, any
checkpoint key no rule claims, any anima key nothing fills, two tensors landing on one key, and any
shape that differs, so a converter cannot silently drop, invent or misplace a weight. Shapes-only
checks run the same code on meta tensors (the full-size manifests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

# How many keys of each kind an error message lists before it only counts the rest.
_SHOWN = 20


class ConversionError(ValueError):
    """A checkpoint that does not fit the model it claims to be; the message names the keys."""


@dataclass(frozen=True)
class Rule:
    """Checkpoint keys under `source` (a prefix ending in '.', or one exact key) go to `target`.

    `target` None drops them: `reason` must then say why the official code never uses them.
    `transform` reshapes a tensor (e.g. a 1x1 Conv1d weight into a Linear one), or splits it: a dict
    of key suffix -> tensor fills several keys (a packed q/k/v projection).
    """

    source: str
    target: str | None
    transform: Callable[[torch.Tensor], torch.Tensor | dict[str, torch.Tensor]] | None = None
    reason: str = ""

    def matches(self, key: str) -> bool:
        return key.startswith(self.source) if self.source.endswith(".") else key == self.source

    def target_key(self, key: str) -> str:
        assert self.target is not None
        return self.target + key[len(self.source) :] if self.source.endswith(".") else self.target


def prefixed(rules: Iterable[Rule], source: str = "", target: str = "") -> list[Rule]:
    """The same rules one level down: checkpoint keys under `source`, anima keys under `target`."""
    return [
        Rule(source + r.source, None if r.target is None else target + r.target, r.transform, r.reason)
        for r in rules
    ]


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN])
    return f"{shown} and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else shown


def remap(
    checkpoint: Mapping[str, torch.Tensor],
    rules: list[Rule],
    expected: Mapping[str, torch.Tensor],
    what: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors renamed (and reshaped) onto `expected`'s keys, every tensor used once.

    The most specific rule (longest source) claims a key. Raises ConversionError listing every
    unclaimed, missing, doubly filled or mis-shaped key at once.
    """
    ordered = sorted(rules, key=lambda r: len(r.source), reverse=True)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unclaimed, doubled, shapes = [], [], []
    for key, tensor in checkpoint.items():
        rule = next((r for r in ordered if r.matches(key)), None)
        if rule is None:
            unclaimed.append(key)
            continue
        if rule.target is None:
            continue
        value = rule.transform(tensor) if rule.transform else tensor
        pieces = value if isinstance(value, dict) else {"": value}
        for suffix, piece in pieces.items():
            name = rule.target_key(key) + suffix
            if name in out:
                doubled.append(f"{name} (from {origin[name]} and {key})")
            elif name in expected and tuple(piece.shape) != tuple(expected[name].shape):
                shapes.append(f"{key} {list(tensor.shape)} -> {name} expects {list(expected[name].shape)}")
            out[name], origin[name] = piece, key
    leftover = [f"{origin[k]} -> {k}" for k in out if k not in expected]
    missing = [k for k in expected if k not in out]
    problems = [
        (unclaimed, "checkpoint key(s) no rule uses (is this the right model?)"),
        (leftover, "key(s) mapped onto names the model does not have"),
        (missing, "model key(s) the checkpoint does not fill"),
        (doubled, "model key(s) filled twice"),
        (shapes, "shape mismatch(es)"),
    ]
    lines = [f"{len(keys)} {text}: {_listing(keys)}" for keys, text in problems if keys]
    if lines:
        raise ConversionError(f"{what} does not convert:\n" + "\n".join(f"  - {line}" for line in lines))
    return out


def meta_tensors(shapes: Mapping[str, Iterable[int]]) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins for a manifest's keys, so `remap` checks a full-size layout without memory."""
    return {k: torch.empty(tuple(s), device="meta") for k, s in shapes.items()}
