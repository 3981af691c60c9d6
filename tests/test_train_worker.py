"""The training loop's gradient averaging, in one process (the Ray Train tests run it across two)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from actors.train_worker import average_gradients


def test_gradients_are_averaged_in_buckets_and_missing_ones_count_as_zero(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        params = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(5))]
        params[0].grad = torch.arange(3.0)
        params[1].grad = torch.arange(4.0).view(2, 2) + 10
        # Buckets of 8 elements: the first two parameters share one; "world" 2 halves the sum over 1 process.
        average_gradients(params, world=2, bucket=8)
    finally:
        dist.destroy_process_group()
    assert torch.equal(params[0].grad, torch.arange(3.0) / 2)
    assert torch.equal(params[1].grad, (torch.arange(4.0).view(2, 2) + 10) / 2)
    assert torch.equal(params[2].grad, torch.zeros(5))
