"""A multilayer perceptron on flattened images; every hidden layer is a growth site.

flatten -> Linear(D, h1) -> [BN1d] -> ReLU -> ... -> Linear(hL, C). Site fcI is the I-th hidden
layer: L1 = the Linear producing it, L2 = the next Linear (both with bias).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from growrun.models.site import Site
from growrun.models.base import GrowableModel
from growrun.models.layers import BatchNorm1d, Linear


class MLP(GrowableModel):
    def __init__(self, in_features: int, hidden: list[int], num_classes: int = 10, batchnorm: bool = True):
        super().__init__()
        self.in_features, self.num_classes, self.batchnorm = in_features, num_classes, batchnorm
        widths = [in_features, *hidden, num_classes]
        self.linears = nn.ModuleList(Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(BatchNorm1d(h) for h in hidden) if batchnorm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from("fc1", torch.flatten(x, 1))

    def _hidden(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = self.linears[i](x)
        return F.relu(self.norms[i](x) if self.norms is not None else x)

    def forward_to(self, site: str, x: torch.Tensor) -> torch.Tensor:
        """The input of the site's L1 (flattened)."""
        x = torch.flatten(x, 1)
        for i in range(int(site[2:]) - 1):
            x = self._hidden(i, x)
        return x

    def forward_between(self, start: str, stop: str, z: torch.Tensor) -> torch.Tensor:
        for i in range(int(start[2:]) - 1, int(stop[2:]) - 1):
            z = self._hidden(i, z)
        return z

    def forward_from(self, site: str, z: torch.Tensor) -> torch.Tensor:
        for i in range(int(site[2:]) - 1, len(self.linears) - 1):
            z = self._hidden(i, z)
        return self.linears[-1](z)

    def site_names(self) -> list[str]:
        return [f"fc{i + 1}" for i in range(len(self.linears) - 1)]

    def _site(self, name: str) -> Site:
        i = int(name[2:]) - 1
        bn = self.norms[i] if self.norms is not None else None
        return Site(name, self.linears[i], self.linears[i + 1], bn, "relu")

    def arch(self) -> dict:
        return {"name": "mlp", "in_features": self.in_features, "num_classes": self.num_classes,
                "hidden": [lin.out_features for lin in self.linears[:-1]], "batchnorm": self.batchnorm}
