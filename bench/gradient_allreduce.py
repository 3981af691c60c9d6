"""Gradient averaging across training workers: one all-reduce per tensor vs flat buckets (gloo, CPU).

Two processes average the gradients of a StyleCrafter adapter's trainable parameters (the tiny one by
default) both ways and print the seconds per step and their ratio.

    python bench/gradient_allreduce.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timing import seconds

from actors.train_worker import average_gradients


def per_tensor(params: list[torch.nn.Parameter], world: int) -> None:
    for p in params:
        dist.all_reduce(p.grad)
        p.grad /= world


def worker(rank: int, store: str, shapes: list[torch.Size], repeats: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape)
    times = {}
    for name, fn in (("per_tensor", per_tensor), ("buckets", average_gradients)):
        fn(params, 2)  # warm up
        dist.barrier()
        times[name] = seconds(lambda fn=fn: [fn(params, 2) for _ in range(repeats)]) / repeats
    if rank == 0:
        out.update(times)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    from pipelines.stylecrafter.model import load_stylecrafter
    from pipelines.stylecrafter.train import trainable_parameters
    from pipelines.stylecrafter.training_data import StyleTrainConfig

    model = load_stylecrafter({"backbone": "tiny"}, "cpu", torch.float32)
    shapes = [p.shape for p in trainable_parameters(model, StyleTrainConfig(stage=1)).values()]
    with tempfile.TemporaryDirectory() as directory, mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, (f"{directory}/store", shapes, args.repeats, out), nprocs=2)
        times = dict(out)
    elements = sum(s.numel() for s in shapes)
    print(f"{len(shapes)} tensors, {elements} elements, 2 gloo processes")
    per_tensor_ms, buckets_ms = times["per_tensor"] * 1e3, times["buckets"] * 1e3
    print(f"per tensor: {per_tensor_ms:.2f} ms/step; buckets: {buckets_ms:.2f} ms/step")
    print(f"ratio per tensor / buckets: {times['per_tensor'] / times['buckets']:.1f}")


if __name__ == "__main__":
    main()
