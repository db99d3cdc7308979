"""CIFAR-10 / CIFAR-100 from the official python layouts, read with pickle + numpy.

    <root>/cifar-10-batches-py/   data_batch_1..5, test_batch, batches.meta   ('data', 'labels')
    <root>/cifar-100-python/      train, test, meta             ('data', 'fine_labels', 'coarse_labels')

'data' is uint8 (N, 3072): the R, G and B planes of each 32x32 image. The originals are Python 2
pickles; loading with encoding='bytes' reads them (bytes keys) as well as Python 3 pickles (str
keys), and keeps the pixel buffer as bytes (no latin-1 round trip). Missing files are fetched
with torchvision when asked; the official md5 sums are checked unless dataset.verify=false.
Unpickling may only build numpy arrays (_CifarUnpickler): a file that names any other callable
is refused, so a tampered data file cannot run code (with dataset.verify=false, nothing else
would stop it).
"""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from growrun.errors import GrowrunError

DEFAULT_ROOT = "~/.cache/growrun-data"
ROOT_ENV = "GROWRUN_DATA"


@dataclass(frozen=True)
class CifarSpec:
    title: str  # as written in messages
    folder: str
    archive: str  # the official tarball, named in messages
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    md5: dict  # file name -> official md5 (the same sums as torchvision.datasets.CIFAR10/100)
    train_count: int = 50000  # images in the official training files

    @property
    def files(self) -> tuple[str, ...]:
        return self.train_files + self.test_files + (self.meta_file,)


SPECS = {
    "cifar10": CifarSpec(
        "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta", "labels", 10,
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
         "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
         "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
         "batches.meta": "5ff9c542aee3614f3951f8cda6e48888"}),
    "cifar100": CifarSpec(
        "CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz",
        ("train",), ("test",), "meta", "fine_labels", 100,
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
         "meta": "7973b15100ade9c7d40fb424638fde48"}),
}


def resolve_root(root: str | os.PathLike | None) -> Path:
    """dataset.root, else $GROWRUN_DATA, else ~/.cache/growrun-data; ~ expanded, made absolute."""
    chosen = root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT
    return Path(os.path.expanduser(str(chosen))).absolute()


def read_cifar(name: str, root: Path, *, download: bool, verify: bool):
    """(train_images, train_labels, test_images, test_labels): uint8 (N, 3, 32, 32) / int64 (N,) CPU tensors."""
    spec = SPECS[name]
    folder = root / spec.folder
    missing = [f for f in spec.files if not (folder / f).is_file()]
    if missing:
        failure = _download(name, root) if download else None
        missing = [f for f in spec.files if not (folder / f).is_file()]
        if missing:
            raise GrowrunError(_not_found(spec, root, missing[0], download, failure))
    if verify:
        for f in spec.files:
            _check_md5(spec, folder / f)
    train = [_read_batch(spec, folder / f) for f in spec.train_files]
    test = [_read_batch(spec, folder / f) for f in spec.test_files]
    return (torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]),
            torch.cat([x for x, _ in test]), torch.cat([y for _, y in test]))


def _not_found(spec: CifarSpec, root: Path, first_missing: str, download: bool, failure: str | None) -> str:
    where = f"{spec.title} not found: expected {root / spec.folder / first_missing}"
    extract = f"extract {spec.archive} into dataset.root={root} (or set {ROOT_ENV})"
    if download:
        return f"{where}; the download failed ({failure or 'files still missing'}); {extract}"
    return f"{where}; download it (dataset.download=true, needs internet) or {extract}"


def _download(name: str, root: Path) -> str | None:
    """Fetch and extract the official archive with torchvision; the reason on failure, else None."""
    try:
        from torchvision import datasets

        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        root.mkdir(parents=True, exist_ok=True)
        cls(root=str(root), train=False, download=True)
    except Exception as e:  # offline, unwritable root, bad archive...: reported as one line
        return " ".join(f"{type(e).__name__}: {e}".split())
    return None


def file_md5(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_md5(spec: CifarSpec, path: Path) -> None:
    if file_md5(path) != spec.md5[path.name]:
        raise GrowrunError(f"{path}: md5 differs from the official {spec.title} file (corrupt or re-encoded "
                           f"copy); re-extract {spec.archive}, or set dataset.verify=false to skip the check "
                           f"for a re-encoded local copy")


class _CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals a CIFAR batch needs (numpy arrays)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}: a CIFAR batch holds only numpy arrays, "
                                         f"lists and strings")
        return super().find_class(module, name)


def _read_batch(spec: CifarSpec, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch file -> uint8 (N, 3, 32, 32) and int64 (N,) tensors."""
    try:
        with open(path, "rb") as f:
            raw = _CifarUnpickler(f, encoding="bytes").load()
        d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}
        data = np.ascontiguousarray(np.asarray(d["data"], dtype=np.uint8))
        if not data.flags.writeable:  # torch.from_numpy wants a writable buffer
            data = data.copy()
        labels = np.asarray(d[spec.label_key], dtype=np.int64)
    except Exception as e:
        raise GrowrunError(f"{path}: not a readable {spec.title} batch ({type(e).__name__}: "
                           f"{' '.join(str(e).split())}); re-extract {spec.archive}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise GrowrunError(f"{path}: expected 'data' of shape (N, 3072) and N labels, got {data.shape} and "
                           f"{labels.shape}; re-extract {spec.archive}")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise GrowrunError(f"{path}: labels outside 0..{spec.num_classes - 1}; re-extract {spec.archive}")
    return torch.from_numpy(data).view(-1, 3, 32, 32), torch.from_numpy(labels)
