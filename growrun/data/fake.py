"""Small random CIFAR-10 / CIFAR-100 datasets in the exact official file layouts, for tests.

    fake = write_cifar10(tmp_path, n_train=100, n_test=50)   # tmp_path/cifar-10-batches-py/...
    fake.train_images[3]                                     # what the loader must read back

The files are Python 2 style protocol-2 pickles like the originals (keys and strings use the
Python 2 'str' opcodes; arrays reference numpy.core.multiarray._reconstruct), so they load with
pickle.load(f, encoding='latin1') (str keys) and encoding='bytes' (bytes keys). Their md5 sums
differ from the official ones: load them with dataset.verify=false.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class FakeCifar:
    folder: Path
    train_images: np.ndarray  # uint8 (N, 3, 32, 32), in file order
    train_labels: np.ndarray  # int64 (N,): 'labels' (CIFAR-10) or 'fine_labels' (CIFAR-100)
    test_images: np.ndarray
    test_labels: np.ndarray
    train_coarse: np.ndarray | None = None  # CIFAR-100 'coarse_labels'
    test_coarse: np.ndarray | None = None


def _str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _int(i: int) -> bytes:
    if 0 <= i < 256:
        return b"K" + bytes([i])
    if 0 <= i < 65536:
        return b"M" + struct.pack("<H", i)
    return b"J" + struct.pack("<i", i)


def _u8_array(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a, dtype=np.uint8)
    shape = b"".join(_int(s) for s in a.shape) + {1: b"\x85", 2: b"\x86", 3: b"\x87"}[a.ndim]
    dtype = (b"cnumpy\ndtype\n" + _str(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + _str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85" + _str(b"b")
            + b"\x87R" + b"(K\x01" + shape + dtype + b"\x89" + _str(a.tobytes()) + b"tb")


def _value(v) -> bytes:
    if isinstance(v, np.ndarray):
        return _u8_array(v)
    if isinstance(v, str):
        return _str(v.encode())
    if isinstance(v, int):
        return _int(v)
    return b"](" + b"".join(_value(x) for x in v) + b"e"  # list of str / int


def py2_pickle(d: dict) -> bytes:
    """A protocol-2 pickle of a dict (str keys; uint8 arrays, str, int, lists) as Python 2 cPickle wrote it."""
    return b"\x80\x02}(" + b"".join(_str(k.encode()) + _value(v) for k, v in d.items()) + b"u."


def _random_split(rng: np.random.Generator, n: int, num_classes: int):
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n).astype(np.int64)
    return images, labels


def _write(path: Path, d: dict) -> None:
    path.write_bytes(py2_pickle(d))


def write_cifar10(root, n_train: int = 100, n_test: int = 50, seed: int = 0) -> FakeCifar:
    """Write root/cifar-10-batches-py (data_batch_1..5, test_batch, batches.meta) with random images."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    xtr, ytr = _random_split(rng, n_train, 10)
    xte, yte = _random_split(rng, n_test, 10)
    for b, idx in enumerate(np.array_split(np.arange(n_train), 5)):
        _write(folder / f"data_batch_{b + 1}", {
            "batch_label": f"training batch {b + 1} of 5", "labels": ytr[idx].tolist(),
            "data": xtr[idx].reshape(len(idx), 3072), "filenames": [f"fake_{i}.png" for i in idx]})
    _write(folder / "test_batch", {
        "batch_label": "testing batch 1 of 1", "labels": yte.tolist(), "data": xte.reshape(n_test, 3072),
        "filenames": [f"fake_test_{i}.png" for i in range(n_test)]})
    _write(folder / "batches.meta", {"num_cases_per_batch": max(1, n_train // 5), "label_names": CIFAR10_CLASSES,
                                     "num_vis": 3072})
    return FakeCifar(folder, xtr, ytr, xte, yte)


def write_cifar100(root, n_train: int = 100, n_test: int = 50, seed: int = 0) -> FakeCifar:
    """Write root/cifar-100-python (train, test, meta) with random images; coarse label = fine // 5.

    Class names are placeholders (fine_000.., coarse_00..); the layout and keys are the official ones.
    """
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    xtr, ytr = _random_split(rng, n_train, 100)
    xte, yte = _random_split(rng, n_test, 100)
    for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        _write(folder / name, {
            "filenames": [f"fake_{name}_{i}.png" for i in range(len(y))], "batch_label": f"{name}ing batch 1 of 1",
            "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist(), "data": x.reshape(len(y), 3072)})
    _write(folder / "meta", {"fine_label_names": [f"fine_{i:03d}" for i in range(100)],
                             "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)]})
    return FakeCifar(folder, xtr, ytr, xte, yte, ytr // 5, yte // 5)
