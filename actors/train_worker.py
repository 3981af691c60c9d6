"""The Ray Train worker every method's adapter training runs: one per GPU (or CPU process with gloo).

The method's recipe (`pipelines/<method>/train.py: RECIPE`) gives the model, the trainable parameters
and the loss; this loop does what is the same for all: data from one or more sources sampled by their
share, gradients of the trainable parameters all-reduced across workers, clipping, AdamW, bf16 autocast
on GPUs, checkpoints of the trainable parameters only, and resuming from the latest checkpoint.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from actors.base import model_dtype
from pipelines import adapters, training
from pipelines.training import Recipe

TRAIN_STATE = "train_state.pt"
# Testing hook, like ANIMA_CHAOS_KILL_ROW: fail at this step unless the run resumed from a checkpoint.
CHAOS_STEP_ENV = "ANIMA_CHAOS_TRAIN_STEP"
BUCKET_ELEMENTS = 2**24  # 64 MiB of fp32 gradients per all-reduce
RECIPES = {
    "dynamicrafter": "pipelines.dynamicrafter.train:RECIPE",
    "stylecrafter": "pipelines.stylecrafter.train:RECIPE",
}


def recipe_of(method: str) -> Recipe:
    module, name = RECIPES[method].split(":")
    return getattr(importlib.import_module(module), name)


def _forever(shard: Any, batch_size: int, source: str) -> Iterator[dict[str, Any]]:
    """The shard's batches, pass after pass. A pass that yields none fails the run with why: the loop
    would otherwise ask for data forever."""
    while True:
        empty = True
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            empty = False
            yield batch
        if empty:
            raise RuntimeError(
                f"training source {source!r} gave this worker no example in a whole pass over its data: "
                "every row was skipped (OUTPUT/<method>-stage<K>-skipped.parquet lists why), or there are "
                "fewer examples than workers"
            )


def train_worker(cfg: dict[str, Any]) -> None:
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    recipe = recipe_of(cfg["method"])
    config = recipe.config(cfg["params"])
    device = "cuda" if cfg["use_gpu"] and torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(ray.train.torch.get_device())
    # Trainable weights stay fp32; the forward pass runs under autocast on GPUs.
    model = recipe.load(cfg["models"], device, torch.float32)
    if device == "cpu":
        training.contiguous_group_norm_inputs(model.backbone.unet)
    if config.gradient_checkpointing:
        training.checkpoint_unet_blocks(model.backbone.unet)
    params = recipe.trainable(model, config)
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)

    step, resumed_from = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            model.load_adapter_state(adapters.read_adapter(directory)[1])
            state = torch.load(Path(directory) / TRAIN_STATE, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        step = resumed_from = state["step"]

    autocast = training_autocast(device, config.precision)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + rank * 7919 + step)
    sources = recipe.sources(config)
    names = list(sources)
    shares = torch.tensor([sources[n][0] for n in names])
    streams = {n: _forever(ray.train.get_dataset_shard(n), config.batch_size, n) for n in names}
    chaos = os.environ.get(CHAOS_STEP_ENV)
    loss_sum, count = 0.0, 0
    while step < config.steps:
        # Every worker draws the same source at a step (the generators differ only by rank afterwards).
        source = names[int(torch.multinomial(shares, 1, generator=torch.Generator().manual_seed(step)))]
        batch = next(streams[source])
        with autocast:
            loss = recipe.loss(model, {**batch, "source": source}, config, generator)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        if world > 1:
            average_gradients(list(params.values()), world)
        torch.nn.utils.clip_grad_norm_(params.values(), config.grad_clip)
        optimizer.step()
        step += 1
        loss_sum, count = loss_sum + float(loss), count + 1
        if chaos and resumed_from is None and step == int(chaos):
            raise RuntimeError(f"chaos: worker {rank} fails at step {step}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            metrics = {"step": step, "loss": loss_sum / count, "resumed_from": resumed_from or 0}
            _report(model, params, optimizer, step, metrics, rank)
            loss_sum, count = 0.0, 0


def training_autocast(device: str, precision: str) -> AbstractContextManager[Any]:
    """The forward pass's mixed precision: bf16 autocast on GPUs (fp16 without bf16), or what `precision`
    names; none on CPU unless `precision` asks for a half type (then CPU autocast, as the tests run it)."""
    dtype = model_dtype(device, precision)
    return nullcontext() if dtype == torch.float32 else torch.autocast(device, dtype)


def average_gradients(params: list[torch.nn.Parameter], world: int, bucket: int = BUCKET_ELEMENTS) -> None:
    """Mean of the gradients over workers, a few flat buffers at a time.

    One all-reduce per parameter costs a round trip each (hundreds per step for an adapter); flat buckets
    of up to `bucket` elements, as DDP does, need a handful.
    """
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: list[list[torch.nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if groups[-1] and size + p.numel() > bucket:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.numel()
    for group in groups:
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat /= world
        for p, g in zip(group, flat.split([p.numel() for p in group]), strict=True):
            p.grad.copy_(g.view_as(p.grad))


def _report(model, params, optimizer, step: int, metrics: dict[str, float], rank: int) -> None:
    """Every worker reports (it is a barrier); rank 0 attaches the checkpoint of the trainable parameters."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        unet = {name: p.detach() for name, p in params.items() if name.startswith("unet.")}
        model.save_adapter(directory, extra=unet)
        torch.save({"optimizer": optimizer.state_dict(), "step": step}, Path(directory) / TRAIN_STATE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
