"""CIFAR ResNet18 with growable BasicBlocks.

Stem: 3x3 conv (stride 1, pad 1, no bias) -> BN -> ReLU, no max-pool. Four stages of two
BasicBlocks, residual-stream widths `stream` (full: 64, 128, 256, 512), strides 1, 2, 2, 2.
BasicBlock: conv1 3x3 (stride) -> bn1 -> ReLU -> conv2 3x3 -> bn2, plus the shortcut (identity,
or 1x1 conv + BN when the stride or width changes), then ReLU. Global average pool, linear.

Growth sites are the hidden channels of the blocks (conv1 -> bn1 -> ReLU -> conv2), named
layer1.0 ... layer4.1; the residual stream keeps its width. A hidden width of 0 makes the block
its shortcut path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from growrun.models.site import Site
from growrun.models.base import GrowableModel
from growrun.models.layers import BatchNorm2d, Conv2d

FULL_STREAM = [64, 128, 256, 512]
FULL_HIDDEN = [64, 64, 128, 128, 256, 256, 512, 512]
SITE_NAMES = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, hidden: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = Conv2d(c_in, hidden, 3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm2d(hidden)
        self.conv2 = Conv2d(hidden, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(Conv2d(c_in, c_out, 1, stride=stride, bias=False), BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class ResNet18(GrowableModel):
    def __init__(self, stream: list[int], hidden: list[int], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.in_channels, self.num_classes, self.stream = in_channels, num_classes, list(stream)
        self.conv1 = Conv2d(in_channels, stream[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = BatchNorm2d(stream[0])
        c_in = stream[0]
        for s in range(4):
            blocks = []
            for b in range(2):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(BasicBlock(c_in, hidden[2 * s + b], stream[s], stride))
                c_in = stream[s]
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(stream[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.weight.numel():
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward_to(self, site: str, x: torch.Tensor) -> torch.Tensor:
        """The input of the site's block."""
        x = F.relu(self.bn1(self.conv1(x)))
        for name in SITE_NAMES[: SITE_NAMES.index(site)]:
            x = self._block(name)(x)
        return x

    def forward_between(self, start: str, stop: str, z: torch.Tensor) -> torch.Tensor:
        for name in SITE_NAMES[SITE_NAMES.index(start): SITE_NAMES.index(stop)]:
            z = self._block(name)(z)
        return z

    def forward_from(self, site: str, z: torch.Tensor) -> torch.Tensor:
        for name in SITE_NAMES[SITE_NAMES.index(site):]:
            z = self._block(name)(z)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))

    def site_names(self) -> list[str]:
        return list(SITE_NAMES)

    def _block(self, name: str) -> BasicBlock:
        stage, index = name.split(".")
        return getattr(self, stage)[int(index)]

    def _site(self, name: str) -> Site:
        block = self._block(name)
        return Site(name, block.conv1, block.conv2, block.bn1, "relu")

    def arch(self) -> dict:
        return {"name": "resnet18", "in_channels": self.in_channels, "num_classes": self.num_classes,
                "stream": list(self.stream), "hidden": [self._block(n).conv1.out_channels for n in SITE_NAMES]}
