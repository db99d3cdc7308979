"""Growable models: architectures from config, rebuild from arch(), FLOP counts, width 0."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from growrun.errors import GrowrunError
from growrun.models import build_model, count_flops, count_params, full_site_widths, initial_arch


def model_cfg(name, **kw):
    base = dict(name=name, width=1.0, start_fraction=None, site_widths=None, hidden=[32, 16], batchnorm=True)
    return SimpleNamespace(**{**base, **kw})


def test_initial_arch_widths():
    arch = initial_arch(model_cfg("resnet18", width=0.25, start_fraction=1 / 64), 10, (3, 32, 32))
    assert arch["stream"] == [16, 32, 64, 128]
    assert arch["hidden"] == [1, 1, 2, 2, 4, 4, 8, 8]
    assert initial_arch(model_cfg("resnet18", width=0.25), 10, (3, 32, 32))["hidden"] == [16, 16, 32, 32, 64, 64,
                                                                                      128, 128]
    arch = initial_arch(model_cfg("vgg", width=0.5, site_widths=[0, 3, 5, 7]), 100, (3, 32, 32))
    assert arch["stream"] == [32, 64, 128, 256] and arch["hidden"] == [0, 3, 5, 7] and arch["num_classes"] == 100
    arch = initial_arch(model_cfg("mlp", start_fraction=0.25), 10, (3, 8, 8))
    assert arch["in_features"] == 192 and arch["hidden"] == [8, 4]
    assert full_site_widths(arch, model_cfg("mlp")) == [32, 16]
    assert full_site_widths(initial_arch(model_cfg("resnet18"), 10, (3, 32, 32)))[-1] == 512


def test_bad_site_widths_and_name_are_one_line_errors():
    with pytest.raises(GrowrunError, match="model.site_widths"):
        initial_arch(model_cfg("resnet18", site_widths=[1, 2]), 10, (3, 32, 32))
    with pytest.raises(GrowrunError, match="model.name"):
        initial_arch(model_cfg("alexnet"), 10, (3, 32, 32))


ARCHS = [
    {"name": "resnet18", "in_channels": 3, "num_classes": 10, "stream": [8, 16, 16, 32], "hidden": [2, 0, 3, 1, 4, 0, 2, 5]},
    {"name": "vgg", "in_channels": 3, "num_classes": 7, "stream": [4, 8, 8, 8], "hidden": [0, 3, 2, 4], "batchnorm": True},
    {"name": "vgg", "in_channels": 3, "num_classes": 7, "stream": [4, 8, 8, 8], "hidden": [2, 3, 0, 4], "batchnorm": False},
    {"name": "mlp", "in_features": 3 * 16 * 16, "num_classes": 5, "hidden": [6, 0, 4], "batchnorm": True},
    {"name": "mlp", "in_features": 3 * 16 * 16, "num_classes": 5, "hidden": [6, 3], "batchnorm": False},
]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"{a['name']}-{a['hidden']}")
def test_rebuild_from_arch_reproduces_the_model(arch):
    torch.manual_seed(0)
    model = build_model(arch)
    x = torch.randn(4, 3, 16, 16)
    model.train()
    model(x)  # move BN running stats away from their init
    model.eval()
    twin = build_model(model.arch())
    twin.load_state_dict(model.state_dict())
    twin.eval()
    assert model.arch() == arch
    assert torch.equal(model(x), twin(x))
    assert [s.width for s in model.sites().values()] == arch["hidden"]
    assert model(x).shape == (4, arch["num_classes"])


def test_site_names_and_modules():
    model = build_model(ARCHS[0])
    names = list(model.sites())
    assert names == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    site = model.sites()["layer2.0"]
    assert site.l1 is model.layer2[0].conv1 and site.l2 is model.layer2[0].conv2 and site.bn is model.layer2[0].bn1
    assert site.l1.stride == (2, 2) and site.is_conv
    assert list(build_model(ARCHS[3]).sites()) == ["fc1", "fc2", "fc3"]
    assert list(build_model(ARCHS[1]).sites()) == ["stage1", "stage2", "stage3", "stage4"]


def test_flops_match_analytic_counts():
    mlp = build_model(ARCHS[4])
    assert count_flops(mlp, (3, 16, 16)) == 2 * (768 * 6 + 6 * 3 + 3 * 5)
    vgg = build_model(ARCHS[2])
    expected, c_in, res = 0, 3, 32
    for h, s in zip(ARCHS[2]["hidden"], ARCHS[2]["stream"]):
        expected += 2 * res * res * 9 * (c_in * h + h * s)
        c_in, res = s, res // 2
    expected += 2 * 8 * 7
    assert count_flops(vgg, (3, 32, 32)) == expected
    assert count_params(mlp) == 768 * 6 + 6 + 6 * 3 + 3 + 3 * 5 + 5


def test_width_zero_block_is_its_shortcut():
    model = build_model(ARCHS[0]).eval()
    block = model.layer1[1]  # hidden width 0, identity shortcut
    x = torch.rand(2, 8, 16, 16)  # non-negative, like the output of the previous block's ReLU
    assert torch.equal(block(x), x)
    block = model.layer3[1]
    assert torch.equal(block(x[:, :, :4, :4].repeat(1, 2, 1, 1)), x[:, :, :4, :4].repeat(1, 2, 1, 1))


@pytest.mark.parametrize("cin", [1, 2, 5, 7, 8])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("padding", [0, "valid"])
def test_strided_1x1_conv_rewrite_is_the_same_convolution(cin, fmt, padding):
    """growrun's Conv2d computes 1x1 stride-2 convs with 2-7 input channels on the subsampled
    input (a oneDNN crash guard): outputs and gradients equal torch's own convolution."""
    from growrun.models.layers import Conv2d

    torch.manual_seed(cin)
    conv = Conv2d(cin, 6, 1, stride=2, padding=padding, bias=True).double()
    x = torch.randn(4, cin, 9, 10, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    conv.to(memory_format=fmt)
    out = conv(x)
    ref_x = x.detach().clone().requires_grad_()
    ref = torch.nn.functional.conv2d(ref_x, conv.weight.detach(), conv.bias.detach(), 2)
    assert out.shape == ref.shape == (4, 6, 5, 5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,kw", [("resnet18", dict(width=0.125, start_fraction=1 / 32)),
                                     ("vgg", dict(width=0.125, site_widths=[0, 3, 5, 7])),
                                     ("mlp", dict(hidden=[5, 0, 4]))])
def test_cut_before_a_site_is_the_same_forward(name, kw):
    """forward(x) == forward_from(s, forward_to(s, x)) bit for bit, every site, train and eval
    mode (what growth's line search relies on to skip the network's front), likewise
    forward_between(a, b, forward_to(a, x)) == forward_to(b, x); the FLOPs of the
    front grow along the network and stay below the whole."""
    torch.manual_seed(0)
    model = build_model(initial_arch(model_cfg(name, **kw), 10, (3, 16, 16)))
    x = torch.randn(6, 3, 16, 16)
    total, fronts = count_flops(model, (3, 16, 16)), []
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            ref = model(x)
            for site in model.site_names():
                assert torch.equal(model.forward_from(site, model.forward_to(site, x)), ref), (site, train)
            names = model.site_names()  # and forward_to(b) from forward_to(a), a <= b: the same
            for i, a in enumerate(names):
                for b in names[i:]:
                    got = model.forward_between(a, b, model.forward_to(a, x))
                    assert torch.equal(got, model.forward_to(b, x)), (a, b, train)
    for site in model.site_names():
        fronts.append(count_flops(model, (3, 16, 16), forward=lambda t, s=site: model.forward_to(s, t)))
    assert fronts == sorted(fronts) and fronts[0] < fronts[-1] < total
