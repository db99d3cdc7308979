"""Datasets held on the training device, and the batch loader that trains from them.

    data = load_data(cfg.dataset, device, seed)       # DataBundle: train / val / test Splits
    shape = planned_shape(cfg.dataset)                 # classes, image shape, training images; no I/O
    loader = BatchLoader(data.train, 128, mean=data.mean, std=data.std, shuffle=True,
                         augment=True, drop_last=True, seed=seed)
    for x, y in loader.epoch(epoch): ...               # float32 normalised images, int64 labels

Datasets: cifar10 / cifar100 (official python layouts, growrun.data.cifar) and synthetic
(growrun.data.synthetic). The validation hold-out and the train / test subsets are seeded by the
run seed; see growrun.config.schema.DatasetConfig for the keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from growrun.data.cifar import SPECS, read_cifar, resolve_root
from growrun.data.loader import BatchLoader, Split, derive_seed
from growrun.data.synthetic import channel_stats, make_synthetic
from growrun.errors import GrowrunError

__all__ = ["BatchLoader", "DataBundle", "DataShape", "Split", "load_data", "planned_shape"]

_VAL_STREAM, _TEST_STREAM = 0x76616C, 0x74657374  # seed streams of the hold-out and test subset


@dataclass
class DataBundle:
    name: str
    train: Split
    test: Split
    val: Split | None
    num_classes: int
    mean: tuple[float, ...]  # per channel, of images scaled to [0, 1]
    std: tuple[float, ...]
    input_shape: tuple[int, int, int]  # (C, H, W)


@dataclass(frozen=True)
class DataShape:
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    train_images: int | None  # after dataset.val_size / train_subset; None: those are out of range


def planned_shape(cfg) -> DataShape:
    """What load_data(cfg) will return, from the config alone (nothing is read): the official
    sizes for CIFAR, the configured ones for synthetic data. A local CIFAR copy with other
    sizes (dataset.verify=false) may hold another number of training images."""
    if cfg.name in SPECS:
        spec = SPECS[cfg.name]
        num_classes, shape, n = spec.num_classes, (3, 32, 32), spec.train_count
    elif cfg.name == "synthetic":
        size = int(cfg.image_size)
        num_classes, shape, n = int(cfg.num_classes), (3, size, size), int(cfg.train_size)
    else:
        raise GrowrunError(f"dataset.name={cfg.name!r}: unknown; allowed: {', '.join([*SPECS, 'synthetic'])}")
    left = n - int(cfg.val_size)
    fits = 0 <= int(cfg.val_size) < n and 0 <= int(cfg.train_subset) <= left
    return DataShape(num_classes, shape, (int(cfg.train_subset) or left) if fits else None)


def load_data(cfg, device: torch.device, seed: int) -> DataBundle:
    """Read or generate the dataset named by cfg.name, split it (seeded) and move it to `device`."""
    name = cfg.name
    if name in SPECS:
        spec = SPECS[name]
        xtr, ytr, xte, yte = read_cifar(name, resolve_root(cfg.root), download=bool(cfg.download),
                                        verify=bool(cfg.verify))
        num_classes, mean, std = spec.num_classes, spec.mean, spec.std
    elif name == "synthetic":
        xtr, ytr, xte, yte = make_synthetic(int(cfg.num_classes), int(cfg.train_size), int(cfg.test_size),
                                            int(cfg.image_size), float(cfg.noise))
        num_classes = int(cfg.num_classes)
        mean, std = channel_stats(xtr)
    else:
        raise GrowrunError(f"dataset.name={name!r}: unknown; allowed: {', '.join([*SPECS, 'synthetic'])}")
    train_idx, val_idx = split_indices(len(ytr), int(cfg.val_size), int(cfg.train_subset), seed)
    test_idx = subset_indices(len(yte), int(cfg.test_subset), seed)
    return DataBundle(
        name=name,
        train=_to_split(xtr, ytr, train_idx, device),
        test=_to_split(xte, yte, test_idx, device),
        val=None if val_idx is None else _to_split(xtr, ytr, val_idx, device),
        num_classes=num_classes,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        input_shape=tuple(int(d) for d in xtr.shape[1:]),
    )


def split_indices(n: int, val_size: int, train_subset: int, seed: int):
    """(train indices or None for all, val indices or None): seeded, disjoint, each sorted.

    The hold-out is the first `val_size` entries of a seeded permutation of the n training
    images; the training subset comes from the rest, so it never changes the hold-out.
    """
    if not 0 <= val_size < n:
        raise GrowrunError(f"dataset.val_size={val_size}: must leave training images; allowed 0..{n - 1} "
                           f"(of {n} training images)")
    left = n - val_size
    if not 0 <= train_subset <= left:
        raise GrowrunError(f"dataset.train_subset={train_subset}: allowed 0..{left} (0 = all; {n} training "
                           f"images minus dataset.val_size={val_size})")
    if val_size == 0 and train_subset in (0, left):
        return None, None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(_VAL_STREAM, seed)))
    rest = perm[val_size:]
    train = rest if train_subset in (0, left) else rest[:train_subset]
    val = perm[:val_size].sort().values if val_size else None
    return train.sort().values, val


def subset_indices(n: int, subset: int, seed: int):
    """Sorted seeded test subset of `subset` indices, or None for all."""
    if not 0 <= subset <= n:
        raise GrowrunError(f"dataset.test_subset={subset}: allowed 0..{n} (0 = all {n} test images)")
    if subset in (0, n):
        return None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(_TEST_STREAM, seed)))
    return perm[:subset].sort().values


def _to_split(images: torch.Tensor, labels: torch.Tensor, idx, device: torch.device) -> Split:
    if idx is not None:
        images, labels = images.index_select(0, idx), labels.index_select(0, idx)
    return Split(images.contiguous().to(device), labels.to(device=device, dtype=torch.int64))
