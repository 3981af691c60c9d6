"""Reading a released checkpoint as data: tensors only, never code.

Lightning `.ckpt` files are pickles. They are opened with `torch.load(weights_only=True)`, whose
unpickler builds tensors and plain containers and refuses any other global, so a file that would run
code on load is refused instead. safetensors files hold no code by design. A Lightning file's weights
sit under `state_dict` (DeepSpeed's under `module`); what else the file holds (epoch, step) is ignored.
"""

from __future__ import annotations

import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from pipelines.checkpoints.keymap import ConversionError

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = 0x80


def _kind(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(16)
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len < path.stat().st_size:
            return "safetensors"
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head[:1] == bytes([_PICKLE_PROTOCOL]):
        return "pickle"
    raise ConversionError(f"{path} is neither a PyTorch checkpoint nor a safetensors file (unknown format)")


def _tensors(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "module"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{path} holds no state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    others = sorted(k for k in obj if k not in tensors)
    if others:
        raise ConversionError(f"{path}: state dict entries that are not tensors: {', '.join(others[:10])}")
    return tensors


def _local(uri: str | Path) -> Path:
    """A local path for a checkpoint URI: fsspec URIs (s3://, gs://, ...) are copied into the node's
    model cache first, since torch.load and safetensors memory-map local files."""
    text = str(uri)
    if "://" not in text or text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    import hashlib

    import fsspec

    from pipelines.model_cache import cache_dir

    local = cache_dir() / "downloads" / hashlib.sha256(text.encode()).hexdigest()[:16] / Path(text).name
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.partial")
        try:
            fsspec.core.url_to_fs(text)[0].get_file(text, str(partial))
        except FileNotFoundError:
            raise ConversionError(f"checkpoint {text} does not exist") from None
        partial.rename(local)
    return local


def _load(path: Path) -> object:
    if not path.is_file():
        raise ConversionError(f"checkpoint {path} does not exist")
    kind = _kind(path)
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)|Unsupported operand \d+", str(exc))
        what = found.group(1) or found.group(0) if found else "refused by torch.load(weights_only=True)"
        raise ConversionError(
            f"{path} holds Python objects other than tensors ({what}); anima never unpickles them. "
            "Use the original release, or a safetensors file of its state dict"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, SafetensorError) as exc:
        raise ConversionError(f"{path} is corrupt or truncated: {str(exc).splitlines()[0]}") from exc


def read_nested(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """A file of {name: {key: tensor}} (StyleCrafter's temporal weights), tensors only."""
    path = _local(path)
    obj = _load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, dict) for v in obj.values()):
        raise ConversionError(f"{path} is not a dict of state dicts")
    return {name: _tensors(inner, path) for name, inner in obj.items()}


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a `.ckpt`/`.pt`/`.pth` or `.safetensors` file (a local path or any fsspec URI), by
    key (memory-mapped where possible).

    Raises ConversionError naming the file for a missing, corrupt or truncated file, and for one that
    holds Python objects other than tensors (a pickle with code).
    """
    path = _local(path)
    return _tensors(_load(path), path)
