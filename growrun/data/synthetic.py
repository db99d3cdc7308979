"""Synthetic class-conditional images: CIFAR-shaped, learnable, generated in a fraction of a second.

Each class has a smooth template (a random mix of the 4x4 lowest-frequency 2-D cosines per
channel, pixel std TEMPLATE_STD around mid-grey). A sample is its class template plus
`noise` times (a smooth random field of the same kind, pixel std 0.5, plus white noise of pixel
std 0.25), clipped to [0, 1] and stored as uint8. The smooth part of the noise lives in the same
low-frequency space as the templates, so classes overlap: at the default noise=0.6 a
nearest-class-mean classifier gets roughly 75-85% on 10 classes, not 100%.

The data depend only on the sizes and `noise`, never on the run seed: templates, training set and
test set each come from their own fixed stream (so the test set does not change with train_size).
"""
from __future__ import annotations

import math

import torch

FREQS = 4  # low-frequency cosines per axis
TEMPLATE_STD = 0.12  # pixel std of a class template, in [0, 1] units
SMOOTH_NOISE = 0.5  # pixel std of the smooth noise field per unit of `noise`
WHITE_NOISE = 0.25  # pixel std of the white noise per unit of `noise`
_SEED = 20240531  # fixed: the same data for every run
_TEMPLATES, _TRAIN, _TEST = 0, 1, 2  # stream offsets


def cosine_basis(size: int, freqs: int = FREQS) -> torch.Tensor:
    """(freqs**2, size*size) separable DCT-II cosines, each scaled to unit root-mean-square."""
    pos = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    f = torch.stack([torch.cos(math.pi * k * pos) for k in range(freqs)])
    f = f / f.pow(2).mean(1, keepdim=True).sqrt()
    return torch.einsum("ui,vj->uvij", f, f).reshape(freqs * freqs, size * size).float()


def _smooth_fields(n: int, channels: int, basis: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    """(n, channels, size*size) random low-frequency fields with pixel std ~ `std`."""
    k = basis.shape[0]
    return (std / math.sqrt(k)) * torch.randn(n, channels, k, generator=g) @ basis


def _samples(templates: torch.Tensor, n: int, basis: torch.Tensor, noise: float, stream: int):
    num_classes, channels, pixels = templates.shape
    g = torch.Generator().manual_seed(_SEED + stream)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]  # balanced to within one
    x = _smooth_fields(n, channels, basis, noise * SMOOTH_NOISE, g)
    x += templates[labels]
    if noise > 0:
        x.add_(torch.randn(n, channels, pixels, generator=g), alpha=noise * WHITE_NOISE)
    size = math.isqrt(pixels)
    images = x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).view(n, channels, size, size)
    return images, labels


def make_synthetic(num_classes: int, train_size: int, test_size: int, image_size: int, noise: float,
                   channels: int = 3):
    """(train_images, train_labels, test_images, test_labels): uint8 (N, C, S, S) / int64 (N,) CPU tensors."""
    basis = cosine_basis(image_size)
    g = torch.Generator().manual_seed(_SEED + _TEMPLATES)
    templates = 0.5 + _smooth_fields(num_classes, channels, basis, TEMPLATE_STD, g)
    return (*_samples(templates, train_size, basis, noise, _TRAIN),
            *_samples(templates, test_size, basis, noise, _TEST))


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images scaled to [0, 1] (exact integer sums)."""
    c = images.shape[1]
    s1 = torch.zeros(c, dtype=torch.int64)
    s2 = torch.zeros(c, dtype=torch.int64)
    for i in range(0, images.shape[0], chunk):
        x = images[i:i + chunk].to("cpu", torch.int64)
        s1 += x.sum(dim=(0, 2, 3))
        s2 += x.pow(2).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s1.double() / count
    var = (s2.double() / count - mean.pow(2)).clamp_min(0.0)
    std = (var.sqrt() / 255).clamp_min(1e-3)  # a constant channel must not divide by zero
    return tuple((mean / 255).tolist()), tuple(std.tolist())
