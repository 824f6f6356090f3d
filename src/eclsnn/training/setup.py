"""What a run starts from: the seeds, the data and the model.

The data: the training set, the seeded validation split and training subset, and each rank's
loaders (:func:`setup_data`, :func:`eval_loader`). The model: its constructor arguments from the
config and the data set (:func:`model_kwargs`), the model itself with any lazily shaped λ fixed, and
``train.init_from`` — a threshold-clip checkpoint's weights as they are, or a ReLU network prepared
with λ from activation percentiles (:func:`make_model`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from eclsnn.config import Config
from eclsnn.errors import ConfigError
from eclsnn.io.checkpoint import build_model, load_checkpoint, load_weights
from eclsnn.training.distributed import Dist

__all__ = ["seed_everything", "RunData", "load_data", "setup_data", "eval_loader", "model_kwargs", "make_model"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


# ---- data ----------------------------------------------------------------------------------------


@dataclass
class RunData:
    """The training set, its split into training and validation indices, and this rank's loaders."""

    train_set: Any
    info: Any  # the data set's DatasetInfo
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    train_loader: Any
    val_loader: Any | None


def load_data(cfg: Config, ddp: Dist, train: bool):
    """The training (``train``) or test set; with ``data.download`` rank 0 downloads first."""
    from eclsnn.data import load_dataset

    d = cfg.data
    if d.download and ddp.enabled and not ddp.is_main:
        ddp.barrier()  # let rank 0 download first
        return load_dataset(d.dataset, train=train, data_dir=d.data_dir, download=False)
    data = load_dataset(d.dataset, train=train, data_dir=d.data_dir, download=d.download)
    if d.download and ddp.enabled:
        ddp.barrier()
    return data


def setup_data(cfg: Config, ddp: Dist, device: torch.device) -> RunData:
    from eclsnn.data import BatchLoader, split_train_val

    t = cfg.train
    if t.batch_size % ddp.world_size:
        raise ConfigError(
            f"train.batch_size = {t.batch_size} is the global batch and must be divisible by the "
            f"number of processes ({ddp.world_size}); choose a multiple of {ddp.world_size}"
        )
    train_set = load_data(cfg, ddp, train=True)
    train_idx, val_idx = split_train_val(len(train_set), cfg.data.val_fraction, t.seed)
    if t.max_train_samples is not None and t.max_train_samples < len(train_idx):
        generator = torch.Generator().manual_seed(t.seed)
        keep = torch.randperm(len(train_idx), generator=generator)[: t.max_train_samples]
        train_idx = train_idx[keep.sort().values]
    per_rank_batch = t.batch_size // ddp.world_size
    if len(train_idx) < t.batch_size:
        raise ConfigError(
            f"the training part has {len(train_idx)} samples, fewer than one batch of train.batch_size = "
            f"{t.batch_size}; lower the batch size or raise train.max_train_samples"
        )
    train_loader = BatchLoader(
        train_set, train_idx, batch_size=per_rank_batch, shuffle=True, augment=cfg.data.augment,
        seed=t.seed, drop_last=True, device=device, rank=ddp.rank, world_size=ddp.world_size,
    )
    val_loader = eval_loader(train_set, val_idx, cfg, ddp, device) if len(val_idx) else None
    return RunData(train_set, train_set.info, train_idx, val_idx, train_loader, val_loader)


def eval_loader(dataset, indices: torch.Tensor, cfg: Config, ddp: Dist, device: torch.device):
    """This rank's share of an evaluation set: ``indices[rank::world_size]``, without the
    wrap-around padding of the training sharding, so the summed metrics count every sample once."""
    from eclsnn.data import BatchLoader

    mine = indices[ddp.rank :: ddp.world_size]
    if len(mine) == 0:
        return None
    return BatchLoader(dataset, mine, batch_size=cfg.evaluate.batch_size, shuffle=False,
                       augment=False, device=device)


# ---- model ---------------------------------------------------------------------------------------


def model_kwargs(cfg: Config, info) -> dict[str, Any]:
    """The keyword arguments of :func:`eclsnn.models.create` (with ``arch``), as checkpoints record them."""
    from eclsnn.models import MODEL_DEFAULTS

    m = cfg.model
    stem = m.stem
    if stem is None:  # pick the stem made for the data set's image size (e.g. ImageNet's 224 px)
        stems = (MODEL_DEFAULTS.get(m.arch) or {}).get("stems") or {}
        matching = [s for s, side in stems.items() if side == info.image_size]
        default = (MODEL_DEFAULTS.get(m.arch) or {}).get("stem")
        stem = default if default in matching or not matching else matching[0]
    return {
        "arch": m.arch, "num_classes": info.num_classes, "activation": m.activation, "levels": m.levels,
        "init_threshold": m.init_threshold, "per_channel": m.per_channel, "in_channels": info.channels,
        "pool": m.pool, "stem": stem, "dropout": m.dropout, **({"width": m.width} if m.width != 1.0 else {}),
    }


def make_model(cfg: Config, ddp: Dist, device: torch.device, data: RunData, kwargs: dict[str, Any],
               resuming: bool) -> nn.Module:
    """The model of ``kwargs`` on ``device`` (channels_last if set), started from ``train.init_from``
    unless the run resumes (its checkpoint then brings the weights)."""
    from eclsnn.models import create

    t = cfg.train
    args = dict(kwargs)
    model = create(args.pop("arch"), **args)
    if _uninitialised(model):  # lazily shaped per-channel λ: one dry forward pass fixes the shapes
        size = data.info.image_size
        with torch.no_grad():
            model.eval()(torch.zeros(2, data.info.channels, size, size))
    if t.init_from and not resuming:
        _init_from(model, cfg, ddp, device, data, kwargs["arch"])
    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _uninitialised(model: nn.Module) -> bool:
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())


def _calibration_batches(cfg: Config, data: RunData, device: torch.device) -> list[torch.Tensor]:
    from eclsnn.data import BatchLoader

    t = cfg.train
    # The same batches on every rank (world_size=1 here), so every rank computes the same λ.
    loader = BatchLoader(data.train_set, data.train_idx, batch_size=min(t.batch_size, len(data.train_idx)),
                         shuffle=True, augment=False, seed=t.seed, device=device)
    loader.set_epoch(0)
    batches = []
    for x, _ in loader:
        batches.append(x)
        if len(batches) >= t.init_calibration_batches:
            break
    return batches


def _init_from(model: nn.Module, cfg: Config, ddp: Dist, device: torch.device, data: RunData, arch: str) -> None:
    from eclsnn.conversion.converter import prepare

    t = cfg.train
    ckpt = load_checkpoint(t.init_from)
    src = dict(ckpt.meta.get("model") or {})
    if src.get("arch") != arch:
        raise ConfigError(
            f"train.init_from = {t.init_from} holds a {src.get('arch')!r} network but model.arch is "
            f"{arch!r}; set model.arch = {src.get('arch')!r}"
        )
    source = build_model(ckpt).to(device)
    if src.get("activation") == "clip":
        ddp.log(f"initialising from {ckpt.path} (a threshold-clip network: weights and λ as they are)")
        load_weights(model, {k: v for k, v in ckpt.state_dict.items()}, what=f"checkpoint {ckpt.path}")
        return
    m = cfg.model
    batches = _calibration_batches(cfg, data, device)
    ddp.log(f"initialising from the ReLU network {ckpt.path}: λ = {t.init_percentile} percentile of "
            f"each ReLU's output on {sum(len(b) for b in batches)} training images")
    prepared = prepare(source, levels=m.levels, calibration=batches, percentile=t.init_percentile,
                       per_channel=m.per_channel, init_threshold=m.init_threshold)
    load_weights(model, {k: v.detach().cpu() for k, v in prepared.state_dict().items()},
                 what=f"the prepared network from {ckpt.path}")
