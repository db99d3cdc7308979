"""Layers that accept a width of 0, so that a growth site can start empty (block = identity).

torch's Conv2d refuses 0 output channels (and returns the wrong shape for 0 input channels)
and BatchNorm refuses 0 features; Linear copes but warns at init. These subclasses keep the torch types (isinstance checks, state_dict keys, hooks) and
only special-case the empty widths.

`conv2d` also steers clear of a oneDNN defect: on AVX2 kernels (AVX2-only x86 CPUs, or any x86
CPU with ONEDNN_MAX_CPU_ISA=AVX2), the backward of a 1x1, stride-2, unpadded convolution with
2-7 input channels in channels_last format corrupts the heap (SIGSEGV, "double free", or a
hang with 2 threads; torch 2.14.1, oneDNN v3.12; 1, 8-33 channels, stride 1 or 3, 3x3
kernels and NCHW were fine). Such a convolution is computed as the 1x1 stride-1 convolution of
the subsampled input, conv(x, stride s) = conv(x[..., ::s, ::s], stride 1): the same sums.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear without the zero-element init warning when a width is 0 (torch copes otherwise)."""

    def reset_parameters(self) -> None:
        if self.weight.numel():
            super().reset_parameters()
        elif self.bias is not None:
            nn.init.zeros_(self.bias)


UNSAFE_CHANNELS = range(2, 8)  # measured crash range of the oneDNN defect above (8: block width)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding) -> torch.Tensor:
    """F.conv2d (groups 1, dilation 1) that never runs the crashing oneDNN kernel (module doc)."""
    s, p = _pair(stride), _pair(padding)  # padding may also be a string ("same", "valid")
    if (weight.shape[-2:] == (1, 1) and s != (1, 1) and p in ((0, 0), ("valid", "valid"))
            and weight.shape[1] in UNSAFE_CHANNELS and x.device.type == "cpu"):
        return F.conv2d(x[..., :: s[0], :: s[1]], weight, bias)
    return F.conv2d(x, weight, bias, stride, padding)


class Conv2d(nn.Conv2d):
    """nn.Conv2d that also works with in_channels == 0 or out_channels == 0."""

    def reset_parameters(self) -> None:
        if self.weight.numel():
            super().reset_parameters()
        elif self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.numel():
            if self.groups != 1 or self.dilation != (1, 1):
                return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
            return conv2d(x, self.weight, self.bias, self.stride, self.padding)
        # Empty input or output: F.conv2d would refuse or return the wrong shape. The output is
        # the bias (or 0), tied to the weight so that autograd hooks on it see a graph node.
        h, w = x.shape[-2:]
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        out = x.new_zeros(x.shape[0], self.out_channels, (h + 2 * ph - kh) // sh + 1,
                          (w + 2 * pw - kw) // sw + 1) + self.weight.sum()
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that is the identity on 0 channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.num_features == 0 else super().forward(x)


class BatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d that is the identity on 0 features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.num_features == 0 else super().forward(x)
