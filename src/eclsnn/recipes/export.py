"""``eclsnn export``: a checkpoint (converted by its settings) or a saved SNN folder, written as npz,
JSON (docs/EXPORT.md) or NIR (docs/NIR.md)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from eclsnn.data import DATASETS, resolve_name
from eclsnn.io.checkpoint import Checkpoint
from eclsnn.io.export import export_json, export_npz
from eclsnn.recipes.common import check_output, is_snn_folder, load_ann, load_snn
from eclsnn.recipes.settings import layered_config
from eclsnn.recipes.conversion import convert_checkpoint

__all__ = ["run_export", "sample_input", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("npz", "json", "nir")


def sample_input(ckpt: Checkpoint) -> torch.Tensor:
    """A zero input batch of one image of the shape the checkpoint was trained on (NIR export needs the
    layer shapes)."""
    data = ckpt.meta.get("dataset") or {}
    if not data.get("channels"):
        name = ((ckpt.meta.get("config") or {}).get("data") or {}).get("dataset", "fashion-mnist")
        info = DATASETS[resolve_name(name)]
        data = {"channels": info.channels, "image_size": info.image_size}
    size = int(data["image_size"])
    return torch.zeros(1, int(data["channels"]), size, size)


def run_export(checkpoint: str | os.PathLike, fmt: str = "npz", output: str | os.PathLike | None = None,
               overrides: dict[str, Any] | None = None, config_path: str | os.PathLike | None = None,
               nir_neurons: str = "exact"):
    """Write the SNN of ``checkpoint`` as ``fmt`` to ``output`` (default ``RUN/snn.<fmt>``). Returns
    ``(path, snn, notes)``: for NIR, the messages of what lives only in its metadata (other warnings
    are shown as usual)."""
    if output is not None:
        check_output(output)
    if is_snn_folder(checkpoint):
        snn, _, ckpt, _ = load_snn(checkpoint)
    else:
        model, ckpt = load_ann(checkpoint)
        cfg = layered_config(overrides, config_path, ckpt.meta.get("config"))
        snn = convert_checkpoint(model, ckpt, cfg)[cfg.convert.neuron]
    out = check_output(Path(output) if output else ckpt.path.parent.parent / f"snn.{fmt}")
    notes: list[str] = []
    if fmt == "nir":
        from eclsnn.io.nir import NIRExportWarning, write_nir

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NIRExportWarning)
            write_nir(snn, out, sample_input(ckpt), neurons=nir_neurons)
        for w in caught:
            if issubclass(w.category, NIRExportWarning):
                notes.append(str(w.message))
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    else:
        (export_npz if fmt == "npz" else export_json)(snn, out)
    return out, snn, notes
