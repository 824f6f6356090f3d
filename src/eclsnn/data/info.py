"""What a data set is: a frozen description (`DatasetInfo`) and an in-memory image set (`ImageTensors`).

The description is kept apart from the pixels so that models, the converter and the command line can
ask "how many classes, what input shape, which normalisation" without loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eclsnn import limits
from eclsnn.errors import DataError


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about an image classification data set.

    `image_size` is the side of the square the network sees in training (the crop side for ImageNet).
    `mean`/`std` are per channel, in [0, 1] pixel units, so ``(x / 255 - mean) / std`` normalises.
    `crop_padding` is the zero padding of the standard random-crop augmentation (0 = no padded crop).
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    hflip: bool

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError(
                f"data set {self.name!r}: mean and std need one value per channel "
                f"({self.channels}), got {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise DataError(f"data set {self.name!r}: every std must be positive, got {self.std}")
        if self.num_classes < 1 or self.image_size < 1 or self.crop_padding < 0:
            raise DataError(
                f"data set {self.name!r}: num_classes and image_size must be >= 1 and crop_padding >= 0"
            )


# Normalisation constants are the per-channel statistics of each training set (the values every
# public training script uses). Crop paddings are the usual ones: 4 px on 32 px CIFAR, 2 px on 28 px
# Fashion-MNIST (same ~1/8 of the side); ImageNet gets its crop from random-resized cropping instead.
# Flips: garments, CIFAR objects and ImageNet photos are all left/right symmetric as classes.
DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist", num_classes=10, channels=1, image_size=28,
        mean=(0.2860,), std=(0.3530,), crop_padding=2, hflip=True,
    ),
    "cifar10": DatasetInfo(
        name="cifar10", num_classes=10, channels=3, image_size=32,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), crop_padding=4, hflip=True,
    ),
    "cifar100": DatasetInfo(
        name="cifar100", num_classes=100, channels=3, image_size=32,
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), crop_padding=4, hflip=True,
    ),
    "imagenet": DatasetInfo(
        name="imagenet", num_classes=1000, channels=3, image_size=224,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_padding=0, hflip=True,
    ),
}

_ALIASES = {
    "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "cifar-10": "cifar10", "cifar_10": "cifar10",
    "cifar-100": "cifar100", "cifar_100": "cifar100",
    "ilsvrc2012": "imagenet", "imagenet-1k": "imagenet", "imagenet1k": "imagenet",
}


def resolve_name(name: str) -> str:
    """Map a user-typed data set name (any case, common aliases) to its key in `DATASETS`."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    return key


@dataclass
class ImageTensors:
    """A whole image data set in memory: uint8 images [N, C, H, W] and int64 labels [N].

    Pixels stay uint8 (4x smaller than float) and are converted per batch on the target device.
    """

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"{self.info.name}: images must be a uint8 tensor [N, C, H, W], "
                f"got {self.images.dtype} with shape {tuple(self.images.shape)}"
            )
        if self.images.shape[1] != self.info.channels:
            raise DataError(
                f"{self.info.name}: images have {self.images.shape[1]} channels, "
                f"the data set description says {self.info.channels}"
            )
        if self.labels.dim() != 1 or self.labels.dtype.is_floating_point or self.labels.dtype == torch.bool:
            raise DataError(f"{self.info.name}: labels must be a 1-D integer tensor, got {self.labels.dtype}")
        self.labels = self.labels.to(torch.int64)
        if len(self.labels) != len(self.images):
            raise DataError(
                f"{self.info.name}: {len(self.images)} images but {len(self.labels)} labels; the files do not match"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])


def normalization_affine(info: DatasetInfo, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [1, C, 1, 1] float32 with ``x * scale + shift == (x / 255 - mean) / std``.

    Folding the two steps into one multiply-add touches each batch once; computed in float64 first so
    the float32 constants are the correctly rounded ones.
    """
    mean = torch.tensor(info.mean, dtype=torch.float64)
    std = torch.tensor(info.std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std)).to(torch.float32).view(1, -1, 1, 1)
    shift = (-mean / std).to(torch.float32).view(1, -1, 1, 1)
    return scale.to(device), shift.to(device)


def normalize(x_uint8: torch.Tensor, info: DatasetInfo,
              affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 pixels [B, C, H, W] -> float32 ``(x / 255 - mean) / std``, on the device of `x_uint8`.

    `affine` is `normalization_affine(info, x_uint8.device)`, passed by callers that normalise many batches.
    """
    if x_uint8.dim() != 4 or x_uint8.shape[1] != info.channels:
        raise DataError(
            f"{info.name}: expected a batch [B, {info.channels}, H, W], got shape {tuple(x_uint8.shape)}"
        )
    scale, shift = affine if affine is not None else normalization_affine(info, x_uint8.device)
    return torch.addcmul(shift, x_uint8.to(torch.float32), scale)


def infer_info_from_tensors(
    images: torch.Tensor,
    labels: torch.Tensor,
    name: str = "custom",
    crop_padding: int = 0,
    hflip: bool = False,
) -> DatasetInfo:
    """Describe a user-supplied uint8 image set: classes from the labels, mean/std from the pixels.

    Augmentation defaults to off because nothing is known about the images' symmetries.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] == 0:
        raise DataError(f"{name}: images must be a non-empty uint8 tensor [N, C, H, W]")
    if labels.dim() != 1 or len(labels) != len(images):
        raise DataError(f"{name}: labels must be 1-D with one label per image")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DataError(f"{name}: labels must be integers, got {labels.dtype}")
    if int(labels.min()) < 0:
        raise DataError(f"{name}: labels must not be negative, got {int(labels.min())}")
    if int(labels.max()) >= limits.MAX_NUM_CLASSES:
        raise DataError(f"{name}: the largest label, {int(labels.max())}, would make {int(labels.max()) + 1} "
                        f"classes; eclsnn trains at most {limits.MAX_NUM_CLASSES} classes")
    pixels = images.to(torch.float64).div_(255.0)
    mean = tuple(float(m) for m in pixels.mean(dim=(0, 2, 3)))
    std = tuple(max(float(s), 1e-6) for s in pixels.std(dim=(0, 2, 3)))
    return DatasetInfo(
        name=name, num_classes=int(labels.max()) + 1, channels=int(images.shape[1]),
        image_size=int(images.shape[-1]), mean=mean, std=std, crop_padding=crop_padding, hflip=hflip,
    )
