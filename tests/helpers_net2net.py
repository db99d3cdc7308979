"""The models and runs of tests/test_net2net.py, also used by test_splitting.py: an MLP and a
ResNet18 arch (MLP, RESNET) and a float64 model of one with its batch (make); the overrides of a
short synthetic net2net run (BASE) and of its two models (RESNET_RUN, MLP_RUN)."""
from __future__ import annotations

import torch

from growrun.models import build_model

MLP = {"name": "mlp", "in_features": 3 * 8 * 8, "num_classes": 5, "hidden": [6, 4], "batchnorm": True}
RESNET = {"name": "resnet18", "in_channels": 3, "num_classes": 10, "stream": [4, 8, 8, 8],
          "hidden": [3, 1, 2, 1, 2, 2, 2, 2]}


def make(arch, seed=0):
    """A float64 model with non-trivial BatchNorm parameters and running statistics."""
    torch.manual_seed(seed)
    model = build_model(arch).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    y = torch.randint(0, arch["num_classes"], (16,), generator=torch.Generator().manual_seed(seed + 2))
    model.train()
    with torch.no_grad():
        model(x)  # running statistics away from their initial values
    return model, x, y


BASE = ["dataset=synthetic", "dataset.train_size=64", "dataset.test_size=32", "trainer.batch_size=32",
        "trainer.eval_batch_size=64", "trainer.epochs=3", "trainer.threads=1", "trainer.progress=off",
        "optim.lr=0.05", "growth=net2net", "growth.first_epoch=1", "growth.dt=0.5", "growth.steps=2"]
RESNET_RUN = ["model=resnet18", "model.width=0.0625", "dataset.image_size=8",
              "model.site_widths=[1,1,1,1,1,1,1,2]", "growth.target_widths=[3,1,1,2,1,1,1,4]"]
MLP_RUN = ["model=mlp", "model.hidden=[16,16]", "dataset.image_size=8", "model.site_widths=[2,3]",
           "growth.target_widths=[6,7]"]
