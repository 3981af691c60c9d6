"""`anima convert`: released checkpoints into anima's backbone and adapter directories, and `check-oracle`.

    anima convert dynamicrafter --checkpoint FILE --output DIR [--variant 256|512|1024|512_interp]
                                [--config OFFICIAL.yaml] [--tokenizer REF]
    anima convert videocrafter1 --checkpoint FILE --output DIR [--config OFFICIAL.yaml] [--tokenizer REF]
    anima convert stylecrafter --adapter adapter_v1.pth --temporal temporal_v1_1.pth --output DIR
                               [--config OFFICIAL.yaml] [--image-encoder REF]
    anima convert check-oracle FILE.safetensors

The conversion itself (`pipelines/checkpoints/`) is the same code the hub-id loading runs; this module
only parses arguments and reports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from jobs.runner import JobError
from pipelines.checkpoints import dynamicrafter, ldm_parts, oracle, stylecrafter
from pipelines.checkpoints.keymap import ConversionError


def add_parser(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser(
        "convert", help="convert a released checkpoint, or check a converter on an oracle"
    )
    kinds = convert.add_subparsers(dest="family", required=True)
    dc = _checkpoint_parser(kinds, "dynamicrafter", "a DynamiCrafter model.ckpt or safetensors file")
    dc.add_argument(
        "--variant", choices=sorted(dynamicrafter.VARIANTS), default=None, help="default: detected"
    )
    _checkpoint_parser(kinds, "videocrafter1", "VideoCrafter1 T2V model.ckpt (StyleCrafter's base)")
    sc = kinds.add_parser("stylecrafter", help="StyleCrafter adapter_v1.pth + temporal_v1_1.pth")
    sc.add_argument("--adapter", required=True, help="adapter_v1.pth")
    sc.add_argument("--temporal", required=True, help="temporal_v1_1.pth")
    sc.add_argument("--output", required=True, help="writes OUTPUT/adapter")
    sc.add_argument("--config", default=None, help="official inference YAML, for non-released architectures")
    sc.add_argument("--image-encoder", default=stylecrafter.STYLE_IMAGE_ENCODER, help="CLIP image tower")
    check = kinds.add_parser("check-oracle", help="compare anima with the official code's recorded outputs")
    check.add_argument("file", help="an oracle .safetensors with its .json beside it")


def _checkpoint_parser(kinds: argparse._SubParsersAction, name: str, about: str) -> argparse.ArgumentParser:
    parser = kinds.add_parser(name, help=about)
    parser.add_argument("--checkpoint", required=True, help="model.ckpt (Lightning) or .safetensors")
    parser.add_argument("--output", required=True, help="writes OUTPUT/backbone (and OUTPUT/adapter)")
    parser.add_argument(
        "--config", default=None, help="official inference YAML, for non-released architectures"
    )
    parser.add_argument(
        "--tokenizer", default=ldm_parts.OPENCLIP_TOKENIZER, help="CLIP BPE files (hub id or dir)"
    )
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run `anima convert ...`; returns the exit status (check-oracle: 1 when an output differs)."""
    try:
        if args.family == "check-oracle":
            return _check_oracle(args.file)
        config = yaml.safe_load(Path(args.config).read_text()) if args.config else None
        if args.family == "dynamicrafter":
            done = dynamicrafter.convert_checkpoint(
                args.checkpoint, args.output, args.variant, config, args.tokenizer
            )
        elif args.family == "videocrafter1":
            done = stylecrafter.convert_videocrafter1(args.checkpoint, args.output, config, args.tokenizer)
        else:
            done = stylecrafter.convert_stylecrafter(
                args.adapter, args.temporal, args.output, config, args.image_encoder
            )
    except (ConversionError, OSError, yaml.YAMLError) as exc:
        raise JobError(str(exc)) from exc
    where = " ".join(f"--{k} {v}" for k, v in done.items() if k in ("backbone", "adapter"))
    print(f"[anima] converted {args.family}: {where}")
    return 0


def _check_oracle(path: str) -> int:
    results = oracle.check_oracle(path)
    for r in results:
        verdict = "ok" if r.ok else "DIFFERS"
        print(
            f"  {r.name}: max_abs_diff={r.max_abs_diff:.3g} tolerance={r.tolerance:.3g} {verdict}",
            file=sys.stderr,
        )
    worst = max(results, key=lambda r: r.max_abs_diff / r.tolerance)
    print(f"max_abs_diff={worst.max_abs_diff:.6g} tolerance={worst.tolerance:.6g}")
    return 0 if all(r.ok for r in results) else 1
