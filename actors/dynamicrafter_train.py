"""The Ray Train worker of DynamiCrafter training: one per GPU (or CPU process with gloo).

Only trainable parameters are synchronised (an all-reduce of their gradients) and checkpointed; the
frozen backbone is loaded by every worker from the node-local cache. A restarted or resubmitted run
continues from the latest checkpoint: weights, optimizer moments and step.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from actors.base import JobConfig, model_dtype
from actors.dynamicrafter import load_dynamicrafter
from pipelines.dynamicrafter.model import read_adapter
from pipelines.dynamicrafter.train import TrainConfig, trainable_parameters, training_loss

TRAIN_STATE = "train_state.pt"
# Testing hook, like ANIMA_CHAOS_KILL_ROW: fail at this step unless the run resumed from a checkpoint.
CHAOS_STEP_ENV = "ANIMA_CHAOS_TRAIN_STEP"


def train_worker(cfg: dict[str, Any]) -> None:
    import ray.train
    import torch.distributed as dist

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config = TrainConfig.from_dict(cfg["params"])
    device = "cuda" if cfg["use_gpu"] and torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(ray.train.torch.get_device())
    # Trainable weights stay fp32; the forward pass runs under autocast on GPUs.
    job = JobConfig("dynamicrafter", cfg["output"], "train", cfg["models"])
    model = load_dynamicrafter(job, device, torch.float32)
    params = trainable_parameters(model, config.stage)
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)

    step, resumed_from = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            _, weights = read_adapter(directory)
            model.load_adapter_state(weights)
            state = torch.load(Path(directory) / TRAIN_STATE, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        step = resumed_from = state["step"]

    autocast = (
        torch.autocast("cuda", model_dtype(device, config.precision)) if device == "cuda" else nullcontext()
    )
    shard = ray.train.get_dataset_shard("train")
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + rank * 7919 + step)
    chaos = os.environ.get(CHAOS_STEP_ENV)
    loss_sum, count = 0.0, 0
    while step < config.steps:
        for batch in shard.iter_batches(batch_size=config.batch_size, batch_format="numpy"):
            frames = torch.from_numpy(batch["frames"]).permute(0, 1, 4, 2, 3).float() / 127.5 - 1
            strides = torch.from_numpy(batch["frame_stride"])
            with autocast:
                loss = training_loss(model, frames, list(batch["prompt"]), strides, config, generator)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            if world > 1:
                for p in params.values():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= world
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
            if step >= config.steps:
                break


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
