"""A growth site: two consecutive weight layers with a nonlinearity between them.

    x --L1--> z --[BN]--> act --> h --L2--> a

Growing the site by K neurons appends K output units to L1 (rows of W1 and bias entries; for
conv, K output channels with full kernels), K channels to the BatchNorm, and K input units to
L2 (columns of W2; for conv, K input channels).  Nothing else in the network changes shape.
See ../shared/docs/tiny_math.md, section 1.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

ACTIVATIONS = ("relu", "identity")


@dataclass(eq=False)
class Site:
    """References to the modules of one growth site inside a model (nothing is copied).

    l1, l2: both nn.Linear or both nn.Conv2d (subclasses allowed, groups=1, dilation=1).
    bn: BatchNorm1d/2d over L1's outputs, or None.
    activation: "relu" (slope s0 = 1 at 0+) or "identity" (exactly linear; used by tests).
    """

    name: str
    l1: nn.Module
    l2: nn.Module
    bn: nn.Module | None = None
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"site {self.name}: activation={self.activation!r}; allowed: {ACTIVATIONS}")
        conv = isinstance(self.l1, nn.Conv2d)
        if conv != isinstance(self.l2, nn.Conv2d):
            raise TypeError(f"site {self.name}: L1 and L2 must both be Linear or both Conv2d")

    @property
    def is_conv(self) -> bool:
        return isinstance(self.l1, nn.Conv2d)

    @property
    def width(self) -> int:
        """Current number of neurons (L1 outputs = L2 inputs)."""
        return self.l1.out_channels if self.is_conv else self.l1.out_features

    @property
    def out_width(self) -> int:
        """Number of outputs of L2 (the dimension of g)."""
        return self.l2.out_channels if self.is_conv else self.l2.out_features

    def params_per_neuron(self) -> int:
        """Parameters one new neuron adds: its L1 row (+bias), BN affine pair, its L2 column."""
        w1 = self.l1.weight[0].numel() if self.width else _fan_in(self.l1)
        w2 = self.out_width * (self.l2.kernel_size[0] * self.l2.kernel_size[1] if self.is_conv else 1)
        bias = 1 if self.l1.bias is not None else 0
        bn = 2 if self.bn is not None and getattr(self.bn, "affine", False) else 0
        return w1 + bias + bn + w2


def _fan_in(layer: nn.Module) -> int:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    return layer.in_features


@contextmanager
def frozen_bn_stats(model: nn.Module):
    """Run forward passes (train or eval mode) without changing any BatchNorm running stats."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(bns, saved):
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)


@dataclass(eq=False)
class Neurons:
    """K new neurons of a site, in the layers' own shapes, at amplitude 1.

    w1: (K, *l1.weight.shape[1:])  fan-in rows of L1 (conv: (K, C_in, kh, kw))
    b1: (K,) or None               L1 bias entries (present iff L1 has a bias)
    w2: (l2.out, K, *l2.kernel)    fan-out columns of L2 (linear: (l2.out, K))
    Inserted at amplitude gamma, the site gets (gamma * w1, gamma * b1, gamma * w2).
    """

    w1: torch.Tensor
    b1: torch.Tensor | None
    w2: torch.Tensor

    @property
    def count(self) -> int:
        return self.w1.shape[0]

    def take(self, k: int) -> "Neurons":
        """The first k neurons."""
        return Neurons(self.w1[:k], None if self.b1 is None else self.b1[:k], self.w2[:, :k])

    def scaled(self, gamma: float) -> "Neurons":
        b1 = None if self.b1 is None else gamma * self.b1
        return Neurons(gamma * self.w1, b1, gamma * self.w2)
