"""Reproducible batches: train/val splits, shuffling, DDP sharding and on-device augmentation.

Every random choice derives from (seed, epoch[, rank]) and nothing else, so a run can be repeated
exactly and resumed at any epoch. In-memory sets (`ImageTensors`) are gathered by indexing, moved to
the device as uint8 and only then converted and augmented there, batched and vectorised. Folder sets
(`ImageFolderDataset`) are decoded per sample, in worker processes, with per-sample seeds.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from eclsnn.errors import DataError
from .info import DatasetInfo, ImageTensors, normalization_affine, normalize

_EPOCH_STRIDE = 1_000_003  # prime; shuffling seed = seed * stride + epoch, distinct for any epoch < stride


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from several integers, so that independent random streams never coincide."""
    digest = hashlib.blake2b(",".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def split_train_val(num_samples: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint sorted index sets (train, val) covering ``range(num_samples)``, fixed by `seed`.

    The validation set has ``round(num_samples * val_fraction)`` samples (at least one when the
    fraction is positive), so hyper-parameters can be chosen without touching the test set.
    """
    if num_samples < 1:
        raise DataError(f"cannot split an empty data set (num_samples={num_samples})")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    num_val = round(num_samples * val_fraction)
    if val_fraction > 0:
        num_val = max(num_val, 1)
    if num_val >= num_samples:
        raise DataError(f"val_fraction={val_fraction} leaves no training samples out of {num_samples}")
    generator = torch.Generator().manual_seed(derive_seed("split", seed))
    order = torch.randperm(num_samples, generator=generator)
    return order[num_val:].sort().values, order[:num_val].sort().values


# --------------------------------------------------------------------------------------------------
# On-device augmentation of uint8 batches
# --------------------------------------------------------------------------------------------------

def random_crop(x: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Zero-pad by `padding` and cut the original size at per-sample `offsets` [B, 2] (row, col).

    All (2p+1)^2 windows of the padded batch are a strided view (`unfold`, no copy); one advanced
    index picks each image's window. No loop over images.
    """
    if padding == 0:
        return x
    batch, _, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    windows = padded.unfold(2, height, 1).unfold(3, width, 1)   # [B, C, 2p+1, 2p+1, H, W]
    windows = windows.permute(0, 2, 3, 1, 4, 5)                  # [B, 2p+1, 2p+1, C, H, W]
    return windows[torch.arange(batch, device=x.device), offsets[:, 0], offsets[:, 1]]


def random_hflip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the images whose entry of the boolean mask `flip` [B] is set."""
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment_batch(x: torch.Tensor, info: DatasetInfo, generator: torch.Generator) -> torch.Tensor:
    """Standard crop + flip augmentation of a uint8 batch on its device.

    The random numbers are drawn on the CPU from `generator` (a few per image) and then moved, so
    the augmentation is identical on every device type.
    """
    batch = x.shape[0]
    if info.crop_padding > 0:
        offsets = torch.randint(0, 2 * info.crop_padding + 1, (batch, 2), generator=generator)
        x = random_crop(x, info.crop_padding, offsets.to(x.device))
    if info.hflip:
        flip = torch.rand(batch, generator=generator) < 0.5
        x = random_hflip(x, flip.to(x.device))
    return x


# --------------------------------------------------------------------------------------------------
# Folder data sets: one loader item = one decoded batch
# --------------------------------------------------------------------------------------------------

class _DecodedBatches(torch.utils.data.Dataset):
    """Item k = the uint8 images and labels of the k-th batch, decoded (and augmented) per sample.

    Each sample's random crop uses its own generator seeded from (seed, epoch, sample index), so the
    result does not depend on which worker decoded it or on the number of workers.
    """

    def __init__(self, dataset, batches: list[torch.Tensor], augment: bool, seed: int, epoch: int) -> None:
        self.dataset, self.batches = dataset, batches
        self.augment, self.seed, self.epoch = augment, seed, epoch

    def __len__(self) -> int:
        return len(self.batches)

    def _sample(self, index: int) -> tuple[torch.Tensor, int]:
        if self.augment and hasattr(self.dataset, "load"):
            generator = torch.Generator().manual_seed(derive_seed("sample", self.seed, self.epoch, index))
            return self.dataset.load(index, augment=True, generator=generator)
        return self.dataset[index]

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = zip(*(self._sample(int(i)) for i in self.batches[k]))
        return torch.stack(images), torch.as_tensor(labels, dtype=torch.int64)


# --------------------------------------------------------------------------------------------------
# BatchLoader
# --------------------------------------------------------------------------------------------------

class BatchLoader:
    """Iterate (x float32 [B, C, H, W] normalised, y int64 [B]) on `device`, reproducibly.

    Order: if `shuffle`, a permutation of `indices` from ``Generator().manual_seed(seed * 1_000_003 +
    epoch)``. Sharding (like `DistributedSampler`): the ordered list is padded by wrapping around to a
    multiple of `world_size` and rank r takes positions ``r::world_size``; its batches are consecutive
    runs of `batch_size`. Hence the W ranks' k-th batches together are exactly the k-th batch of size
    ``W * batch_size`` of a single process (for every full batch). Augmentation (`augment`) is crop +
    flip on the device, seeded from (seed, epoch, rank). Call `set_epoch` before each epoch.
    """

    def __init__(
        self,
        dataset,
        indices: torch.Tensor | None = None,
        batch_size: int = 128,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        progress: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dataset = dataset
        self.info: DatasetInfo = dataset.info
        self.indices = self._check_indices(dataset, indices)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.seed, self.drop_last, self.device = seed, drop_last, torch.device(device)
        self.rank, self.world_size, self.progress = rank, world_size, progress
        self.epoch = 0
        if len(self) == 0:
            raise DataError(
                f"{self.info.name}: {self.samples_per_rank} samples per rank give no full batch of "
                f"{batch_size} with drop_last=True; lower the batch size or set drop_last=False"
            )

    @staticmethod
    def _check_indices(dataset, indices: torch.Tensor | None) -> torch.Tensor:
        name = dataset.info.name
        if indices is None:
            indices = torch.arange(len(dataset))
        indices = torch.as_tensor(indices)
        if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise DataError(f"{name}: indices must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}")
        if indices.numel() == 0:
            raise DataError(f"{name}: the data set or index set is empty; there is nothing to load")
        indices = indices.to(torch.int64).cpu()
        if int(indices.min()) < 0 or int(indices.max()) >= len(dataset):
            raise DataError(f"{name}: indices must lie in [0, {len(dataset)}), got "
                            f"[{int(indices.min())}, {int(indices.max())}]")
        return indices

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    @property
    def samples_per_rank(self) -> int:
        return math.ceil(len(self.indices) / self.world_size)

    def __len__(self) -> int:
        per_rank = self.samples_per_rank
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def rank_indices(self) -> torch.Tensor:
        """The sample indices this rank visits this epoch, in order (before batching)."""
        order = self.indices
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * _EPOCH_STRIDE + self.epoch)
            order = order[torch.randperm(len(order), generator=generator)]
        total = self.samples_per_rank * self.world_size
        if total != len(order):  # wrap around, as DistributedSampler does, so every rank has as many
            order = order[torch.arange(total) % len(order)]
        return order[self.rank::self.world_size]

    def batch_indices(self) -> list[torch.Tensor]:
        """This rank's batches of sample indices for the current epoch."""
        mine = self.rank_indices()
        return [mine[start:start + self.batch_size]
                for start in range(0, len(self) * self.batch_size, self.batch_size)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._batches()
        if self.progress is not None:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=len(self), desc=self.progress, leave=False, disable=None)
        return iter(batches)

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(self.dataset, ImageTensors):
            yield from self._tensor_batches()
        else:
            yield from self._decoded_batches()

    def _tensor_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(derive_seed("augment", self.seed, self.epoch, self.rank))
        affine = normalization_affine(self.info, self.device)
        for idx in self.batch_indices():
            idx = idx.to(self.dataset.images.device)
            x = self.dataset.images.index_select(0, idx).to(self.device, non_blocking=True)
            y = self.dataset.labels.index_select(0, idx).to(self.device, non_blocking=True)
            if self.augment:
                x = augment_batch(x, self.info, generator)
            yield normalize(x, self.info, affine), y

    def _decoded_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        workers = int(getattr(self.dataset, "num_workers", 0))
        batches = _DecodedBatches(self.dataset, self.batch_indices(), self.augment, self.seed, self.epoch)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers,
                                             pin_memory=self.device.type == "cuda")
        affine = normalization_affine(self.info, self.device)
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            yield normalize(x, self.info, affine), y.to(self.device, non_blocking=True)
