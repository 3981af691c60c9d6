"""`anima` / `python -m jobs`: the command line of every job.

Exit status 0 means the job ran (error rows included); 2 means it could not start (bad manifest,
arguments or output); 3 means a model could not be loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any

from jobs.output_lease import OutputInUse
from jobs.runner import DEFAULT_BACKBONES, GENERATION_METHODS, JobError, JobSpec, run_job
from pipelines.model_cache import ModelLoadError
from schemas import ManifestError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def parse_value(text: str) -> Any:
    """`--set` values: JSON where it parses (numbers, booleans, null, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise JobError(f"--set expects key=value, got {pair!r}")
        params[key.strip()] = parse_value(value.strip())
    return params


def _pool_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="Parquet manifest (file or folder; any fsspec URI)")
    p.add_argument("--output", required=True, help="output root: results/, artifacts/, summary.json")
    p.add_argument("--actors", type=int, default=1, help="actor pool size (one model copy each)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (0: CPU)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per actor")
    p.add_argument(
        "--batch-size", type=int, default=None, help="rows per actor call (default: 1; evaluate: 32)"
    )
    p.add_argument("--seed", type=int, default=None, help="default seed of rows without a seed column")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="hyperparameter override")
    p.add_argument("--clip", default=DEFAULT_CLIP, help="CLIP for metrics: hub id, local dir, tiny, or none")
    p.add_argument("--dreamsim", default=None, metavar="DIR", help="DreamSim weights dir (PIC metric)")
    p.add_argument("--lpips", default=None, metavar="DIR", help="LPIPS weights dir (alex.pth + alexnet*.pth)")
    p.add_argument(
        "--max-row-crashes", type=int, default=2, help="give up on a row after it killed N workers in one run"
    )
    p.add_argument(
        "--row-time-limit",
        type=float,
        default=None,
        metavar="S",
        help="give up on a row that runs longer than S seconds, restarting its worker (default: 3000, "
        "evaluate 120; 0: no limit)",
    )
    p.add_argument("--retry-errors", action="store_true", help="also rerun rows that failed on bad input")
    p.add_argument(
        "--no-progress-timeout",
        type=float,
        default=None,
        help="seconds without progress to abort (default: 3600, more when --row-time-limit needs it)",
    )
    p.add_argument(
        "--verbose", action="store_true", help="also Ray Data's progress blocks and the workers' tqdm bars"
    )
    p.add_argument("--report", action="store_true", help="write OUTPUT/report/index.html when the job ends")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anima", description="Video-diffusion batch jobs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="run a method over a manifest")
    gen.add_argument("method", choices=GENERATION_METHODS)
    _pool_args(gen)
    gen.add_argument(
        "--backbone",
        default=None,
        help="backbone: hub id (a released checkpoint's is converted once per node), local dir, or tiny; "
        f"default per method: {DEFAULT_BACKBONES}",
    )
    gen.add_argument("--adapter", default=None, help="trained adapter checkpoint URI")
    gen.add_argument(
        "--xclip",
        default=None,
        help="X-CLIP model for text-video alignment, or none; livesketch default: "
        "microsoft/xclip-base-patch32 when it is cached on the node",
    )

    ev = sub.add_parser("evaluate", help="metrics of existing videos")
    _pool_args(ev)

    train = sub.add_parser("train", help="train an adapter on Ray Train")
    train.add_argument("method", choices=GENERATION_METHODS)
    train.add_argument("--stage", type=int, required=True)
    train.add_argument("--data", required=True)
    train.add_argument("--output", required=True)
    train.add_argument("--backbone", default="tiny")
    train.add_argument("--workers", type=int, default=1)
    train.add_argument("--gpus-per-worker", type=float, default=0.0)
    train.add_argument("--adapter", default=None, help="adapter to start from (the previous stage's)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training parameter")
    train.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before giving up")
    train.add_argument(
        "--max-row-crashes", type=int, default=2, help="skip a row after its decoding killed N CPU workers"
    )
    train.add_argument(
        "--row-time-limit",
        type=float,
        default=None,
        metavar="S",
        help="skip a row whose decoding runs longer than S seconds, restarting its CPU worker (default: 300; "
        "0: no limit)",
    )

    from jobs import convert, report

    convert.add_parser(sub)
    report.add_parser(sub)

    demo = sub.add_parser("demo", help="run the demo on local Ray with tiny models")
    demo.add_argument("--output", default="demo_output")
    demo.add_argument("--verbose", action="store_true", help="also Ray Data's progress blocks")
    return parser


def spec_from_args(args: argparse.Namespace, method: str) -> JobSpec:
    params = parse_sets(args.set)
    if args.seed is not None:
        params.setdefault("seed", args.seed)
    models = {
        "clip": None if args.clip in (None, "", "none") else args.clip,
        "dreamsim": args.dreamsim,
        "lpips": args.lpips,
    }
    for name in ("backbone", "adapter", "xclip"):
        if getattr(args, name, None) is not None:
            models[name] = getattr(args, name)
    return JobSpec(
        method=method,
        manifest=args.manifest,
        output=args.output,
        models=models,
        params=params,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        batch_size=args.batch_size,
        max_row_crashes=args.max_row_crashes,
        row_time_limit_s=args.row_time_limit,
        retry_errors=args.retry_errors,
        no_progress_timeout_s=args.no_progress_timeout,
        verbose=args.verbose,
    )


def _fail(message: str, advice: str, code: int) -> int:
    # Never break at hyphens: messages hold commands and model ids (huggingface-cli, text-to-video-ms).
    print(
        textwrap.fill(f"anima: {message}", 110, subsequent_indent="  ", break_on_hyphens=False)
        if "\n" not in message
        else f"anima: {message}",
        file=sys.stderr,
    )
    print(textwrap.fill(advice, 110, break_on_hyphens=False), file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "convert":
            from jobs.convert import run_convert

            return run_convert(args)
        if args.command == "report":
            from jobs.report import write_report

            print(f"[anima] report: {write_report(args.outputs, args.out, args.table_rows)}")
        elif args.command == "demo":
            from jobs.demo import run_demo

            run_demo(args.output, verbose=args.verbose)
        elif args.command == "train":
            from jobs.train import TrainSpec, run_training

            run_training(
                TrainSpec(
                    method=args.method,
                    stage=args.stage,
                    data=args.data,
                    output=args.output,
                    models={"backbone": args.backbone, "adapter": args.adapter},
                    params=parse_sets(args.set),
                    workers=args.workers,
                    gpus_per_worker=args.gpus_per_worker,
                    max_failures=args.max_failures,
                    max_row_crashes=args.max_row_crashes,
                    row_time_limit_s=args.row_time_limit,
                )
            )
        else:
            spec = spec_from_args(args, "evaluate" if args.command == "evaluate" else args.method)
            run_job(spec)
            if args.report:
                from jobs.report import write_report

                print(f"[anima] report: {write_report([spec.output])}")
    except ManifestError as exc:
        return _fail(
            str(exc),
            "Fix the listed columns or rows of the manifest and submit again; nothing was processed.",
            2,
        )
    except JobError as exc:
        return _fail(str(exc), "Nothing was processed. Check the arguments (anima --help) and the paths.", 2)
    except OutputInUse as exc:
        return _fail(str(exc), "Nothing was processed by this job.", 2)
    except ModelLoadError as exc:
        return _fail(
            str(exc),
            "Nothing was processed. Check the model reference: a hub id needs network "
            "access (or a pre-filled cache with HF_HUB_OFFLINE=1), a local directory needs the "
            "diffusers/transformers layout, and 'tiny' needs nothing.",
            3,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
