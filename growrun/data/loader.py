"""Batches from a split held on the training device: shuffle, random crop + flip, normalise.

The whole split stays a uint8 tensor on the device. Each batch is one index_select, one
zero-pad, one gather (crop and flip together) and one multiply-add; no per-sample Python, no
PIL, no worker processes. The random numbers of an epoch (permutation, crop offsets, flips) are
drawn at once from a CPU generator seeded by (seed, epoch) alone and then moved to the device,
so a given epoch has the same batches on every device and whatever ran before it (exact resume).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

PAD = 4  # random-crop zero padding, as torchvision.transforms.RandomCrop(size, padding=4)
_LOADER_STREAM = 0x6C6F6164  # keeps the loader's random stream apart from other seeded draws


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (e.g. run seed, purpose, epoch) by numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class Split:
    """One split, held entirely on the training device."""
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class EpochDraws:
    """The random numbers of one epoch, one row per sample position in the epoch's order."""
    order: torch.Tensor  # int64 (N,): sample index at each position
    offsets: torch.Tensor  # int64 (N, 2): crop window (top, left) in the padded image, in [0, 2*PAD]
    flips: torch.Tensor  # bool (N,): mirror horizontally


def draw_epoch(n: int, seed: int, epoch: int, *, shuffle: bool) -> EpochDraws:
    """Permutation, crop offsets and flips for one epoch, from a CPU generator seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(derive_seed(_LOADER_STREAM, seed, epoch))
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=g)
    flips = torch.randint(0, 2, (n,), generator=g).bool()
    return EpochDraws(order, offsets, flips)


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Zero-pad by PAD, cut the (H, W) window at `offsets` (top, left), mirror where `flips`.

    Same result as torchvision RandomCrop((H, W), padding=PAD) then RandomHorizontalFlip with
    these draws; one F.pad and one gather over the whole batch. Works on any dtype.
    """
    b, c, h, w = images.shape
    hp, wp = h + 2 * PAD, w + 2 * PAD
    padded = F.pad(images, (PAD, PAD, PAD, PAD)).view(b, c, hp * wp)
    dev = images.device
    rows = offsets[:, :1] + torch.arange(h, device=dev)  # (B, H) rows of the padded image
    ar = torch.arange(w, device=dev)
    cols = offsets[:, 1:] + torch.where(flips[:, None], (w - 1) - ar, ar)  # (B, W)
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.gather(2, index).view(b, c, h, w)


class BatchLoader:
    """Iterates a Split in batches of float32 normalised images and int64 labels, on its device."""

    def __init__(self, split: Split, batch_size: int, *, mean: Sequence[float], std: Sequence[float],
                 shuffle: bool, augment: bool, drop_last: bool, seed: int, shard: tuple[int, int] = (0, 1)):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split, self.batch_size = split, int(batch_size)
        self.shuffle, self.augment, self.drop_last, self.seed = shuffle, augment, drop_last, int(seed)
        self.rank, self.world = shard  # yield this rank's contiguous share of every batch
        dev = split.images.device
        c = split.images.shape[1]
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean/std need {c} channel values, got {len(mean)} and {len(std)}")
        std_t = torch.tensor(std, dtype=torch.float64)
        # x/255 normalised = x * scale + shift, one multiply-add per batch
        self._scale = (1.0 / (255.0 * std_t)).float().view(1, c, 1, 1).to(dev)
        self._shift = (-torch.tensor(mean, dtype=torch.float64) / std_t).float().view(1, c, 1, 1).to(dev)

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 (x / 255 - mean) / std."""
        return torch.addcmul(self._shift, images.float(), self._scale)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of one epoch from batch `start` on; depends on (seed, epoch) alone."""
        images, labels = self.split.images, self.split.labels
        n, bs = len(self.split), self.batch_size
        if not self.shuffle and not self.augment:  # evaluation: contiguous slices, no draws
            for i in range(start, len(self)):
                sl = self._share(i * bs, min((i + 1) * bs, n))
                yield self.normalize(images[sl]), labels[sl]
            return
        draws = draw_epoch(n, self.seed, epoch, shuffle=self.shuffle)
        dev = images.device
        order = draws.order.to(dev)
        offsets, flips = draws.offsets.to(dev), draws.flips.to(dev)
        for i in range(start, len(self)):
            sl = self._share(i * bs, min((i + 1) * bs, n))
            idx = order[sl]
            x = images.index_select(0, idx)
            if self.augment:
                x = crop_flip(x, offsets[sl], flips[sl])
            yield self.normalize(x), labels.index_select(0, idx)

    def _share(self, lo: int, hi: int) -> slice:
        """This rank's part of positions lo..hi (torch.tensor_split's split; all of it for one rank)."""
        q, r = divmod(hi - lo, self.world)
        start = lo + self.rank * q + min(self.rank, r)
        return slice(start, start + q + (self.rank < r))
