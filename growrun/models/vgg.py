"""A VGG-style CNN with growable stages.

Four stages; stage i: conv_a 3x3 (-> hidden_i) -> [BN] -> ReLU -> conv_b 3x3 (-> stream_i) ->
[BN] -> ReLU -> MaxPool 2. Then global average pool and a linear classifier. Full widths:
stream 64, 128, 256, 512 and hidden 64, 128, 256, 512. Convs carry a bias only without BN.
Growth sites are the inner channels of each stage, stage1 ... stage4 (conv_a -> BN -> conv_b).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from growrun.models.site import Site
from growrun.models.base import GrowableModel
from growrun.models.layers import BatchNorm2d, Conv2d

FULL_STREAM = [64, 128, 256, 512]
FULL_HIDDEN = [64, 128, 256, 512]
SITE_NAMES = [f"stage{i}" for i in range(1, 5)]


class Stage(nn.Module):
    def __init__(self, c_in: int, hidden: int, c_out: int, batchnorm: bool):
        super().__init__()
        self.conv_a = Conv2d(c_in, hidden, 3, padding=1, bias=not batchnorm)
        self.bn_a = BatchNorm2d(hidden) if batchnorm else None
        self.conv_b = Conv2d(hidden, c_out, 3, padding=1, bias=not batchnorm)
        self.bn_b = BatchNorm2d(c_out) if batchnorm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_a(x)
        x = F.relu(self.bn_a(x) if self.bn_a is not None else x)
        x = self.conv_b(x)
        x = F.relu(self.bn_b(x) if self.bn_b is not None else x)
        return F.max_pool2d(x, 2)


class VGG(GrowableModel):
    def __init__(self, stream: list[int], hidden: list[int], num_classes: int = 10, in_channels: int = 3,
                 batchnorm: bool = True):
        super().__init__()
        self.in_channels, self.num_classes, self.stream, self.batchnorm = in_channels, num_classes, list(stream), batchnorm
        c_in = in_channels
        self.stages = nn.ModuleList()
        for h, s in zip(hidden, stream):
            self.stages.append(Stage(c_in, h, s, batchnorm))
            c_in = s
        self.fc = nn.Linear(stream[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.weight.numel():
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward_to(self, site: str, x: torch.Tensor) -> torch.Tensor:
        """The input of the site's stage."""
        for stage in self.stages[: SITE_NAMES.index(site)]:
            x = stage(x)
        return x

    def forward_between(self, start: str, stop: str, z: torch.Tensor) -> torch.Tensor:
        for stage in self.stages[SITE_NAMES.index(start): SITE_NAMES.index(stop)]:
            z = stage(z)
        return z

    def forward_from(self, site: str, z: torch.Tensor) -> torch.Tensor:
        for stage in self.stages[SITE_NAMES.index(site):]:
            z = stage(z)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))

    def site_names(self) -> list[str]:
        return list(SITE_NAMES)

    def _site(self, name: str) -> Site:
        stage = self.stages[SITE_NAMES.index(name)]
        return Site(name, stage.conv_a, stage.conv_b, stage.bn_a, "relu")

    def arch(self) -> dict:
        return {"name": "vgg", "in_channels": self.in_channels, "num_classes": self.num_classes,
                "stream": list(self.stream), "hidden": [s.conv_a.out_channels for s in self.stages],
                "batchnorm": self.batchnorm}
