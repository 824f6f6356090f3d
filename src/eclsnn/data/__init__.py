"""Data layer: find, read and batch the image data sets (Fashion-MNIST, CIFAR-10/100, ImageNet).

Nothing is downloaded unless asked (`download=True`), and nothing heavy is imported at import time.
Search order for files: `data_dir`, then ``$ECLSNN_DATA``, then the download cache (and, for
Fashion-MNIST, the Debian package's ``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import os

from .cifar import load_cifar
from .fashion_mnist import load_fashion_mnist
from .imagefolder import ImageFolderDataset, load_imagenet
from .info import DATASETS, DatasetInfo, ImageTensors, infer_info_from_tensors, normalize, resolve_name
from .loader import BatchLoader, split_train_val
from .paths import ENV_VAR, default_cache_dir

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "ImageTensors",
    "ImageFolderDataset",
    "BatchLoader",
    "load_dataset",
    "split_train_val",
    "normalize",
    "infer_info_from_tensors",
    "ENV_VAR",
    "default_cache_dir",
]


def load_dataset(
    name: str,
    train: bool,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> ImageTensors | ImageFolderDataset:
    """Load the training (`train=True`) or test split of a data set named in `DATASETS`.

    Fashion-MNIST and CIFAR come back in memory as `ImageTensors`; ImageNet as a lazy
    `ImageFolderDataset` (its "test" split is the official validation set). `download=True` fetches
    missing files from the official host into `data_dir` (else ``$ECLSNN_DATA``, else the cache).
    """
    key = resolve_name(name)
    if key == "fashion-mnist":
        return load_fashion_mnist(train, data_dir, download_missing=download)
    if key in ("cifar10", "cifar100"):
        return load_cifar(key, train, data_dir, download_missing=download)
    return load_imagenet(train, data_dir, download_missing=download)
