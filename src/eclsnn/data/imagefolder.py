"""ImageNet (ILSVRC-2012) as a lazy folder of images: ``root/{train,val}/<wnid>/*.JPEG``.

ImageNet does not fit in memory as uint8 (~150 GB), so images are decoded on demand. Decoding uses
torchvision if installed, else Pillow; neither is imported before the first image is needed. Resizing
and cropping are done with torch (`interpolate`, antialiased bilinear), so both decoders give the same
geometry. Transforms are the standard ones: evaluation = resize the short side to 256/224 of the
crop side, then a centre crop; training = random-resized crop (scale 0.08-1, ratio 3/4-4/3) + flip.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eclsnn import limits
from eclsnn.errors import DataError
from .info import DATASETS, DatasetInfo
from .paths import ENV_VAR, format_places, search_roots

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
_RESIZE_RATIO = 256 / 224          # short side before the centre crop, relative to the crop side
_SCALE = (0.08, 1.0)               # random-resized-crop area range (Szegedy et al. 2015)
_RATIO = (3 / 4, 4 / 3)            # and aspect-ratio range


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------

def _open_checked(path: Path):
    """The image opened by Pillow, which reads only its header, refused (DataError) if it declares more pixels
    than Pillow's decompression-bomb limit (``ECLSNN_MAX_IMAGE_PIXELS`` raises it): a few bytes of header can
    declare gigabytes of pixels, and no decoder may allocate them."""
    from PIL import Image

    override, pillows = limits.max_image_pixels(), Image.MAX_IMAGE_PIXELS
    if override is not None:  # for this call only: Pillow's setting is the user's
        Image.MAX_IMAGE_PIXELS = override
    try:
        return Image.open(path)
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: {err} This is {limits.image_pixels_hint()}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillows


def _decode_torchvision(path: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:  # torchvision's decoders have no such limit: the header is checked first (Pillow comes with it)
        with _open_checked(path):
            pass
    except ImportError:  # pragma: no cover - torchvision depends on Pillow
        pass
    return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)


def _decode_pil(path: Path) -> torch.Tensor:
    from PIL import Image

    with _open_checked(path) as image:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        hwc = np.asarray(rgb, dtype=np.uint8)  # a view of Pillow's bytes: 3 bytes a pixel
        rgb.close()  # Pillow's own copy (4 bytes a pixel) goes before the transpose copies
    return torch.from_numpy(np.array(hwc.transpose(2, 0, 1), order="C"))  # (a copy always: writable)


# torchvision builds whose import failed with something other than ImportError (e.g. a torchvision built
# for another torch: "RuntimeError: operator torchvision::nms does not exist"); warned about once
_BROKEN_IMPORTS: set[str] = set()


def find_decoder() -> Callable[[Path], torch.Tensor]:
    """The image decoder to use: torchvision, else Pillow, else a DataError saying what to install.

    A torchvision that is installed but fails at import in any other way than ImportError is skipped with
    one warning: Pillow decodes the same images."""
    try:
        import torchvision.io

        # A torchvision built for another torch fails at import (a RuntimeError) or loads without its image
        # operators: either way Pillow decodes instead.
        if getattr(torchvision.io.image, "_has_image_ops", lambda: True)():
            return _decode_torchvision
    except ImportError:
        pass
    except Exception as err:  # noqa: BLE001 - whatever a broken build raises, Pillow can still decode
        if "torchvision" not in _BROKEN_IMPORTS:
            _BROKEN_IMPORTS.add("torchvision")
            warnings.warn(f"torchvision is installed but fails at import ({type(err).__name__}: {err}); "
                          "decoding images with Pillow instead", stacklevel=2)
    try:
        import PIL.Image  # noqa: F401

        return _decode_pil
    except ImportError:
        pass
    raise DataError(
        "reading an image folder (ImageNet) needs an image decoder, and neither torchvision nor Pillow "
        "is installed. Install one with: pip install eclsnn[vision]"
    )


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------

def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, height, width], antialiased bilinear (like PIL's resize)."""
    if image.shape[-2:] == (height, width):
        return image
    out = F.interpolate(image[None].to(torch.float32), size=(height, width), mode="bilinear",
                        align_corners=False, antialias=True)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def eval_transform(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the short side to ``round(size * 256/224)``, then centre-crop ``size`` x ``size``."""
    height, width = image.shape[-2:]
    short = max(size, round(size * _RESIZE_RATIO))
    if height <= width:
        new_h, new_w = short, max(short, round(width * short / height))
    else:
        new_h, new_w = max(short, round(height * short / width)), short
    if image.shape[0] * new_h * new_w > limits.MAX_IMAGE_VALUES:  # (a 1 x 10 000 image: 256 x 2 560 000)
        raise DataError(f"an image of {height} x {width} pixels would be resized to {new_h} x {new_w} before its "
                        f"centre crop, more than the {limits.MAX_IMAGE_VALUES} values eclsnn allows one image: "
                        "its aspect ratio is too extreme for the evaluation transform")
    image = _resize(image, new_h, new_w)
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    return image[:, top:top + size, left:left + size].contiguous()


def _random_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized crop; falls back to a centre crop like torchvision."""
    area = height * width
    log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (_SCALE[0] + (_SCALE[1] - _SCALE[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        w, h = width, round(width / _RATIO[0])
    elif in_ratio > _RATIO[1]:
        h, w = height, round(height * _RATIO[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(image: torch.Tensor, size: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random-resized crop to ``size`` x ``size``, then a horizontal flip with probability 1/2."""
    top, left, h, w = _random_box(image.shape[-2], image.shape[-1], generator)
    image = _resize(image[:, top:top + h, left:left + w], size, size)
    flip = bool(torch.rand(1, generator=generator) < 0.5)
    return image.flip(-1).contiguous() if hflip and flip else image.contiguous()


# --------------------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------------------

def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


class ImageFolderDataset:
    """Lazy ``split_dir/<class>/<image>`` data set; item i -> (uint8 [3, S, S], int label).

    Class indices come from the sorted class folders of ``root/train`` when it exists, so that train
    and val agree on the label of every wnid even if val lacks some classes. `info.num_classes` is the
    number of classes found (1000 for full ImageNet; fewer for a subset such as ImageNet-100).
    `num_workers` is how many decoding processes `BatchLoader` uses for this set.
    """

    def __init__(self, root: str | os.PathLike, train: bool, info: DatasetInfo | None = None,
                 num_workers: int | None = None) -> None:
        self.root = Path(root)
        self.train = train
        self.split_dir = self.root / ("train" if train else "val")
        if not self.split_dir.is_dir():
            raise DataError(f"{self.split_dir} does not exist; expected {self.root}/{{train,val}}/<class>/*.JPEG")
        self._decode = find_decoder()
        class_source = self.root / "train" if (self.root / "train").is_dir() else self.split_dir
        self.classes = _class_folders(class_source)
        if not self.classes:
            raise DataError(f"{class_source} has no class folders; expected <class>/*.JPEG inside it")
        if len(self.classes) > limits.MAX_NUM_CLASSES:
            raise DataError(f"{class_source} has {len(self.classes)} class folders; eclsnn trains at most "
                            f"{limits.MAX_NUM_CLASSES} classes (eclsnn.limits.MAX_NUM_CLASSES)")
        index = {name: i for i, name in enumerate(self.classes)}
        self.samples = self._scan(index)
        base = info if info is not None else DATASETS["imagenet"]
        self.info = dataclasses.replace(base, num_classes=len(self.classes))
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers

    def _scan(self, index: dict[str, int]) -> list[tuple[Path, int]]:
        samples: list[tuple[Path, int]] = []
        for name in _class_folders(self.split_dir):
            if name not in index:
                raise DataError(f"{self.split_dir / name} is a class that {self.root / 'train'} does not have; "
                                "train and val must use the same class folders")
            files = sorted(p for p in (self.split_dir / name).iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            samples += [(path, index[name]) for path in files]
        if not samples:
            raise DataError(f"{self.split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            "it is empty. For ImageNet val, sort the images into <wnid> folders first")
        return samples

    @property
    def labels(self) -> torch.Tensor:
        """All labels, int64 [N], without decoding any image."""
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def decode(self, index: int) -> torch.Tensor:
        """The full-size image as uint8 [3, H, W]."""
        path = self.samples[index][0]
        try:
            return self._decode(path)
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - decoder libraries raise many types for bad files
            raise DataError(f"cannot decode {path} ({type(err).__name__}: {err}); "
                            "the file is damaged: replace or delete it") from err

    def load(self, index: int, augment: bool = False,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """Item `index` with the training transform (`augment=True`, random from `generator`) or the eval one."""
        image = self.decode(index)
        size = self.info.image_size
        if augment:
            image = train_transform(image, size, self.info.hflip, generator or torch.Generator())
        else:
            try:
                image = eval_transform(image, size)
            except DataError as err:
                raise DataError(f"{self.samples[index][0]}: {err}") from None
        return image, self.samples[index][1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.load(index)


def candidate_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    """Folders that may hold ImageNet's ``train/`` and ``val/``: each root and root/imagenet."""
    dirs: list[Path] = []
    for root in search_roots(data_dir):
        dirs += [root, root / "imagenet"]
    return dirs


def load_imagenet(train: bool, data_dir: str | os.PathLike | None = None,
                  download_missing: bool = False) -> ImageFolderDataset:
    """Open ImageNet lazily from the first searched folder holding the requested split."""
    split = "train" if train else "val"
    for folder in candidate_dirs(data_dir):
        if (folder / split).is_dir():
            return ImageFolderDataset(folder, train=train)
    raise DataError(
        f"ImageNet {split} split not found; looked for a {split}/ folder in:\n"
        f"{format_places(candidate_dirs(data_dir))}\n"
        "ImageNet cannot be downloaded automatically (its licence requires an account at "
        "https://image-net.org). Get ILSVRC-2012, arrange it as DIR/train/<wnid>/*.JPEG and "
        f"DIR/val/<wnid>/*.JPEG, then pass --data-dir DIR (or set {ENV_VAR}=DIR)"
        + ("; --download does not apply to ImageNet" if download_missing else "")
    )
