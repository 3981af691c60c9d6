"""Hyperparameter dataclasses built from a row's effective parameters (defaults ← --set ← columns)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from pipelines import media

T = TypeVar("T")


def from_values(cls: type[T], values: dict[str, Any], strict: bool = False) -> T:
    """`cls` from the keys of `values` it knows (None keeps the default), typed like the defaults.

    Values arrive as JSON from `--set` or from Parquet columns, so 5.0 is a fine integer but 2.5 is not,
    and a boolean must be a boolean. A None default (one that depends on other parameters) takes a
    number. `strict` refuses keys `cls` does not know.
    """
    defaults = cls()
    names = [f.name for f in fields(cls)]
    if strict and set(values) - set(names):
        unknown = ", ".join(sorted(set(values) - set(names)))
        raise ValueError(f"unknown parameter(s) {unknown}; known: {', '.join(names)}")
    out = {}
    for name in names:
        if values.get(name) is None:
            continue
        value, default = values[name], getattr(defaults, name)
        kind = float if default is None else type(default)
        if default is None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if kind is bool and not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        if kind is int and (isinstance(value, bool) or float(value) != int(value)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        out[name] = kind(value)
    return cls(**out)


def shared_value(items: list[Any], name: str) -> Any:
    """The `params.<name>` every item (a job with `.params`) has: items run together must agree on it."""
    values = {getattr(item.params, name) for item in items}
    if len(values) > 1:
        raise ValueError(f"items run together must share {name}, got {sorted(values, key=repr)}")
    return values.pop()


def check_frame_size(height: int, width: int, name: str, frames: int = 1) -> None:
    """Refuse `frames` frames of a size that a row asks for past what one input read may decode
    (`media.check_decoded`): their tensors, made on the host before any GPU sees them, would take the
    worker's memory (12288x12288 took 4 GB)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"{name} must be positive, got {width}x{height}")
    try:
        media.check_decoded(name, frames, height, width)
    except media.MediaError as exc:
        raise ValueError(str(exc)) from None


def square_side(values: dict[str, Any], name: str, frames: int = 1) -> int:
    """The side of the `frames` square frames `values[name]` asks for, held to `check_frame_size`."""
    side = int(values[name])
    check_frame_size(side, side, name, frames)
    return side
