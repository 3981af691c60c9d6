"""Pieces of the training loop in one process: gradient averaging (the Ray Train tests run it across two
workers) and gradient checkpointing of the UNet."""

from __future__ import annotations

import numpy as np
import pytest
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


def _loss_and_gradients(method: str, stage: int, batch: dict, checkpointing: bool, precision: str = "auto"):
    from actors.train_worker import recipe_of, training_autocast
    from pipelines import training

    recipe = recipe_of(method)
    config = recipe.config({"stage": stage, "num_frames": 4, "height": 32, "width": 48})
    model = recipe.load({"backbone": "tiny"}, "cpu", torch.float32)
    training.contiguous_group_norm_inputs(model.backbone.unet)
    if checkpointing:
        training.checkpoint_unet_blocks(model.backbone.unet)
    params = recipe.trainable(model, config)
    calls = []
    model.backbone.unet.mid_block.resnets[0].conv1.register_forward_hook(lambda *_: calls.append(1))
    with training_autocast("cpu", precision):
        loss = recipe.loss(model, batch, config, torch.Generator().manual_seed(0))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    return float(loss.detach()), grads, len(calls)


def _batch(frames: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        "frames": rng.integers(0, 256, (2, frames, 32, 48, 3), dtype=np.uint8),
        "style": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
        "prompt": ["a red square", "a blue circle"],
        "frame_stride": np.array([2, 3]),
        "fps": np.array([24.0, 0.0]),
    }


STAGES = [("dynamicrafter", 3, 4), ("stylecrafter", 1, 1), ("stylecrafter", 2, 4)]


@pytest.mark.parametrize(("method", "stage", "frames"), STAGES)
def test_checkpointing_recomputes_the_unet_blocks_and_leaves_gradients_unchanged(method, stage, frames):
    batch = _batch(frames)
    loss, grads, calls = _loss_and_gradients(method, stage, batch, checkpointing=False)
    loss_c, grads_c, calls_c = _loss_and_gradients(method, stage, batch, checkpointing=True)
    assert calls == 1 and calls_c == 2  # the block ran again in backward
    assert loss_c == loss and grads.keys() == grads_c.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("method", "stage", "frames"), STAGES)
def test_a_step_under_bf16_autocast_keeps_the_fp32_loss_and_gradients(method, stage, frames):
    """GPUs train under bf16 autocast with checkpointing on; here CPU autocast runs the same model code
    (its casts where fp32 weights meet bf16 activations, recomputation under autocast). Measured: loss
    within 7e-4 relative, gradients' cosine 0.9997; a cast that broke the graph or dropped a gradient
    would change them far more."""
    batch = _batch(frames)
    loss, grads, _ = _loss_and_gradients(method, stage, batch, checkpointing=True)
    loss_bf16, grads_bf16, _ = _loss_and_gradients(method, stage, batch, checkpointing=True, precision="bf16")
    assert loss_bf16 != loss and abs(loss_bf16 - loss) < 0.01 * loss  # autocast ran, and rounded only
    assert grads_bf16.keys() == grads.keys()
    for name in grads:
        assert grads_bf16[name].dtype == torch.float32, name  # weights and their gradients stay fp32
    flat, flat_bf16 = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (grads, grads_bf16))
    assert float(torch.nn.functional.cosine_similarity(flat, flat_bf16, dim=0)) > 0.99


@pytest.mark.parametrize("method", ["dynamicrafter", "stylecrafter"])
def test_the_decoding_stage_deserializes_without_torch(method, tmp_path):
    """Ray Data's decode tasks, Train's controller and the split coordinator all unpickle the decode
    function and its config; none of them should pay for importing torch and the model code."""
    import subprocess
    import sys

    from ray import cloudpickle

    from actors.read_stage import TrainingReads, decode_examples
    from actors.train_worker import recipe_of

    recipe = recipe_of(method)
    payload = tmp_path / "decode.pkl"
    reads = TrainingReads(str(tmp_path), "run", 2, 300.0)
    # What jobs.train hands Ray Data: the guarded decode, and the recipe's decode with its arguments.
    payload.write_bytes(
        cloudpickle.dumps((decode_examples, recipe.decode, reads, recipe.config({"stage": 2})))
    )
    check = (
        "import pickle, sys; _, decode, _, config = pickle.load(open(sys.argv[1], 'rb')); "
        "print(decode.__module__, type(config).__name__, sorted({m.split('.')[0] for m in sys.modules} "
        "& {'torch', 'diffusers', 'transformers'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", check, str(payload)], capture_output=True, text=True, check=True
    )
    module, config_type, heavy = out.stdout.strip().split(" ", 2)
    assert module == f"pipelines.{method}.training_data" and config_type.endswith("TrainConfig")
    assert heavy == "[]"


def test_a_training_row_whose_decoding_stalls_dies_or_fails_is_skipped_and_the_others_decoded(
    tmp_path, stalling_server
):
    """A stalled read held training's decoding task, and so the whole run, forever; a decoder crash killed
    its task on every retry; any error but an unreadable file failed the dataset. Each is now that row's
    skip: the stall is stopped at the row time limit (the process ends, as Ray's retry needs) and given up
    on the retry, a row charged `max_row_crashes` deaths is given up, and an error skips its row. Rows are
    told apart by their place in the manifest: training ids may repeat or be missing."""
    import json
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from actors.base import inflight_marker
    from actors.read_stage import ROW_COLUMN, TrainingReads, decode_examples
    from actors.train_worker import recipe_of
    from pipelines import media

    image = tmp_path / "still.png"
    Image.fromarray(np.full((24, 32, 3), 200, np.uint8)).save(image)

    def batch(*rows: tuple[int, str | None, str]) -> pa.Table:  # (place, id, prompt), all of the image
        return pa.Table.from_pylist(
            [{ROW_COLUMN: n, "id": i, "image": str(image), "prompt": p} for n, i, p in rows]
        )

    stalled = batch((0, "fine", "grey"), (1, "stalled", "x"))
    stalled = stalled.set_column(2, "image", pa.array([str(image), f"{stalling_server}/still.png"]))
    pq.write_table(stalled, tmp_path / "rows.parquet")
    reads = TrainingReads(str(tmp_path / "out"), "run-1", max_row_crashes=2, row_time_limit_s=2.0)
    script = f"""
import pyarrow.parquet as pq
from actors.read_stage import TrainingReads, decode_examples
from pipelines.dynamicrafter.training_data import DynamiCrafterTrainConfig, decode
config = DynamiCrafterTrainConfig.from_dict({{"stage": 2, "num_frames": 2, "height": 16, "width": 16}})
batch = pq.read_table({str(tmp_path / "rows.parquet")!r})
out = decode_examples(batch, decode, TrainingReads(*{[reads.output, reads.run_id]!r}, 2, 2.0),
                      config=config, source="video")
print("examples", out.num_rows, out.column("prompt").to_pylist())
"""
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert first.returncode == 1 and "reading row '1' ran past the row time limit (2 s)" in first.stderr
    assert "examples 1 ['grey']" in again.stdout, again.stderr[-2000:]
    assert "training row 'stalled' skipped: reading its inputs ran past the row time limit (2 s)" in (
        again.stderr
    )
    assert "(raise --row-time-limit to read it)" in again.stderr

    recipe = recipe_of("dynamicrafter")
    config = recipe.config({"stage": 2, "num_frames": 2, "height": 16, "width": 16})
    # One id for both rows: the death is charged to the row it happened in (its place), not to the id.
    marker = inflight_marker(reads.output, ["5", "6"], "train-video")
    media.write_text(json.dumps({"run_id": "run-1", "starts": 2, "reading": "5", "deaths": {"5": 1}}), marker)
    out = decode_examples(
        batch((5, "same", "crashed"), (6, "same", "fine")), recipe.decode, reads, "video", config=config
    )
    assert out.column("prompt").to_pylist() == ["fine"] and out.column("frames").type.shape == [2, 16, 16, 3]
    assert json.loads(media.read_bytes(marker))["deaths"] == {"5": 2}  # kept: given up for the run
    skipped = json.loads(media.read_bytes(inflight_marker(reads.output, ["5", "6"], "train-video-skipped")))
    assert skipped["run_id"] == "run-1"
    (record,) = skipped["rows"]
    assert record["id"] == "same" and record["row"] == "5" and "died 2 times" in record["reason"]

    def fails_on_b(one_row: pa.Table, **kwargs) -> pa.Table:
        if one_row.num_rows and one_row.column("id")[0].as_py() == "b":
            raise KeyError("frame_stride")
        if one_row.num_rows and one_row.column("id")[0].as_py() == "cancelled":
            raise KeyboardInterrupt  # what Ray raises in a task it cancels (a Train restart, a run's end)
        return recipe.decode(one_row, **kwargs)

    out = decode_examples(batch((7, "a", "a"), (8, "b", "b")), fails_on_b, reads, "image", config=config)
    assert out.column("prompt").to_pylist() == ["a"]
    skipped = json.loads(media.read_bytes(inflight_marker(reads.output, ["7", "8"], "train-image-skipped")))
    (record,) = skipped["rows"]
    assert record["id"] == "b" and record["reason"].startswith("KeyError: 'frame_stride'")
    nothing = decode_examples(batch((8, "b", "b")), fails_on_b, reads, "image", config=config)
    assert nothing.num_rows == 0 and nothing.schema == out.schema
    # Ray Data concatenates blocks only of tensor types that also hash alike (a set of them must be one).
    assert len({nothing.schema.field("frames").type, out.schema.field("frames").type}) == 1
    assert not media.exists(inflight_marker(reads.output, ["7", "8"], "train-image"))  # nothing given up

    # A task cancelled after a death of its batch: its marker is settled, so the next pass charges no row.
    marker = inflight_marker(reads.output, ["9", "10"], "train-image")
    media.write_text(json.dumps({"run_id": "run-1", "starts": 1}), marker)
    with pytest.raises(KeyboardInterrupt):
        decode_examples(
            batch((9, "cancelled", "c"), (10, "d", "d")), fails_on_b, reads, "image", config=config
        )
    assert not media.exists(marker)


def test_a_pass_that_gives_a_worker_no_example_fails_the_run_instead_of_looping():
    """Every row skipped (all files missing, a wrong path prefix): the loop asked for data forever."""
    from actors.train_worker import _forever

    class Shard:
        def __init__(self, passes: list[list[dict]]):
            self.passes = passes

        def iter_batches(self, **_: object):
            return iter(self.passes.pop(0))

    batches = _forever(Shard([[{"x": 1}], [{"x": 2}], []]), 2, "video")
    assert [next(batches), next(batches)] == [{"x": 1}, {"x": 2}]
    with pytest.raises(
        RuntimeError, match="training source 'video' gave this worker no example in a whole pass"
    ):
        next(batches)


def test_the_list_of_skipped_rows_is_this_runs_only_and_goes_when_a_run_skips_none(tmp_path):
    """Records of an earlier run whose driver was killed before it listed them (the rows may be fixed
    since) are not this run's; a run that skipped nothing leaves no earlier run's list behind."""
    import json

    import pyarrow.parquet as pq

    from jobs.train import save_skipped
    from pipelines import media

    folder = tmp_path / "_inflight" / "train-clips-skipped"
    for name, run, row in (("a.json", "old", "1"), ("b.json", "new", "4"), ("c.json", "new", "2")):
        record = {"id": f"id{row}", "source": "clips", "row": row, "reason": "video not found"}
        media.write_text(json.dumps({"run_id": run, "rows": [record]}), str(folder / name))
    count, listed = save_skipped(str(tmp_path), ["clips"], "dynamicrafter-stage2", "new")
    assert count == 2 and [r["row"] for r in pq.read_table(listed).to_pylist()] == [2, 4]
    media.remove_tree(str(folder))
    assert save_skipped(str(tmp_path), ["clips"], "dynamicrafter-stage2", "newer") == (0, None)
    assert not media.exists(listed)
