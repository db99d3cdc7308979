"""Network surgery: insert neurons into a site in place, and try them out before inserting.

insert_neurons  appends K neurons: rows of W1 (+ bias), BatchNorm channels, and columns of W2.
                The optimizer keeps the state of existing entries; new entries start at zero.
                BN channels (running mean/var = the new channels' measured mean m / variance v):
                  bn_init="identity" (tiny_math.md section 5): BN is the identity on the new
                    channels, weight = sqrt(v + eps), bias = m;
                  bn_init="unit": the same function rescaled to BN weight 1: weight = 1,
                    bias = m / sqrt(v + eps), and the new W2 columns multiplied by sqrt(v + eps).
                    Exact because sigma(s u) = s sigma(u) for s > 0 (relu, identity). The new
                    channels then start at the scale of a freshly initialised BN channel instead
                    of gamma * sqrt(v), often 10x below the existing channels.
                A constant channel (v = 0: GradMax's zero fan-in) gets weight 1, bias m either way.
candidate       makes the model compute what it would compute after insert_neurons at amplitude
                gamma, with forward hooks only (no module is rebuilt), for the line search.
new_channel_moments  the mean and variance of the new pre-activations z = L1op(x; w1, b1).
apply_weight_update  L2 += scale * dW2* (the best update of the existing weights).
fit_to_site     zero-pads neurons computed before a neighbouring site grew.
insert_copies   net2net (Net2WiderNet): L2's existing weight replaced by the split fan-outs, then
                the copies appended with BatchNorm channels that copy their originals' weight,
                bias and running mean / variance (insert_neurons(bn_copy=...)): in training mode
                a copy's batch statistics are its original's, in eval mode its running ones, so
                it computes the original's activation either way. bn_init does not apply.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from growrun.models.site import Neurons, Site, frozen_bn_stats
from growrun.models.layers import conv2d


def l1_op(site: Site, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None) -> torch.Tensor:
    """The new neurons' pre-activations: L1's operation with their fan-in."""
    if site.is_conv:
        return conv2d(x, w1, b1, site.l1.stride, site.l1.padding)
    return F.linear(x, w1, b1)


def l2_op(site: Site, h: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The new neurons' contribution to L2's output (no bias: L2's bias is already there)."""
    if site.is_conv:
        return conv2d(h, w2, None, site.l2.stride, site.l2.padding)
    return F.linear(h, w2)


def _activation(site: Site, z: torch.Tensor) -> torch.Tensor:
    return F.relu(z) if site.activation == "relu" else z


BN_INITS = ("unit", "identity")
HOMOGENEOUS = ("relu", "identity")  # sigma(s u) = s sigma(u) for s > 0


def _new_bn_params(site: Site, mean: torch.Tensor, var: torch.Tensor, bn_init: str):
    """(weight, bias, fan-out scale per new channel) for new BN channels of this mean/variance
    (module doc). A constant channel (var = 0) outputs `bias` whatever the weight, so it gets
    BN's own initial weight 1: with sqrt(eps) it would stay ~300x down-scaled once its fan-in
    starts learning (GradMax's new channels ended training at weight 0.003, unused)."""
    if bn_init not in BN_INITS:
        raise ValueError(f"bn_init={bn_init!r}; allowed: {', '.join(BN_INITS)}")
    scale = torch.where(var > 0, (var + site.bn.eps).sqrt(), torch.ones_like(var))
    if bn_init == "unit" and site.bn.affine and site.activation in HOMOGENEOUS:
        return torch.ones_like(var), mean / scale, scale
    return scale, mean, torch.ones_like(var)


def fanout_scale(site: Site, mean: torch.Tensor | None, var: torch.Tensor | None, bn_init: str) -> torch.Tensor | None:
    """The factor insert_neurons applies to each new W2 column for new channels of these moments
    (bn_init=unit on an affine BatchNorm: sqrt(var + eps), 1 for a constant channel), or None."""
    if site.bn is None or not site.bn.affine or mean is None:
        return None
    return _new_bn_params(site, mean, var, bn_init)[2]


def _scale_fanout(w2: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """W2 columns (dim 1) of the new channels times their per-channel scale."""
    if scale is None:
        return w2
    return w2 * scale.to(w2).view(1, -1, *([1] * (w2.dim() - 2)))


@torch.no_grad()
def insert_neurons(site: Site, neurons: Neurons, bn_mean: torch.Tensor | None = None,
                   bn_var: torch.Tensor | None = None, optimizer: torch.optim.Optimizer | None = None,
                   bn_init: str = "unit", bn_copy: torch.Tensor | None = None,
                   bn_weight: torch.Tensor | None = None) -> None:
    """Append `neurons` (already scaled by gamma; moments by gamma and gamma^2) to the site.
    bn_copy (int64, one per neuron; then no moments): the new BatchNorm channels copy these
    existing channels' weight, bias and running statistics (net2net), the fan-out as given.
    bn_weight (one rho_k > 0 per neuron, affine BatchNorm only): the new channels' BN weight and
    bias times rho_k and their W2 columns divided by it, the same function for relu / identity
    (growth.normalize=fan_out, growrun.growth.scale)."""
    k = neurons.count
    l1, l2, bn = site.l1, site.l2, site.bn
    ref = l1.weight
    w1 = neurons.w1.to(ref)
    fanout_scale = None
    if bn_weight is not None and (bn is None or not bn.affine or bn_copy is not None):
        raise ValueError(f"site {site.name}: bn_weight needs new affine BatchNorm channels")
    _grow(l1, "weight", w1, 0, optimizer)
    if l1.bias is not None:
        b1 = neurons.b1 if neurons.b1 is not None else torch.zeros(k)
        _grow(l1, "bias", b1.to(ref), 0, optimizer)
    if bn is not None and bn_copy is not None:
        _copy_bn_channels(bn, bn_copy, optimizer)
    elif bn is not None:
        _require_moments(site, bn_mean, bn_var)
        mean, var = bn_mean.to(ref), bn_var.to(ref)
        if bn.affine:
            weight, bias, fanout_scale = _new_bn_params(site, mean, var, bn_init)
            if bn_weight is not None:
                rho = bn_weight.to(ref)
                weight, bias, fanout_scale = weight * rho, bias * rho, fanout_scale / rho
            _grow(bn, "weight", weight, 0, optimizer)
            _grow(bn, "bias", bias, 0, optimizer)
        if bn.track_running_stats:
            bn.running_mean = torch.cat([bn.running_mean, mean])
            bn.running_var = torch.cat([bn.running_var, var])
        bn.num_features += k
    _grow(l2, "weight", _scale_fanout(neurons.w2.to(ref), fanout_scale), 1, optimizer)
    if site.is_conv:
        l1.out_channels += k
        l2.in_channels += k
    else:
        l1.out_features += k
        l2.in_features += k


def _copy_bn_channels(bn: nn.Module, sources: torch.Tensor, optimizer) -> None:
    """Append to `bn` copies of its channels `sources` (affine parameters and running stats)."""
    k = sources.numel()
    if bn.affine:
        idx = sources.to(bn.weight.device, torch.long)
        _grow(bn, "weight", bn.weight.detach().index_select(0, idx), 0, optimizer)
        _grow(bn, "bias", bn.bias.detach().index_select(0, idx), 0, optimizer)
    if bn.track_running_stats and bn.running_mean is not None:
        idx = sources.to(bn.running_mean.device, torch.long)
        bn.running_mean = torch.cat([bn.running_mean, bn.running_mean.index_select(0, idx)])
        bn.running_var = torch.cat([bn.running_var, bn.running_var.index_select(0, idx)])
    bn.num_features += k


@torch.no_grad()
def insert_copies(site: Site, sources: torch.Tensor, neurons: Neurons, l2_weight: torch.Tensor,
                  optimizer: torch.optim.Optimizer | None = None) -> None:
    """net2net: set L2's existing weight to `l2_weight` (the originals' fan-outs split among their
    replicas) and append `neurons`, copies of the neurons `sources`, with copied BatchNorm
    channels (growrun.growth.neurons.net2net_copies computes both from the current weights).
    Optimizer state as for every insertion: existing entries keep theirs (a split column's
    momentum too: its gradient h_j g does not depend on its value), new entries start at zero."""
    site.l2.weight.copy_(l2_weight.to(site.l2.weight))
    insert_neurons(site, neurons, optimizer=optimizer, bn_copy=sources)


def _require_moments(site: Site, mean, var) -> None:
    if mean is None or var is None:
        raise ValueError(f"site {site.name} has BatchNorm: the new channels' mean and variance are needed "
                         "(new_channel_moments)")


def _grow(module: nn.Module, name: str, extra: torch.Tensor, dim: int,
          optimizer: torch.optim.Optimizer | None) -> None:
    old = getattr(module, name)
    new = nn.Parameter(torch.cat([old.detach(), extra], dim), requires_grad=old.requires_grad)
    setattr(module, name, new)
    if optimizer is not None:
        replace_parameter(optimizer, old, new, dim)


def replace_parameter(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, dim: int) -> None:
    """Put `new` where `old` was in the optimizer; per-entry state is copied for the old entries
    and zero for the appended ones (along `dim`); scalar state (e.g. Adam's step) is kept."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    grown = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            pad_shape = list(value.shape)
            pad_shape[dim] = new.shape[dim] - old.shape[dim]
            value = torch.cat([value, value.new_zeros(pad_shape)], dim)
        grown[key] = value
    optimizer.state[new] = grown


@torch.no_grad()
def apply_weight_update(site: Site, dw2: torch.Tensor, db2: torch.Tensor | None, scale: float) -> None:
    """L2.weight += scale * dw2 (and L2.bias += scale * db2), in place. dW2* was computed for
    L2 before this event's insertions: it updates the leading block of dw2's shape (the existing
    neurons' columns); columns (and rows) inserted since keep their values."""
    weight = site.l2.weight
    weight[tuple(slice(0, n) for n in dw2.shape)].add_(dw2.to(weight), alpha=scale)
    if db2 is not None and site.l2.bias is not None:
        site.l2.bias[: db2.shape[0]].add_(db2.to(site.l2.bias), alpha=scale)


def weight_update_fn(site: Site, dw2: torch.Tensor, db2: torch.Tensor | None):
    """update(scale): L2's weight (and bias) set to their values now plus scale * dW2* (the line
    search's candidate hook for growth.apply_dw; scale 0 restores them)."""
    w0 = site.l2.weight.detach().clone()
    b0 = None if site.l2.bias is None else site.l2.bias.detach().clone()

    @torch.no_grad()
    def update(scale: float) -> None:
        site.l2.weight.copy_(w0)
        if b0 is not None:
            site.l2.bias.copy_(b0)
        if scale:
            apply_weight_update(site, dw2, db2, scale)

    return update


def fit_to_site(site: Site, neurons: Neurons) -> Neurons:
    """The neurons with zero fan-in entries for L1 inputs and zero fan-out rows for L2 outputs
    that were added after they were computed (a neighbouring site grown earlier in the same
    event: in an MLP, site fcI's L2 is site fcI+1's L1). The added units then neither feed the
    new neurons nor receive from them; for unchanged layers the neurons are returned as is."""
    w1, w2 = neurons.w1, neurons.w2
    fan_in = site.l1.weight.shape[1]
    if w1.shape[1] < fan_in:
        w1 = torch.cat([w1, w1.new_zeros(w1.shape[0], fan_in - w1.shape[1], *w1.shape[2:])], 1)
    if w2.shape[0] < site.out_width:
        w2 = torch.cat([w2, w2.new_zeros(site.out_width - w2.shape[0], *w2.shape[1:])], 0)
    return neurons if (w1 is neurons.w1 and w2 is neurons.w2) else Neurons(w1, neurons.b1, w2)


class _Stop(Exception):
    """Raised from a hook to end a forward pass once what was needed is measured."""


@torch.no_grad()
def new_channel_moments(model: nn.Module, site: Site, neurons: Neurons,
                        batches: Iterable[torch.Tensor], forward=None,
                        reduce: Callable[[list], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron mean and biased variance of z = L1op(x; w1, b1) over all samples and positions,
    x being L1's input when `model` (in its current mode) runs on `batches` (through `forward`,
    default the model, e.g. the part of it from the site's block on). Nothing changes. reduce:
    sums the (count, sum, sum of squares) across processes in place (each holds a share of the
    batches: every rank then inserts the same BatchNorm), None in one process."""
    acc: list[torch.Tensor] = []

    def hook(_module, inputs, _output):
        z = l1_op(site, inputs[0], neurons.w1.to(inputs[0]), None if neurons.b1 is None else neurons.b1.to(inputs[0]))
        z = z.double().transpose(0, 1).reshape(z.shape[1], -1)
        stats = torch.stack([z.new_full((z.shape[0],), z.shape[1]), z.sum(1), (z * z).sum(1)])
        acc.append(stats if not acc else acc.pop() + stats)
        raise _Stop

    handle = site.l1.register_forward_hook(hook)
    try:
        with frozen_bn_stats(model):
            for x in batches:
                try:
                    (forward or model)(x)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if not acc:
        raise ValueError("new_channel_moments: no batches")
    if reduce is not None:
        reduce(acc)
    count, s1, s2 = acc[0]
    mean = s1 / count
    var = (s2 / count - mean * mean).clamp_min(0.0)
    dtype = site.l1.weight.dtype
    return mean.to(dtype), var.to(dtype)


class CandidateHandle:
    """The neurons attached to the site by `candidate`; set .gamma between forward passes."""

    def __init__(self, site: Site, neurons: Neurons, bn_mean, bn_var, bn_init: str):
        self.site, self.neurons, self.bn_mean, self.bn_var = site, neurons, bn_mean, bn_var
        self.bn_init = bn_init
        self.gamma = 0.0
        self._x: torch.Tensor | None = None

    def _capture(self, _module, inputs, _output) -> None:
        self._x = inputs[0]

    def _add(self, _module, _inputs, output: torch.Tensor):
        x, self._x = self._x, None
        if self.gamma == 0.0 or self.neurons.count == 0:
            return None
        g, site, nr = self.gamma, self.site, self.neurons
        z = l1_op(site, x, g * nr.w1.to(x), None if nr.b1 is None else g * nr.b1.to(x))
        bn, w2 = site.bn, g * nr.w2.to(z)
        if bn is not None:
            mean, var = g * self.bn_mean.to(z), g * g * self.bn_var.to(z)
            weight = bias = None
            if bn.affine:
                weight, bias, fanout_scale = _new_bn_params(site, mean, var, self.bn_init)
                w2 = _scale_fanout(w2, fanout_scale)
            z = F.batch_norm(z, mean.clone(), var.clone(), weight, bias, bn.training or not bn.track_running_stats,
                             0.0, bn.eps)
        return output + l2_op(site, _activation(site, z), w2)


@contextmanager
def candidate(site: Site, neurons: Neurons, bn_mean: torch.Tensor | None = None,
              bn_var: torch.Tensor | None = None, bn_init: str = "unit") -> Iterator[CandidateHandle]:
    """While active, forward passes compute what the model computes after
    insert_neurons(site, neurons.scaled(g), g * bn_mean, g^2 * bn_var, bn_init=bn_init), g = handle.gamma."""
    if site.bn is not None:
        _require_moments(site, bn_mean, bn_var)
    handle = CandidateHandle(site, neurons, bn_mean, bn_var, bn_init)
    hooks = [site.l1.register_forward_hook(handle._capture), site.l2.register_forward_hook(handle._add)]
    try:
        yield handle
    finally:
        for h in hooks:
            h.remove()
