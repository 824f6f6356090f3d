"""Training loop: SGD with momentum, cosine schedule, validation split, crash-safe checkpoints, DDP.

:func:`train` takes a :class:`~eclsnn.config.Config` and returns the run folder::

    <output>/<run_name>/
        config.json             the settings of the (latest) start of the run
        metrics.jsonl           one JSON object per epoch (epoch, train_loss, train_acc, val_loss, val_acc,
                                lr = the learning rate of the epoch's first step, seconds), then one
                                with the test accuracy of the final model
        summary.json            best epoch, final and test accuracy
        checkpoints/last/       after every epoch (see eclsnn.io.checkpoint)
        checkpoints/best/       the epoch with the best validation accuracy

Reproducibility: every random choice derives from ``train.seed`` — the validation split and the
training subset (seeded generators), the data order and augmentation (``(seed, epoch)`` in
:class:`~eclsnn.data.BatchLoader`), the initial weights and dropout (the global torch RNG, saved in
every checkpoint). On the CPU deterministic algorithms are enforced, so the same seed gives
bit-identical weights and metrics, and ``resume`` continues a run exactly where an uninterrupted one
would be. Under torchrun all ranks share the global RNG state (DDP also broadcasts rank 0's weights),
so a checkpoint written by rank 0 resumes every rank.

Distributed: launched by ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in
DistributedDataParallel (gloo on the CPU, NCCL on CUDA), each rank gets ``batch_size / world_size``
samples of every global batch, metrics are summed over ranks, and only rank 0 writes files and prints.
BatchNorm normalises with each rank's own batch statistics (SyncBatchNorm is CUDA-only in PyTorch), as
in torchvision's reference scripts without ``--sync-bn``; rank 0's running statistics are the ones
evaluated and saved. Checkpoints record the global RNG state of rank 0 only, which is why all ranks
share it.

The pieces live beside this module: :mod:`~eclsnn.training.setup` (seeds, data split, loaders, model,
``init_from``), :mod:`~eclsnn.training.schedule` (optimizer and learning-rate schedule),
:mod:`~eclsnn.training.resume` (the resume policy and restoring a checkpoint),
:mod:`~eclsnn.training.distributed` (torchrun, devices, collectives), :mod:`~eclsnn.training.precision`
(AMP, channels_last), :mod:`~eclsnn.training.evaluation` (ANN and SNN scoring) and
:mod:`~eclsnn.training.run_files` (the files above). This module runs the epochs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eclsnn.config import Config, TrainConfig
from eclsnn.errors import ConfigError, EclsnnError, TrainingError  # noqa: F401  (importable from here, as before)
from eclsnn.training.distributed import Dist, init_distributed, select_device
from eclsnn.training.evaluation import evaluate, evaluate_snn
from eclsnn.training.precision import Precision
from eclsnn.training.resume import find_resume, restore
from eclsnn.training.run_files import (
    Progress,
    checkpoint_meta,
    default_run_name,
    run_folder,
    run_lock,
    run_summary,
    save_epoch,
    write_config,
    write_metrics,
    write_summary,
)
from eclsnn.training.schedule import (
    build_optimizer,
    build_scheduler,
    in_the_loop,
    lr_lambda,
    parameter_groups,
    schedule_factor,
)
from eclsnn.training.setup import eval_loader, load_data, make_model, model_kwargs, seed_everything, setup_data

__all__ = ["TrainingError", "train", "run_folder", "default_run_name", "parameter_groups", "lr_lambda", "schedule_factor"]


def _fmt_acc(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _fmt_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _epoch_line(epoch: int, t: TrainConfig, metrics: dict[str, Any], is_best: bool) -> str:
    """The line printed after an epoch."""
    m = metrics
    snn = f"  SNN(T={t.snn_time_steps}) val acc {_fmt_acc(m['val_snn_acc'])}" if "val_snn_acc" in m else ""
    return (
        f"epoch {epoch}/{t.epochs}  train loss {_fmt_loss(m['train_loss'])} acc {_fmt_acc(m['train_acc'])}  "
        f"val loss {_fmt_loss(m['val_loss'])} acc {_fmt_acc(m['val_acc'])}"
        + snn + f"{' (best)' if is_best else ''}  lr {m['lr']:.4g}  {m['seconds']:.1f}s"
    )


class _Trainer:
    """One run of :func:`train`: set-up, the epochs, the files of rank 0. The pieces it calls live in
    the modules named in this module's docstring; what is left is the loop itself (set-up order,
    training step, NaN checks, SNN-in-the-loop epochs, best-epoch choice), one state shared by all of
    it, which is why it is a class."""

    def __init__(self, cfg: Config, ddp: Dist):
        self.cfg = cfg
        self.ddp = ddp
        self.device = select_device(cfg, ddp)
        self.cuda = self.device.type == "cuda"
        self.run = run_folder(cfg)

    def _setup(self) -> None:
        """Data, model, optimizer and schedule, loss, the SNN in the loop, AMP and DDP (in this order:
        the model's initial weights draw from the global RNG)."""
        cfg, t = self.cfg, self.cfg.train
        self.data = setup_data(cfg, self.ddp, self.device)
        self.model_kwargs = model_kwargs(cfg, self.data.info)
        self.model = model = make_model(cfg, self.ddp, self.device, self.data, self.model_kwargs,
                                        resuming=self.resume_ckpt is not None)
        self.optimizer = build_optimizer(model, t)
        self.steps_per_epoch = len(self.data.train_loader)
        self.scheduler = build_scheduler(self.optimizer, self.steps_per_epoch, t)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
        self.loop = None
        if t.snn_epochs:
            from eclsnn.training.spiking_loop import SpikingLoop

            c = cfg.convert
            self.loop = SpikingLoop(model, t.snn_time_steps, neuron=c.neuron, v_init=c.v_init,
                                    theta_neg=c.theta_neg, maxpool=c.maxpool)
        self.precision = Precision.from_config(t, self.cuda)
        self.scaler = self.precision.scaler
        self.net = self.ddp.wrap(model, self.device)

    def _restore(self) -> None:
        ckpt = self.resume_ckpt
        self.progress = restore(ckpt, self.resume_changes, self.cfg.train, self.model, self.optimizer, self.scheduler,
                                self.scaler, self.steps_per_epoch, self.device)
        self.ddp.log(f"resuming {self.run} after epoch {ckpt.meta['epoch']}")

    # ---- loops -----------------------------------------------------------------------------------

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        from tqdm.auto import tqdm

        t, loader, precision = self.cfg.train, self.data.train_loader, self.precision
        in_loop = in_the_loop(t, epoch)
        # With the SNN in the loop BatchNorm keeps its running statistics: the SNN folds those in.
        if in_loop:
            self.net.eval()
        else:
            self.net.train()
        loader.set_epoch(epoch)
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        lr = self.optimizer.param_groups[0]["lr"]
        bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch}/{t.epochs}",
                   leave=False, dynamic_ncols=True, disable=not (t.progress and self.ddp.is_main))
        for step, (x, y) in enumerate(bar, 1):
            x = precision.prepare_input(x)
            with precision.autocast():
                out = self.loop(self.net, x) if in_loop else self.net(x)
            loss = self.criterion(out.float(), y)
            finite = torch.isfinite(loss.detach()).to(torch.float32)
            self.ddp.all_min(finite)
            if not bool(finite.item()):
                raise TrainingError(
                    f"the loss became {loss.item()} at epoch {epoch}, step {step} of {len(loader)} "
                    f"(learning rate {self.optimizer.param_groups[0]['lr']:.4g}); lower train.lr or add "
                    f"train.warmup_epochs and resume (train.resume = true, --resume). {self.progress.last_good(self.run)}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            with torch.no_grad():
                n = y.shape[0]
                stats += torch.stack([loss.detach().double() * n, (out.argmax(1) == y).sum().double(),
                                      torch.tensor(float(n), dtype=torch.float64, device=self.device)])
            if bar.disable is False and (step % 20 == 0 or step == len(loader)):
                bar.set_postfix(loss=f"{float(stats[0] / stats[2]):.4f}", acc=f"{float(stats[1] / stats[2]):.3f}")
        bar.close()
        self.ddp.all_reduce(stats)
        # DDP broadcasts rank 0's buffers at the start of each forward, then every rank updates its
        # BatchNorm running statistics with its own half batch; make rank 0's the ones every rank
        # evaluates with (they are the ones saved in the checkpoint).
        self.ddp.broadcast_buffers(self.model)
        for name, p in self.model.named_parameters():
            if not torch.isfinite(p).all():
                raise TrainingError(
                    f"parameter {name} became non-finite during epoch {epoch}; lower train.lr and resume. "
                    + self.progress.last_good(self.run)
                )
        return {"train_loss": float(stats[0] / stats[2]), "train_acc": float(stats[1] / stats[2]), "lr": lr}

    def _epoch(self, epoch: int) -> None:
        """Train one epoch, score it, keep it if it is the best, save and report it."""
        t, progress = self.cfg.train, self.progress
        started = time.perf_counter()
        metrics: dict[str, Any] = {"epoch": epoch}
        metrics.update(self._train_epoch(epoch))
        val_loss, val_acc = evaluate(self.model, self.data.val_loader, self.ddp, self.device, self.precision)
        metrics.update(val_loss=val_loss, val_acc=val_acc)
        score = val_acc
        if t.snn_epochs:  # choose among the in-the-loop epochs, by the SNN's accuracy
            score = (evaluate_snn(self.model, self.loop, self.data.val_loader, self.ddp, self.device)
                     if in_the_loop(t, epoch) else None)
            if in_the_loop(t, epoch):
                metrics.update(val_snn_acc=score, snn_time_steps=t.snn_time_steps)
        metrics["seconds"] = round(time.perf_counter() - started, 3)
        is_best = score is not None and (progress.best_val_acc is None or score > progress.best_val_acc)
        if is_best:
            progress.best_epoch, progress.best_val_acc = epoch, val_acc
        progress.history.append(metrics)
        self._save(epoch, metrics, is_best)
        self.ddp.log(_epoch_line(epoch, t, metrics, is_best))

    def _save(self, epoch: int, metrics: dict[str, Any], is_best: bool) -> None:
        self.ddp.barrier()
        if self.ddp.is_main:
            meta = checkpoint_meta(self.cfg, self.run, self.model_kwargs, self.data.info, self.ddp.world_size, epoch,
                                   metrics, self.progress)
            save_epoch(self.run, self.model, self.optimizer, self.scheduler, self.scaler, meta, self.progress, is_best)
        self.ddp.barrier()

    def _test(self) -> dict[str, Any]:
        """The final model on the test set (the first evaluate.max_samples, as in `eclsnn evaluate`)."""
        cfg = self.cfg
        test_set = load_data(cfg, self.ddp, train=False)
        limit = cfg.evaluate.max_samples or len(test_set)  # the first N, as in `eclsnn evaluate`
        loader = eval_loader(test_set, torch.arange(min(limit, len(test_set))), cfg, self.ddp, self.device)
        test_loss, test_acc = evaluate(self.model, loader, self.ddp, self.device, self.precision)
        self.ddp.log(f"test accuracy of the final model (checkpoints/last): {_fmt_acc(test_acc)} "
                     f"(reported only; model selection uses the validation split)")
        return {"epoch": cfg.train.epochs, "split": "test", "checkpoint": "last", "test_loss": test_loss,
                "test_acc": test_acc, "test_samples": min(limit, len(test_set))}

    # ---- main ------------------------------------------------------------------------------------

    def run_training(self) -> Path:
        cfg, t = self.cfg, self.cfg.train
        seed_everything(t.seed)
        self.progress = Progress()

        self.resume_ckpt, self.resume_changes = find_resume(cfg, self.run, self.ddp)
        self._setup()
        if self.ddp.is_main:
            write_config(self.run, cfg)
        if self.resume_ckpt is not None:
            self._restore()
            if self.ddp.is_main:
                # drop lines of epochs after the checkpoint (a kill in between)
                write_metrics(self.run, self.progress.history)

        procs = f"{self.ddp.world_size} processes" if self.ddp.enabled else "1 process"
        self.ddp.log((
            f"training {self.model_kwargs['arch']} ({cfg.model.activation}, L={cfg.model.levels}) on "
            f"{self.data.info.name}: {len(self.data.train_idx)} training / {len(self.data.val_idx)} validation images, "
            f"{self.steps_per_epoch} steps of {t.batch_size} per epoch, {procs} on {self.device}"
            f"{self.precision.describe()}; run folder {self.run}"
        ))
        for epoch in range(self.progress.start_epoch, t.epochs + 1):
            self._epoch(epoch)

        summary = run_summary(self.run, t, self.progress)
        final = None
        if t.eval_test:
            final = self._test()
            summary.update(test_loss=final["test_loss"], test_acc=final["test_acc"])
        if self.ddp.is_main:
            write_metrics(self.run, self.progress.history, final)
            write_summary(self.run, summary)
        self.ddp.barrier()
        return self.run


def train(cfg: Config) -> Path:
    """Train the network described by `cfg` and return the run folder (see the module docstring).

    Works in one process and under ``torchrun`` (one process per device). Raises
    :class:`TrainingError` on a non-finite loss (the last good checkpoint stays intact),
    :class:`~eclsnn.errors.ConfigError` on settings that cannot work (e.g. a global batch not divisible
    by the number of processes, or an existing run without ``resume``).
    """
    ddp = init_distributed(cfg)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        trainer = _Trainer(cfg, ddp)
        if trainer.cuda:
            torch.backends.cudnn.benchmark = True
        else:
            torch.use_deterministic_algorithms(True, warn_only=True)
        with run_lock(trainer.run, enabled=ddp.is_main):
            return trainer.run_training()
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        ddp.close()
