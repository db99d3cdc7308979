"""growth=firefly: new neurons by Firefly neural architecture descent (Wu, Liu, Stone, Liu,
"Firefly Neural Architecture Descent: a General Approach for Growing Neural Networks", NeurIPS
2020), for one site x --L1--> z --[BN]--> sigma --> h --L2--> a (site.py).

Reference: the authors' code, github.com/klightz/Firefly, method `fireflyn` (new neurons +
splitting): model.py `Classifier.spffn` (the candidate optimisation and the score pass),
sp/conv.py `spffn_add_new`, `spffn_reset`, `spffn_forward`, `spffn_update_w`,
`spffn_active_grow` / `spffn_passive_grow` (insertion), sp/net.py `SpNet.split` (selection).
Also read: google-research/growneuron growers.py `AddFirefly` (GradMax's Firefly baseline: no
extra candidates and no splitting, 100 Adam steps, new weights projected back to their initial
norms after every step); its choices are not used here where the authors' code differs.

With C = max(n_candidates, count) candidates (the reference: K = 70 candidates per layer):

1. Candidates (spffn_reset): fan-in a_c ~ N(0, 0.1^2) per entry (`vno.normal_(0, 0.1)`), bias
   0 (not trained: the reference's new biases are 0), fan-out w_c ~ U(-eps, eps) per entry of
   L2's output space (`vni.uniform_(-1e-2, 1e-2)`: eps = 1e-2, SpModule.epsilon). A conv
   candidate's fan-out is the centre tap of its L2 kernel, growrun's convention for every
   method (growth.conv_fanout=center); the reference trains the whole kh x kw kernel. A new
   BatchNorm channel is the identity on the candidate's own pre-activation (the reference: a BN
   channel of weight 1, bias 0, running mean 0, variance 1, in eval mode, i.e. the identity up
   to 1/sqrt(1 + 1e-5); growrun inserts BN channels that are the identity on their measured
   moments, surgery.insert_neurons), so candidate c adds to L2's output

       c_c(x) = L2op(sigma(L1op(x; a_c)); w_c).

2. Training (Classifier.spffn, first loop): `steps` steps of RMSprop (lr, alpha 0.9, momentum
   0.1: the reference's optimiser, lr = 1e-3) on every candidate's (a_c, w_c) at once, one
   statistics batch per step in turn (cycled), minimising the batch's mean loss of the network
   with all candidates attached, L(f + sum_c c_c), plus 1e-4 |a|^2 (the reference's penalty
   1e-2 * (1e-2 |vno|^2)). The existing weights do not move; BatchNorm running statistics are
   not touched; the model stays in its mode (training, as growrun's statistics and line search;
   the reference puts the whole network in eval mode for its candidate passes, SpNet.split).
   The reference makes one pass over its growth data, one step per batch (its whole training
   set in batches of 128, ~390 steps on CIFAR-10, once per growth round of 160 epochs); here the
   growth event's statistics draw (growth.samples images in batches of growth.stats_batch_size)
   stands for that data: steps = None (growth.firefly.steps=null, the default) is one pass over
   it, one step per batch. Under RMSprop a step moves each entry by about lr (3.2 lr at the
   first step), so a few steps already turn the eps-scale fan-outs towards the loss's descent
   direction for their fan-in, while the fan-ins (entries ~0.1) move little.
3. Score (second loop, spffn_update_w): a zero gate t_c multiplies each candidate's output (the
   reference's y multiplies its pre-activation: the same derivative for a positively homogeneous
   sigma and an identity BN channel), and
       s_c = d L(f + t_c c_c) / d t_c  at t = 0  =  (1/n) sum_i <g_i, c_c(x_i)>,
   g_i = d loss_i / d a_i of the network without candidates, over every statistics sample. The
   reference takes this gradient with every candidate attached at full scale (its y multiplies
   on top of them); here it is the derivative at the current network, the first-order (Taylor)
   term the paper selects with. Since sigma is positively homogeneous (relu, identity) and the
   new BN channel the identity, a candidate inserted at amplitude gamma (gamma a_c, gamma w_c)
   adds exactly gamma^2 c_c(x): s_c is also its first-order loss change per gamma^2
   (Proposal.per_neuron).
4. Selection (SpNet.split, sp_threshold): the `count` candidates of smallest s_c, i.e. of
   largest first-order loss decrease, ties by index; signed, as the reference keeps neurons
   with w <= its n_elites-th smallest w (a candidate whose score is positive would raise the loss).

Insertion (growrun/growth/methods/firefly.py): the kept candidates as trained, gamma = 1, no line
search: the reference inserts the optimised candidates as they are (eps-scale fan-outs, no
amplitude search). Not function preserving: the loss changes by about sum of the kept s_c (a
decrease). growth.normalize=fan_in then rebalances them (the same function).

Not included (documented deviations): the reference's split candidates (existing neuron j
replaced by two copies with fan-in W1[j] +- delta_j and half the fan-out each, scored and
selected together with the new neurons); its pooled selection over every layer (one threshold
for the whole network; here each site gets growth.neurons' count, like every method); its joint
optimisation of every layer's candidates (here one site's at a time, on the network before the
event's insertions); full-kernel conv fan-outs (above).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from growrun.models.layers import conv2d

from growrun.models.site import Neurons, Site, frozen_bn_stats
from .surgery import l1_op, l2_op

FANIN_STD = 0.1  # reference: vno.normal_(0, 0.1)
FANIN_DECAY = 1e-4  # reference: (1e-2 * vno.pow(2).sum() * 1e-2).backward()
RMSPROP = dict(alpha=0.9, momentum=0.1)  # reference: RMSprop(lr=1e-3, momentum=0.1, alpha=0.9)
DEFAULTS = dict(n_candidates=70, steps=None, lr=1e-3, eps=1e-2)  # growth.firefly.* (growrun/growth/methods/firefly.py)


@dataclass(eq=False)
class FireflyCandidates:
    """All candidates of one site as trained, their scores, and which are kept.

    neurons: the C candidates at amplitude 1 (site.Neurons; conv fan-out at the centre tap).
    scores:  s_c (float64, C): first-order change of the mean loss per gamma^2 (module doc, 3).
    kept:    the kept candidates (int64, K), smallest score first.
    steps:   the training steps taken.
    flops_per_image: forward FLOPs per image of the C candidates (their L1 and L2 products; the
      compute of each step and of the score pass is about 3 x (this + the network's part run)).
    """

    neurons: Neurons
    scores: torch.Tensor
    kept: torch.Tensor
    steps: int = 0
    flops_per_image: int = 0

    def chosen(self) -> tuple[Neurons, torch.Tensor]:
        """(the kept neurons, their scores), in the order of `kept`."""
        idx = self.kept.to(self.neurons.w1.device)
        nr = self.neurons
        b1 = None if nr.b1 is None else nr.b1.index_select(0, idx)
        return Neurons(nr.w1.index_select(0, idx), b1, nr.w2.index_select(1, idx)), \
            self.scores.index_select(0, self.kept.to(self.scores.device))


def select(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` candidates of smallest score (largest first-order decrease), ties by index."""
    count = max(0, min(int(count), scores.numel()))
    return torch.argsort(scores.detach().cpu(), stable=True)[:count]


def fanout_kernel(site: Site, w: torch.Tensor) -> torch.Tensor:
    """Fan-out vectors w (C, m) -> L2's weight columns (m, C[, kh, kw]): for conv zero but the
    centre tap (kh // 2, kw // 2). Differentiable in w."""
    wt = w.t()
    if not site.is_conv:
        return wt
    kh, kw = site.l2.kernel_size
    return F.pad(wt[:, :, None, None], (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2))


def fanout_op(site: Site, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """l2_op(site, h, fanout_kernel(site, w)): for a conv whose padding is kernel // 2 (odd
    kernels: ResNet's and VGG's 3x3, padding 1) the centre tap alone is a 1x1 convolution of h
    with L2's stride, computed so (kh * kw times fewer products); else the full, mostly zero kernel."""
    if site.is_conv:
        (kh, kw), pad = site.l2.kernel_size, site.l2.padding
        if kh % 2 and kw % 2 and tuple(pad) == (kh // 2, kw // 2):
            return conv2d(h, w.t()[:, :, None, None], None, site.l2.stride, 0)
    return l2_op(site, h, fanout_kernel(site, w))


def _activation(site: Site, z: torch.Tensor) -> torch.Tensor:
    return F.relu(z) if site.activation == "relu" else z


class _Attached:
    """Forward hooks adding sum_c gate_c * c_c(x) to L2's output (gate None: every gate 1)."""

    def __init__(self, site: Site, a: torch.Tensor, w: torch.Tensor):
        self.site, self.a, self.w = site, a, w
        self.gate: torch.Tensor | None = None
        self.flops_per_image = 0  # of the candidates, counted at the first forward
        self._x = None
        self._hooks = [site.l1.register_forward_hook(self._capture), site.l2.register_forward_hook(self._add)]

    def _capture(self, _module, inputs, _output):
        self._x = inputs[0]

    def _add(self, _module, _inputs, output):
        x, self._x = self._x, None
        z = l1_op(self.site, x, self.a.to(x), None)
        h = _activation(self.site, z)
        if self.gate is not None:
            h = h * self.gate.to(h).view(1, -1, *([1] * (h.dim() - 2)))
        out = fanout_op(self.site, h, self.w.to(h))
        if not self.flops_per_image and z.shape[0]:
            n, C = z.shape[0], z.shape[1]
            self.flops_per_image = 2 * (z.numel() * self.a[0].numel() + out.numel() * C) // n
        return output + out

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def initial_candidates(site: Site, n: int, eps: float,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (n, *L1 row shape), w (n, m)) drawn as the reference does: a ~ N(0, 0.1^2), w ~ U(-eps,
    eps), in float64 from `generator` (on its device), then on L1's device and dtype."""
    dev = generator.device if generator is not None else "cpu"
    ref = site.l1.weight
    a = torch.randn(n, *ref.shape[1:], generator=generator, dtype=torch.float64, device=dev) * FANIN_STD
    w = (torch.rand(n, site.out_width, generator=generator, dtype=torch.float64, device=dev) * 2 - 1) * eps
    return a.to(ref.device, ref.dtype), w.to(ref.device, ref.dtype)


def firefly_candidates(model: torch.nn.Module, site: Site, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                       loss_fn: Callable, count: int, *, n_candidates: int = DEFAULTS["n_candidates"],
                       steps: int | None = DEFAULTS["steps"], lr: float = DEFAULTS["lr"],
                       eps: float = DEFAULTS["eps"], generator: torch.Generator | None = None,
                       forward: Callable | None = None,
                       reduce: Callable[[list], None] | None = None) -> FireflyCandidates:
    """Firefly's candidates for `site` (module doc: draw, train, score, select `count`); `steps`
    None: one pass over the batches (one step each).

    batches: [(inputs of `forward`, labels)], the statistics batches (inputs of the model, or of
      `forward` = the part of the model from the site's block on, with the inputs run through
      the part before it: growrun.growth.draws.split_at).
    loss_fn(logits, y): the batch's summed loss (as for the statistics pass).
    reduce(tensors): sums each tensor in place over processes (DDP: every rank sees its share of
      each batch; gradients, scores and sample counts are summed, so every rank keeps the same
      candidates); None: one process.
    Nothing of the model changes (weights, BatchNorm running statistics, .grad).
    """
    count = max(int(count), 0)
    forward = forward or model
    C = max(int(n_candidates), count) if count else 0
    a, w = initial_candidates(site, C, eps, generator)
    if C == 0:
        empty = Neurons(a, None if site.l1.bias is None else a.new_zeros(0), fanout_kernel(site, w))
        return FireflyCandidates(empty, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    if not batches:
        raise ValueError(f"site {site.name}: firefly needs statistics batches to train its candidates")
    steps = len(batches) if steps is None else int(steps)
    a.requires_grad_(True)
    w.requires_grad_(True)
    opt = torch.optim.RMSprop([a, w], lr=lr, **RMSPROP)
    hooks = _Attached(site, a, w)
    try:
        with torch.enable_grad(), frozen_bn_stats(model):
            for step in range(steps):  # 2. training, every candidate attached
                x, y = batches[step % len(batches)]
                ga, gw = torch.autograd.grad(loss_fn(forward(x), y), [a, w])
                n = ga.new_full((1,), float(y.shape[0]))  # no host-to-device copy (a sync on CUDA)
                if reduce is not None:
                    reduce([ga, gw, n])
                a.grad = ga / n + 2 * FANIN_DECAY * a.detach()
                w.grad = gw / n
                opt.step()
            gate = torch.zeros(C, dtype=a.dtype, device=a.device, requires_grad=True)
            hooks.gate = gate  # 3. scores: d loss / d gate at gate 0, the network without candidates
            total = torch.zeros(C, dtype=torch.float64, device=a.device)
            seen = torch.zeros(1, dtype=torch.float64, device=a.device)
            for x, y in batches:
                g, = torch.autograd.grad(loss_fn(forward(x), y), [gate])
                total += g.double()
                seen += float(y.shape[0])
            if reduce is not None:
                reduce([total, seen])
    finally:
        hooks.remove()
    a, w = a.detach(), w.detach()
    scores = total / seen.clamp_min(1.0)
    b1 = None if site.l1.bias is None else a.new_zeros(C)
    neurons = Neurons(a.contiguous(), b1, fanout_kernel(site, w).contiguous())
    return FireflyCandidates(neurons, scores, select(scores, count), steps, hooks.flops_per_image)


def proposer(model, batches, loss_fn, *, n_candidates: int = DEFAULTS["n_candidates"],
             steps: int | None = DEFAULTS["steps"], lr: float = DEFAULTS["lr"], eps: float = DEFAULTS["eps"],
             generator: torch.Generator | None = None, forward: Callable | None = None,
             reduce: Callable[[list], None] | None = None) -> Callable[[Site, int], tuple[Neurons, torch.Tensor]]:
    """The hook the firefly method calls (growrun/growth/methods/firefly.py; EventContext.hook):
    (site, count) -> (the kept neurons at amplitude 1, their scores s_c (float64))."""
    def hook(site: Site, count: int) -> tuple[Neurons, torch.Tensor]:
        return firefly_candidates(model, site, batches, loss_fn, count, n_candidates=n_candidates, steps=steps,
                                  lr=lr, eps=eps, generator=generator, forward=forward, reduce=reduce).chosen()

    return hook
