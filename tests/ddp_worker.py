"""Worker of ``test_train.py::test_ddp_two_processes_match_one_process``; run under
``python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT``.

1. A short ``eclsnn.training.trainer.train`` run with 2 processes; rank 1 records that it wrote no file,
   and the state of its own model (parameters and buffers) when train() built it and when train()
   returned, caught from the test side by wrapping ``eclsnn.models.create`` (which train() builds its
   network with); test_train.py compares the final one with rank 0's checkpoint.
2. Gradients: every rank takes its half of the first global batch of B samples (BatchLoader sharding)
   and does one DDP forward/backward; rank 0 then does the same step in one process on the whole B
   batch and compares the (DDP-averaged) gradients. BatchNorm runs in eval mode here: without
   SyncBatchNorm (CUDA-only in PyTorch) batch statistics are per rank by design, so this isolates
   what DDP must get exactly right — the sharding of the batch and the averaging of the gradients.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

import eclsnn.models
from eclsnn.training import run_files
from eclsnn.training import trainer as train_mod
from eclsnn.config import load_config
from eclsnn.data import BatchLoader, load_dataset, split_train_val
from eclsnn.models import create

GLOBAL_BATCH = 64
# The 2-process train() run (test_train.py repeats it in one process to compare).
DDP_RUN = {
    "train.run_name": "ddp", "train.epochs": 1, "train.batch_size": 64, "train.max_train_samples": 512,
    "train.progress": False, "data.val_fraction": 0.005, "evaluate.max_samples": 256, "train.device": "cpu",
}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create("cnn-fmnist", 10, activation="clip", levels=4)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def one_step_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    inner = getattr(model, "module", model)
    return {n: p.grad.detach().clone() for n, p in inner.named_parameters() if p.grad is not None}


def check_gradients(out: Path, rank: int, world: int) -> None:
    data = load_dataset("fashion-mnist", train=True)
    train_idx, _ = split_train_val(len(data), 0.1, seed=0)
    sharded = BatchLoader(data, train_idx, batch_size=GLOBAL_BATCH // world, shuffle=True, seed=3,
                          rank=rank, world_size=world, drop_last=True)
    sharded.set_epoch(1)
    x, y = next(iter(sharded))
    ddp = DistributedDataParallel(make_model())
    grads_ddp = one_step_grads(ddp, x, y)
    if rank == 0:
        whole = BatchLoader(data, train_idx, batch_size=GLOBAL_BATCH, shuffle=True, seed=3, drop_last=True)
        whole.set_epoch(1)
        xw, yw = next(iter(whole))
        grads_one = one_step_grads(make_model(), xw, yw)
        diffs = {n: float((grads_ddp[n] - grads_one[n]).abs().max()) for n in grads_one}
        assert grads_ddp.keys() == grads_one.keys()
        (out / "grads.json").write_text(json.dumps({
            "compared": len(diffs), "max_abs_diff": max(diffs.values()),
            "max_abs_grad": max(float(g.abs().max()) for g in grads_one.values()), "per_parameter": diffs,
            "per_parameter_max_abs_grad": {n: float(g.abs().max()) for n, g in grads_one.items()},
        }, indent=1))
    dist.barrier()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()
            if not isinstance(v, torch.nn.parameter.UninitializedParameter)}


def run_training(out: Path, rank: int) -> None:
    writes: list[str] = []
    built: list[torch.nn.Module] = []
    initial: dict[str, torch.Tensor] = {}
    real_create = eclsnn.models.create
    if rank != 0:  # record any attempt of rank 1 to write a file
        for name in ("save_checkpoint", "atomic_write_text", "atomic_write_json"):
            original = getattr(run_files, name)

            def spy(*args, _name=name, _original=original, **kwargs):
                writes.append(_name)
                return _original(*args, **kwargs)

            setattr(run_files, name, spy)

        def create_spy(*args, **kwargs):  # the network train() builds, and its state before training
            model = real_create(*args, **kwargs)
            if not built:
                built.append(model)
                initial.update(_state(model))
            return model

        eclsnn.models.create = create_spy
    cfg = load_config(None, {**DDP_RUN, "train.output": str(out / "runs")})
    try:
        run = train_mod.train(cfg)
    finally:
        eclsnn.models.create = real_create
    assert run == out / "runs" / "ddp"
    if rank != 0:
        if not writes:
            (out / "rank1-wrote-nothing").write_text("ok\n")
        assert built, "train() built no network through eclsnn.models.create; the spy saw nothing"
        save_file(initial, str(out / "rank1-initial.safetensors"))
        save_file(_state(built[0]), str(out / "rank1-final.safetensors"))


def main() -> None:
    out = Path(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    run_training(out, rank)  # train() sets up (and tears down) its own process group, as under the CLI
    # A second env:// group in the same torchrun processes can hang on the launcher's store, so the
    # gradient check meets through a file store instead.
    store = dist.FileStore(str(out / "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        check_gradients(out, rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
