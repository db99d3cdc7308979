"""Layers that accept a width of 0, so that a growth site can start empty (block = identity).

torch's Conv2d refuses 0 output channels (and returns the wrong shape for 0 input channels)
and BatchNorm refuses 0 features; Linear copes but warns at init. These subclasses keep the torch types (isinstance checks, state_dict keys, hooks) and
only special-case the empty widths.
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


class Conv2d(nn.Conv2d):
    """nn.Conv2d that also works with in_channels == 0 or out_channels == 0."""

    def reset_parameters(self) -> None:
        if self.weight.numel():
            super().reset_parameters()
        elif self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.numel():
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
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
