"""Small float64 models for surgery tests: the (arch, site) cases of tests/test_surgery.py
(CASES, IDS), a model with non-trivial BN running statistics and its input (make), random neurons
that fit a site (random_neurons). Also used by test_growth_scale.py."""
from __future__ import annotations

import torch

from growrun.models.site import Neurons
from growrun.models import build_model

# (arch, site name). A width-0 site of a VGG or MLP cuts the signal (no residual path), so such
# sites are only grown themselves, never used upstream of the site under test.
CASES = [
    ({"name": "resnet18", "in_channels": 3, "num_classes": 10, "stream": [4, 8, 8, 8], "hidden": [2, 0, 3, 1, 2, 2, 2, 2]}, "layer1.0"),
    ({"name": "resnet18", "in_channels": 3, "num_classes": 10, "stream": [4, 8, 8, 8], "hidden": [2, 0, 3, 1, 2, 2, 2, 2]}, "layer1.1"),
    ({"name": "resnet18", "in_channels": 3, "num_classes": 10, "stream": [4, 8, 8, 8], "hidden": [2, 0, 3, 1, 2, 2, 2, 2]}, "layer2.0"),
    ({"name": "vgg", "in_channels": 3, "num_classes": 5, "stream": [4, 6, 6, 6], "hidden": [2, 3, 1, 2], "batchnorm": True}, "stage2"),
    ({"name": "vgg", "in_channels": 3, "num_classes": 5, "stream": [4, 6, 6, 6], "hidden": [2, 3, 0, 2], "batchnorm": False}, "stage3"),
    ({"name": "mlp", "in_features": 3 * 16 * 16, "num_classes": 5, "hidden": [6, 2], "batchnorm": True}, "fc1"),
    ({"name": "mlp", "in_features": 3 * 16 * 16, "num_classes": 5, "hidden": [6, 0], "batchnorm": True}, "fc2"),
    ({"name": "mlp", "in_features": 3 * 16 * 16, "num_classes": 5, "hidden": [6, 4], "batchnorm": False}, "fc1"),
]
IDS = [f"{a['name']}-bn{a.get('batchnorm', True)}-{s}" for a, s in CASES]


def random_neurons(site, k: int, gen: torch.Generator) -> Neurons:
    w1 = torch.randn(k, *site.l1.weight.shape[1:], generator=gen, dtype=torch.float64)
    b1 = torch.randn(k, generator=gen, dtype=torch.float64) if site.l1.bias is not None else None
    shape = (site.out_width, k, *site.l2.kernel_size) if site.is_conv else (site.out_width, k)
    return Neurons(w1, b1, 0.5 * torch.randn(*shape, generator=gen, dtype=torch.float64))


def make(arch, seed=0):
    torch.manual_seed(seed)
    model = build_model(arch).double()
    x = torch.randn(16, 3, 16, 16, dtype=torch.float64)
    model.train()
    model(x)  # non-trivial BN running stats
    return model, x
