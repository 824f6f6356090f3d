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
"""

from __future__ import annotations

import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eclsnn.io.checkpoint import build_model, load_checkpoint, load_weights
from eclsnn.config import Config
from eclsnn.errors import ConfigError, EclsnnError, TrainingError
from eclsnn.training.distributed import Dist, init_distributed, select_device
from eclsnn.training.resume import find_resume, restore
from eclsnn.training.run_files import (
    Progress,
    checkpoint_meta,
    default_run_name,
    run_folder,
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

__all__ = ["TrainingError", "train", "run_folder", "default_run_name", "parameter_groups", "lr_lambda", "schedule_factor"]


# --------------------------------------------------------------------------------------------------
# the trainer


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _uninitialised(model: nn.Module) -> bool:
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())


def _fmt_acc(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _fmt_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


class _Trainer:
    def __init__(self, cfg: Config, ddp: Dist):
        self.cfg = cfg
        self.ddp = ddp
        self.device = select_device(cfg, ddp)
        self.cuda = self.device.type == "cuda"
        self.run = run_folder(cfg)

    # ---- data ------------------------------------------------------------------------------------

    def _load(self, train: bool):
        from eclsnn.data import load_dataset

        d = self.cfg.data
        if d.download and self.ddp.enabled and not self.ddp.is_main:
            self.ddp.barrier()  # let rank 0 download first
            return load_dataset(d.dataset, train=train, data_dir=d.data_dir, download=False)
        data = load_dataset(d.dataset, train=train, data_dir=d.data_dir, download=d.download)
        if d.download and self.ddp.enabled:
            self.ddp.barrier()
        return data

    def _setup_data(self) -> None:
        from eclsnn.data import BatchLoader, split_train_val

        cfg, t = self.cfg, self.cfg.train
        if t.batch_size % self.ddp.world_size:
            raise ConfigError(
                f"train.batch_size = {t.batch_size} is the global batch and must be divisible by the "
                f"number of processes ({self.ddp.world_size}); choose a multiple of {self.ddp.world_size}"
            )
        self.train_set = self._load(train=True)
        self.info = self.train_set.info
        train_idx, val_idx = split_train_val(len(self.train_set), cfg.data.val_fraction, t.seed)
        if t.max_train_samples is not None and t.max_train_samples < len(train_idx):
            generator = torch.Generator().manual_seed(t.seed)
            keep = torch.randperm(len(train_idx), generator=generator)[: t.max_train_samples]
            train_idx = train_idx[keep.sort().values]
        self.train_idx, self.val_idx = train_idx, val_idx
        self.per_rank_batch = t.batch_size // self.ddp.world_size
        if len(train_idx) < t.batch_size:
            raise ConfigError(
                f"the training part has {len(train_idx)} samples, fewer than one batch of train.batch_size = "
                f"{t.batch_size}; lower the batch size or raise train.max_train_samples"
            )
        self.train_loader = BatchLoader(
            self.train_set, train_idx, batch_size=self.per_rank_batch, shuffle=True, augment=cfg.data.augment,
            seed=t.seed, drop_last=True, device=self.device, rank=self.ddp.rank, world_size=self.ddp.world_size,
        )
        self.val_loader = self._eval_loader(self.train_set, val_idx) if len(val_idx) else None

    def _eval_loader(self, dataset, indices: torch.Tensor):
        """This rank's share of an evaluation set: ``indices[rank::world_size]``, without the
        wrap-around padding of the training sharding, so the summed metrics count every sample once."""
        from eclsnn.data import BatchLoader

        mine = indices[self.ddp.rank :: self.ddp.world_size]
        if len(mine) == 0:
            return None
        return BatchLoader(dataset, mine, batch_size=self.cfg.evaluate.batch_size, shuffle=False,
                           augment=False, device=self.device)

    # ---- model -----------------------------------------------------------------------------------

    def _model_kwargs(self) -> dict[str, Any]:
        from eclsnn.models import MODEL_DEFAULTS

        m = self.cfg.model
        stem = m.stem
        if stem is None:  # pick the stem made for the data set's image size (e.g. ImageNet's 224 px)
            stems = (MODEL_DEFAULTS.get(m.arch) or {}).get("stems") or {}
            matching = [s for s, side in stems.items() if side == self.info.image_size]
            default = (MODEL_DEFAULTS.get(m.arch) or {}).get("stem")
            stem = default if default in matching or not matching else matching[0]
        return {
            "arch": m.arch, "num_classes": self.info.num_classes, "activation": m.activation, "levels": m.levels,
            "init_threshold": m.init_threshold, "per_channel": m.per_channel, "in_channels": self.info.channels,
            "pool": m.pool, "stem": stem, "dropout": m.dropout,
        }

    def _create(self, kwargs: dict[str, Any]) -> nn.Module:
        from eclsnn.models import create

        kwargs = dict(kwargs)
        return create(kwargs.pop("arch"), **kwargs)

    def _calibration_batches(self) -> list[torch.Tensor]:
        from eclsnn.data import BatchLoader

        t = self.cfg.train
        # The same batches on every rank (world_size=1 here), so every rank computes the same λ.
        loader = BatchLoader(self.train_set, self.train_idx, batch_size=min(t.batch_size, len(self.train_idx)),
                             shuffle=True, augment=False, seed=t.seed, device=self.device)
        loader.set_epoch(0)
        batches = []
        for x, _ in loader:
            batches.append(x)
            if len(batches) >= t.init_calibration_batches:
                break
        return batches

    def _init_from(self, model: nn.Module) -> None:
        from eclsnn.conversion.converter import prepare

        t = self.cfg.train
        ckpt = load_checkpoint(t.init_from)
        src = dict(ckpt.meta.get("model") or {})
        if src.get("arch") != self.model_kwargs["arch"]:
            raise ConfigError(
                f"train.init_from = {t.init_from} holds a {src.get('arch')!r} network but model.arch is "
                f"{self.model_kwargs['arch']!r}; set model.arch = {src.get('arch')!r}"
            )
        source = build_model(ckpt).to(self.device)
        if src.get("activation") == "clip":
            self.ddp.log(f"initialising from {ckpt.path} (a threshold-clip network: weights and λ as they are)")
            load_weights(model, {k: v for k, v in ckpt.state_dict.items()}, what=f"checkpoint {ckpt.path}")
            return
        m = self.cfg.model
        batches = self._calibration_batches()
        self.ddp.log(f"initialising from the ReLU network {ckpt.path}: λ = {t.init_percentile} percentile of "
                       f"each ReLU's output on {sum(len(b) for b in batches)} training images")
        prepared = prepare(source, levels=m.levels, calibration=batches, percentile=t.init_percentile,
                           per_channel=m.per_channel, init_threshold=m.init_threshold)
        load_weights(model, {k: v.detach().cpu() for k, v in prepared.state_dict().items()},
                     what=f"the prepared network from {ckpt.path}")

    def _setup_model(self) -> None:
        t = self.cfg.train
        self.model_kwargs = self._model_kwargs()
        model = self._create(self.model_kwargs)
        if _uninitialised(model):  # lazily shaped per-channel λ: one dry forward pass fixes the shapes
            size = self.info.image_size
            with torch.no_grad():
                model.eval()(torch.zeros(2, self.info.channels, size, size))
        if t.init_from and not self.resume_ckpt:
            self._init_from(model)
        model.to(self.device)
        if t.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model

        self.optimizer = build_optimizer(model, t)
        self.steps_per_epoch = len(self.train_loader)
        self.scheduler = build_scheduler(self.optimizer, self.steps_per_epoch, t)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
        self.loop = None
        if t.snn_epochs:
            from eclsnn.training.spiking_loop import SpikingLoop

            c = self.cfg.convert
            self.loop = SpikingLoop(model, t.snn_time_steps, neuron=c.neuron, v_init=c.v_init,
                                    theta_neg=c.theta_neg, maxpool=c.maxpool)

        self.amp = bool(t.amp and self.cuda)
        self.amp_dtype = torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)

        self.net = self.ddp.wrap(model, self.device)

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=self.amp_dtype)
        return nullcontext()

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.train.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    # ---- resume ----------------------------------------------------------------------------------

    def _restore(self) -> None:
        ckpt = self.resume_ckpt
        self.progress = restore(ckpt, self.resume_changes, self.cfg.train, self.model, self.optimizer, self.scheduler,
                                self.scaler, self.steps_per_epoch, self.device)
        self.ddp.log(f"resuming {self.run} after epoch {ckpt.meta['epoch']}")

    # ---- loops -----------------------------------------------------------------------------------

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        from tqdm.auto import tqdm

        t = self.cfg.train
        in_loop = in_the_loop(self.cfg.train, epoch)
        # With the SNN in the loop BatchNorm keeps its running statistics: the SNN folds those in.
        if in_loop:
            self.net.eval()
        else:
            self.net.train()
        self.train_loader.set_epoch(epoch)
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        lr = self.optimizer.param_groups[0]["lr"]
        bar = tqdm(self.train_loader, total=len(self.train_loader), desc=f"epoch {epoch}/{t.epochs}",
                   leave=False, dynamic_ncols=True, disable=not (t.progress and self.ddp.is_main))
        for step, (x, y) in enumerate(bar, 1):
            x = self._prepare_input(x)
            with self._autocast():
                out = self.loop(self.net, x) if in_loop else self.net(x)
            loss = self.criterion(out.float(), y)
            finite = torch.isfinite(loss.detach()).to(torch.float32)
            self.ddp.all_min(finite)
            if not bool(finite.item()):
                raise TrainingError(
                    f"the loss became {loss.item()} at epoch {epoch}, step {step} of {len(self.train_loader)} "
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
            if bar.disable is False and (step % 20 == 0 or step == len(self.train_loader)):
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

    @torch.no_grad()
    def _evaluate_snn(self, loader) -> float | None:
        """Accuracy of the converted SNN at train.snn_time_steps over an evaluation set split across ranks."""
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)  # correct, count
        self.model.eval()
        if loader is not None:
            snn = self.loop.network()
            for x, y in loader:
                out = snn.run(x, self.loop.time_steps).mean(0)
                stats += torch.stack([(out.argmax(1) == y).sum().double(),
                                      torch.tensor(float(y.shape[0]), dtype=torch.float64, device=self.device)])
        self.ddp.all_reduce(stats)
        return None if stats[1] == 0 else float(stats[0] / stats[1])

    @torch.no_grad()
    def _evaluate(self, loader) -> tuple[float | None, float | None]:
        """Loss and accuracy over an evaluation set split across ranks (None if it is empty)."""
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.model.eval()  # the bare module: no DDP collectives, ranks may have different batch counts
        if loader is not None:
            for x, y in loader:
                with self._autocast():
                    out = self.model(self._prepare_input(x))
                loss = nn.functional.cross_entropy(out.float(), y, reduction="sum")
                stats += torch.stack([loss.double(), (out.argmax(1) == y).sum().double(),
                                      torch.tensor(float(y.shape[0]), dtype=torch.float64, device=self.device)])
        self.ddp.all_reduce(stats)
        if stats[2] == 0:
            return None, None
        return float(stats[0] / stats[2]), float(stats[1] / stats[2])

    # ---- files ----------------------------------------------------------------------------------

    def _save(self, epoch: int, metrics: dict[str, Any], is_best: bool) -> None:
        self.ddp.barrier()
        if self.ddp.is_main:
            meta = checkpoint_meta(self.cfg, self.run, self.model_kwargs, self.info, self.ddp.world_size, epoch,
                                   metrics, self.progress)
            save_epoch(self.run, self.model, self.optimizer, self.scheduler, self.scaler, meta, self.progress, is_best)
        self.ddp.barrier()

    # ---- main ------------------------------------------------------------------------------------

    def run_training(self) -> Path:
        cfg, t = self.cfg, self.cfg.train
        _seed_everything(t.seed)
        self.progress = Progress()

        self.resume_ckpt, self.resume_changes = find_resume(cfg, self.run, self.ddp)
        self._setup_data()
        self._setup_model()
        if self.ddp.is_main:
            write_config(self.run, cfg)
        if self.resume_ckpt is not None:
            self._restore()
            if self.ddp.is_main:
                write_metrics(self.run, self.progress.history)  # drop lines of epochs after the checkpoint (a kill in between)

        procs = f"{self.ddp.world_size} processes" if self.ddp.enabled else "1 process"
        self.ddp.log((
            f"training {self.model_kwargs['arch']} ({cfg.model.activation}, L={cfg.model.levels}) on "
            f"{self.info.name}: {len(self.train_idx)} training / {len(self.val_idx)} validation images, "
            f"{self.steps_per_epoch} steps of {t.batch_size} per epoch, {procs} on {self.device}"
            f"{', AMP ' + str(self.amp_dtype).replace('torch.', '') if self.amp else ''}; run folder {self.run}"
        ))

        progress = self.progress
        for epoch in range(progress.start_epoch, t.epochs + 1):
            started = time.perf_counter()
            metrics: dict[str, Any] = {"epoch": epoch}
            metrics.update(self._train_epoch(epoch))
            val_loss, val_acc = self._evaluate(self.val_loader)
            metrics.update(val_loss=val_loss, val_acc=val_acc)
            score = val_acc
            if t.snn_epochs:  # choose among the in-the-loop epochs, by the SNN's accuracy
                score = self._evaluate_snn(self.val_loader) if in_the_loop(self.cfg.train, epoch) else None
                if in_the_loop(self.cfg.train, epoch):
                    metrics.update(val_snn_acc=score, snn_time_steps=t.snn_time_steps)
            metrics["seconds"] = round(time.perf_counter() - started, 3)
            is_best = score is not None and (progress.best_val_acc is None or score > progress.best_val_acc)
            if is_best:
                progress.best_epoch, progress.best_val_acc = epoch, val_acc
            progress.history.append(metrics)
            self._save(epoch, metrics, is_best)
            self.ddp.log((
                f"epoch {epoch}/{t.epochs}  train loss {_fmt_loss(metrics['train_loss'])} acc "
                f"{_fmt_acc(metrics['train_acc'])}  val loss {_fmt_loss(val_loss)} acc {_fmt_acc(val_acc)}"
                + (f"  SNN(T={t.snn_time_steps}) val acc {_fmt_acc(metrics['val_snn_acc'])}" if "val_snn_acc" in metrics else "")
                + f"{' (best)' if is_best else ''}  lr {metrics['lr']:.4g}  {metrics['seconds']:.1f}s"
            ))

        summary = run_summary(self.run, t, progress)
        final = None
        if t.eval_test:
            test_set = self._load(train=False)
            limit = cfg.evaluate.max_samples or len(test_set)  # the first N, as in `eclsnn evaluate`
            test_loss, test_acc = self._evaluate(self._eval_loader(test_set, torch.arange(min(limit, len(test_set)))))
            final = {"epoch": t.epochs, "split": "test", "checkpoint": "last", "test_loss": test_loss,
                     "test_acc": test_acc, "test_samples": min(limit, len(test_set))}
            summary.update(test_loss=test_loss, test_acc=test_acc)
            self.ddp.log(f"test accuracy of the final model (checkpoints/last): {_fmt_acc(test_acc)} "
                           f"(reported only; model selection uses the validation split)")
        if self.ddp.is_main:
            write_metrics(self.run, progress.history, final)
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
        return trainer.run_training()
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        ddp.close()
