"""growrun.data: CIFAR file reading, verification, splits, synthetic data and the batch loader."""
from __future__ import annotations

import pickle
import time
import urllib.error
from dataclasses import replace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from growrun.config.schema import DatasetConfig
from growrun.data import BatchLoader, Split, load_data
from growrun.data.cifar import SPECS, resolve_root
from growrun.data.fake import write_cifar10, write_cifar100
from growrun.data.loader import PAD, crop_flip, draw_epoch
from growrun.data.synthetic import make_synthetic
from growrun.errors import GrowrunError

CPU = torch.device("cpu")


def cfg_for(**kw) -> DatasetConfig:
    return replace(DatasetConfig(), **kw)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# ---------------------------------------------------------------- CIFAR files

def test_cifar10_round_trip(tmp_path):
    fake = write_cifar10(tmp_path, n_train=103, n_test=37, seed=1)  # 103: uneven batches of 21/21/21/20/20
    data = load_data(cfg_for(name="cifar10", root=str(tmp_path), verify=False, download=False), CPU, seed=0)
    assert data.train.images.shape == (103, 3, 32, 32) and data.test.images.shape == (37, 3, 32, 32)
    assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64
    assert torch.equal(data.train.images, torch.from_numpy(fake.train_images))
    assert torch.equal(data.train.labels, torch.from_numpy(fake.train_labels))
    assert torch.equal(data.test.images, torch.from_numpy(fake.test_images))
    assert torch.equal(data.test.labels, torch.from_numpy(fake.test_labels))
    # pixel (c, r, col) of image i is byte c*1024 + r*32 + col of its 3072-byte row in the file
    with open(fake.folder / "data_batch_2", "rb") as f:
        rows = pickle.load(f, encoding="latin1")["data"]
    for j, (c, r, col) in [(0, (0, 0, 0)), (5, (2, 31, 7)), (20, (1, 13, 30))]:
        assert data.train.images[21 + j, c, r, col].item() == rows[j, c * 1024 + r * 32 + col]
    assert 0 <= int(data.train.labels.min()) and int(data.train.labels.max()) <= 9
    assert (data.name, data.num_classes, data.input_shape, data.val) == ("cifar10", 10, (3, 32, 32), None)
    assert data.mean == (0.4914, 0.4822, 0.4465) and data.std == (0.2470, 0.2435, 0.2616)


def test_cifar100_round_trip_fine_labels(tmp_path):
    fake = write_cifar100(tmp_path, n_train=400, n_test=30, seed=2)
    cfg = OmegaConf.structured(cfg_for(name="cifar100", root=str(tmp_path), verify=False, download=False))
    data = load_data(cfg, CPU, seed=0)  # a DictConfig works like the dataclass
    assert data.train.images.shape == (400, 3, 32, 32) and data.num_classes == 100
    assert torch.equal(data.train.images, torch.from_numpy(fake.train_images))
    assert torch.equal(data.train.labels, torch.from_numpy(fake.train_labels))  # fine, not coarse
    assert torch.equal(data.test.images[7], torch.from_numpy(fake.test_images[7]))
    assert int(data.train.labels.max()) > 19 and int(data.train.labels.max()) <= 99
    assert data.mean == (0.5071, 0.4865, 0.4409) and data.std == (0.2673, 0.2564, 0.2762)
    with open(fake.folder / "meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert len(meta["fine_label_names"]) == 100 and len(meta["coarse_label_names"]) == 20


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_reads_python3_pickles_with_str_or_bytes_keys(tmp_path, bytes_keys):
    fake = write_cifar10(tmp_path, n_train=50, n_test=10)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    x = fake.test_images.reshape(10, 3072)
    with open(fake.folder / "test_batch", "wb") as f:
        pickle.dump({key("data"): x, key("labels"): fake.test_labels.tolist()}, f, protocol=4)
    data = load_data(cfg_for(root=str(tmp_path), verify=False, download=False), CPU, seed=0)
    assert torch.equal(data.test.images, torch.from_numpy(fake.test_images))
    assert torch.equal(data.test.labels, torch.from_numpy(fake.test_labels))


def test_fake_files_read_identically_by_torchvision(tmp_path):
    """torchvision's own reader (integrity check skipped) sees the same images: the layout is official."""
    from torchvision.datasets import CIFAR10

    class Unchecked(CIFAR10):
        def _check_integrity(self):
            return True

        def _load_meta(self):
            with open(fake.folder / "batches.meta", "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")["label_names"]

    fake = write_cifar10(tmp_path, n_train=40, n_test=10)
    ref = Unchecked(str(tmp_path), train=True)
    assert np.array_equal(ref.data, fake.train_images.transpose(0, 2, 3, 1))
    assert ref.targets == fake.train_labels.tolist() and ref.classes[0] == "airplane"


def test_official_md5_table_matches_torchvision():
    from torchvision.datasets import CIFAR10, CIFAR100

    for name, cls in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        ref = dict(cls.train_list + cls.test_list) | {cls.meta["filename"]: cls.meta["md5"]}
        assert SPECS[name].md5 == ref and SPECS[name].folder == cls.base_folder


@pytest.mark.parametrize("writer,name", [(write_cifar10, "cifar10"), (write_cifar100, "cifar100")])
def test_md5_verification(tmp_path, writer, name):
    writer(tmp_path, n_train=20, n_test=5)
    with pytest.raises(GrowrunError) as e:
        load_data(cfg_for(name=name, root=str(tmp_path), verify=True, download=False), CPU, seed=0)
    msg = one_line(e)
    assert "md5" in msg and "dataset.verify=false" in msg and str(tmp_path / SPECS[name].folder) in msg
    data = load_data(cfg_for(name=name, root=str(tmp_path), verify=False, download=False), CPU, seed=0)
    assert len(data.train) == 20


def test_missing_directory_without_download(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(GrowrunError) as e:
        load_data(cfg_for(root=str(root), download=False), CPU, seed=0)
    msg = one_line(e)
    assert str(root / "cifar-10-batches-py" / "data_batch_1") in msg
    assert "dataset.download=true" in msg and "cifar-10-python.tar.gz" in msg and "GROWRUN_DATA" in msg


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, root, train, download):
            raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Offline)
    with pytest.raises(GrowrunError) as e:
        load_data(cfg_for(name="cifar100", root=str(tmp_path), download=True), CPU, seed=0)
    msg = one_line(e)
    assert "download failed" in msg and "URLError" in msg and str(tmp_path / "cifar-100-python") in msg


def test_download_fills_missing_files(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class Downloader:  # stands in for torchvision's download: writes the files, then returns
        def __init__(self, root, train, download):
            calls.append(root)
            write_cifar10(root, n_train=15, n_test=5)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Downloader)
    data = load_data(cfg_for(root=str(tmp_path / "new"), download=True, verify=False), CPU, seed=0)
    assert calls == [str(tmp_path / "new")] and len(data.train) == 15
    load_data(cfg_for(root=str(tmp_path / "new"), download=True, verify=False), CPU, seed=0)
    assert len(calls) == 1  # files present: no second download


def test_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("GROWRUN_DATA", raising=False)
    assert resolve_root(None) == tmp_path / ".cache" / "growrun-data"
    monkeypatch.setenv("GROWRUN_DATA", "~/env-data")
    assert resolve_root(None) == tmp_path / "env-data"
    assert resolve_root("~/explicit") == tmp_path / "explicit"


# ---------------------------------------------------------------- augmentation

def brute_force_crop_flip(images, offsets, flips):
    out = []
    for img, (top, left), flip in zip(images, offsets.tolist(), flips.tolist()):
        padded = torch.zeros(img.shape[0], img.shape[1] + 2 * PAD, img.shape[2] + 2 * PAD, dtype=img.dtype)
        padded[:, PAD:PAD + img.shape[1], PAD:PAD + img.shape[2]] = img
        crop = padded[:, top:top + img.shape[1], left:left + img.shape[2]]
        out.append(crop.flip(-1) if flip else crop)
    return torch.stack(out)


@pytest.mark.parametrize("hw", [(32, 32), (8, 12)])
def test_crop_flip_equals_per_image_slices(hw):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 3, *hw), generator=g, dtype=torch.uint8)  # 1..255: padding shows as 0
    offsets = torch.randint(0, 2 * PAD + 1, (64, 2), generator=g)
    offsets[:4] = torch.tensor([[0, 0], [8, 8], [0, 8], [4, 4]])  # the extreme windows and the identity
    flips = torch.randint(0, 2, (64,), generator=g).bool()
    out = crop_flip(images, offsets, flips)
    assert torch.equal(out, brute_force_crop_flip(images, offsets, flips))
    assert torch.equal(out[3], images[3].flip(-1) if flips[3] else images[3])


def test_loader_batches_equal_reference_pipeline():
    g = torch.Generator().manual_seed(1)
    split = Split(torch.randint(0, 256, (300, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(300))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    loader = BatchLoader(split, 64, mean=mean, std=std, shuffle=True, augment=True, drop_last=False, seed=7)
    draws = draw_epoch(300, 7, 2, shuffle=True)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    batches = list(loader.epoch(2))
    assert [len(y) for _, y in batches] == [64, 64, 64, 64, 44]
    for i, (x, y) in enumerate(batches):
        sl = slice(64 * i, 64 * (i + 1))
        idx = draws.order[sl]
        ref = brute_force_crop_flip(split.images[idx], draws.offsets[sl], draws.flips[sl])
        assert x.dtype == torch.float32 and torch.equal(y, split.labels[idx])
        torch.testing.assert_close(x, (ref.float() / 255 - m) / s, rtol=0, atol=1e-5)


def test_normalisation_without_augmentation():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 3, 4, 4)
    loader = BatchLoader(Split(images, torch.tensor([0, 1])), 5, mean=(0.1, 0.2, 0.3), std=(0.5, 1.0, 2.0),
                         shuffle=False, augment=False, drop_last=False, seed=0)
    (x, y), = list(loader.epoch(0))
    expected = (images.double() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1).double()) \
        / torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1).double()
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(y, torch.tensor([0, 1]))


def test_every_offset_and_flip_occurs_in_an_epoch():
    draws = draw_epoch(50_000, seed=3, epoch=0, shuffle=True)
    pairs = set(map(tuple, draws.offsets.tolist()))
    assert pairs == {(dy, dx) for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)}
    assert 0.48 < draws.flips.float().mean().item() < 0.52


# ---------------------------------------------------------------- determinism and coverage

def id_split(n: int) -> Split:
    """Images whose labels are their own index, so batches show which samples they hold."""
    g = torch.Generator().manual_seed(n)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n))


def make_loader(split, **kw):
    args = dict(mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, augment=True, drop_last=True, seed=11) | kw
    return BatchLoader(split, 32, **args)


def test_epochs_are_deterministic_and_resumable():
    split = id_split(200)
    a = make_loader(split)
    runs = [list(a.epoch(e)) for e in range(4)]
    again = list(a.epoch(2))
    fresh = list(make_loader(split).epoch(3))  # never ran epochs 0..2
    for (x1, y1), (x2, y2) in zip(runs[2], again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    for (x1, y1), (x2, y2) in zip(runs[3], fresh):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(runs[2][0][1], runs[3][0][1])  # different permutation
    other_seed = list(make_loader(split, seed=12).epoch(3))
    assert not torch.equal(other_seed[0][1], runs[3][0][1])


def test_each_sample_once_per_epoch_and_drop_last_drops_only_the_tail():
    split = id_split(205)
    full = make_loader(split, drop_last=False)
    assert len(full) == 7
    seen = torch.cat([y for _, y in full.epoch(5)])
    assert torch.equal(seen.sort().values, torch.arange(205))
    dropped = make_loader(split, drop_last=True)
    assert len(dropped) == 6
    batches = list(dropped.epoch(5))
    assert len(batches) == 6 and all(len(y) == 32 for _, y in batches)
    assert torch.equal(torch.cat([y for _, y in batches]), seen[:192])  # same order, tail of 13 dropped


def test_evaluation_loader_keeps_order():
    split = id_split(70)
    loader = make_loader(split, shuffle=False, augment=False, drop_last=False)
    batches = list(loader.epoch(9))
    assert [len(y) for _, y in batches] == [32, 32, 6]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(70))
    assert torch.equal(batches[2][0], loader.normalize(split.images[64:]))


# ---------------------------------------------------------------- splits and subsets

def synthetic_cfg(**kw) -> DatasetConfig:
    return cfg_for(name="synthetic", train_size=500, test_size=120, **kw)


def test_val_split_and_subsets():
    full = load_data(synthetic_cfg(), CPU, seed=0)
    assert full.val is None and len(full.train) == 500 and len(full.test) == 120
    data = load_data(synthetic_cfg(val_size=100, train_subset=300, test_subset=50), CPU, seed=4)
    assert (len(data.train), len(data.val), len(data.test)) == (300, 100, 50)
    # recover which full-set images each split holds (images are unique at noise 0.6)
    key = {bytes(img.numpy()): i for i, img in enumerate(full.train.images)}
    train_ids = {key[bytes(img.numpy())] for img in data.train.images}
    val_ids = {key[bytes(img.numpy())] for img in data.val.images}
    assert len(train_ids) == 300 and len(val_ids) == 100 and not train_ids & val_ids
    test_key = {bytes(img.numpy()): i for i, img in enumerate(full.test.images)}
    assert len({test_key[bytes(img.numpy())] for img in data.test.images}) == 50
    same = load_data(synthetic_cfg(val_size=100, train_subset=300, test_subset=50), CPU, seed=4)
    assert torch.equal(same.val.images, data.val.images) and torch.equal(same.train.labels, data.train.labels)
    other = load_data(synthetic_cfg(val_size=100, train_subset=300, test_subset=50), CPU, seed=5)
    assert not torch.equal(other.val.images, data.val.images)
    assert not torch.equal(other.test.images, data.test.images)
    bigger = load_data(synthetic_cfg(val_size=100, train_subset=350), CPU, seed=4)
    assert torch.equal(bigger.val.images, data.val.images)  # the subset never moves the hold-out


@pytest.mark.parametrize("kw,key,allowed", [
    (dict(val_size=500), "dataset.val_size=500", "0..499"),
    (dict(val_size=100, train_subset=401), "dataset.train_subset=401", "0..400"),
    (dict(test_subset=121), "dataset.test_subset=121", "0..120"),
])
def test_split_errors_name_key_and_range(kw, key, allowed):
    with pytest.raises(GrowrunError) as e:
        load_data(synthetic_cfg(**kw), CPU, seed=0)
    msg = one_line(e)
    assert key in msg and allowed in msg


def test_unknown_dataset_name():
    with pytest.raises(GrowrunError) as e:
        load_data(cfg_for(name="imagenet"), CPU, seed=0)
    assert "dataset.name" in one_line(e)


# ---------------------------------------------------------------- synthetic

def test_synthetic_deterministic_shapes_balanced():
    a = make_synthetic(10, 1000, 200, 32, 0.6)
    b = make_synthetic(10, 1000, 200, 32, 0.6)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    xtr, ytr, xte, yte = a
    assert xtr.shape == (1000, 3, 32, 32) and xtr.dtype == torch.uint8 and xte.shape == (200, 3, 32, 32)
    assert torch.bincount(ytr, minlength=10).tolist() == [100] * 10
    assert torch.bincount(yte, minlength=10).tolist() == [20] * 10
    small = make_synthetic(7, 30, 200, 16, 0.6)
    counts = torch.bincount(small[1], minlength=7)
    assert small[0].shape == (30, 3, 16, 16) and int(counts.max() - counts.min()) <= 1
    assert torch.equal(make_synthetic(10, 300, 200, 32, 0.6)[2], xte)  # test set independent of train_size
    d0, d1 = load_data(synthetic_cfg(), CPU, seed=0), load_data(synthetic_cfg(), CPU, seed=1)
    assert torch.equal(d0.train.images, d1.train.images)  # same data for every run seed
    x = d0.train.images.double() / 255
    assert np.allclose(d0.mean, x.mean(dim=(0, 2, 3)).tolist(), atol=1e-9)
    assert np.allclose(d0.std, x.std(dim=(0, 2, 3), unbiased=False).tolist(), atol=1e-6)
    assert d0.input_shape == (3, 32, 32) and d0.num_classes == 10


def ncm_accuracy(xtr, ytr, xte, yte, num_classes):
    means = torch.stack([xtr[ytr == k].float().mean(0) for k in range(num_classes)]).flatten(1)
    return (torch.cdist(xte.float().flatten(1), means).argmin(1) == yte).float().mean().item()


def test_synthetic_learnable_but_not_trivial():
    d = DatasetConfig()  # the defaults: 10 classes, 1024 train, 256 test, noise 0.6
    acc = ncm_accuracy(*make_synthetic(d.num_classes, d.train_size, d.test_size, d.image_size, d.noise), 10)
    assert 0.3 < acc < 0.97, acc  # > 3x chance, yet classes overlap
    clean = ncm_accuracy(*make_synthetic(10, 200, 200, 32, 0.0), 10)
    assert clean == 1.0


@pytest.mark.slow
def test_synthetic_is_fast():
    make_synthetic(10, 100, 10, 32, 0.6)  # warm-up
    t = time.perf_counter()
    make_synthetic(10, 10_000, 10, 32, 0.6)
    assert time.perf_counter() - t < 2.0  # ~0.2 s; generous for a shared CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches():
    split = id_split(150)
    gpu = Split(split.images.cuda(), split.labels.cuda())
    for (x1, y1), (x2, y2) in zip(make_loader(split).epoch(4), make_loader(gpu).epoch(4)):
        assert torch.equal(y1, y2.cpu())
        torch.testing.assert_close(x1, x2.cpu(), rtol=0, atol=1e-6)  # same crops; fp rounding may differ
