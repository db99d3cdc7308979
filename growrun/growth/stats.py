"""The statistics pass of TINY growth (tiny_math.md, section 2).

One forward/backward per batch, hooks on every requested site at once. Per site, with x the
input of L1 (conv: its patches, aligned to L2's output positions through the centre tap, see
unfold.py), h the input of L2 (conv: L2's own patches), a constant-1 feature appended last to
x (resp. h) when L1 (resp. L2) has a bias, and g = d(batch loss)/da at L2's output a, the
running sums over samples and positions are

    S1 = X^T X   S2 = H^T H   M1 = X^T G   M2 = H^T G   P = X^T H   g2 = sum |g|^2   n

kept as float32 (float64 for a float64 model) on the device, with no host synchronisation in
the loop. M1, M2 and P are kept per fold (the samples of every batch are dealt into `folds`
contiguous chunks, rotating which fold gets the larger chunk) for the adaptive neuron count
(adaptive.py).

Nothing of the model changes: parameters and BatchNorm buffers are restored, no .grad is
written (gradients are taken w.r.t. zero "probe" tensors added to every L2 output, with the
parameters' requires_grad switched off during the pass), train/eval mode is left as it is.
Caveat: in train mode a BatchNorm downstream of L2 couples the samples of a batch; g_i is then
the gradient of the *batch* loss w.r.t. a_i (what a training step sees).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .fullconv import FullConvAccumulator, FullConvSums
from growrun.models.site import Site, frozen_bn_stats
from .unfold import aligned_range, conv_geometry, gradient_rows, im2col, linear_features, out_len, site_dims

CONV_FANOUTS = ("center", "full")


@dataclass(eq=False)
class NormalizedStats:
    """Float64 statistics divided by the number of samples (section 2's S1 ... g2).

    M1_folds[f], M2_folds[f], P_folds[f] are divided by their own fold's n_folds[f] (zeros for
    an empty fold).
    """

    S1: torch.Tensor
    S2: torch.Tensor
    M1: torch.Tensor
    M2: torch.Tensor
    P: torch.Tensor
    g2: float
    n: int
    M1_folds: torch.Tensor
    M2_folds: torch.Tensor
    P_folds: torch.Tensor
    n_folds: list[int]


@dataclass(eq=False)
class SiteStats:
    """Running float32 *sums* of one site (divide by n with .normalized()).

    S1 (d1, d1), S2 (d2, d2), M1_folds (F, d1, m), M2_folds (F, d2, m), P_folds (F, d1, d2),
    g2 (), n_folds (F,) int64 samples per fold; the properties M1, M2, P sum over the folds.
    full: conv sites collected with conv_fanout="full" only, the sums of a new channel's whole
    L2 kernel (fullconv.FullConvSums, no folds); None otherwise.
    d1 = L1 fan-in (+1 for L1's bias; conv: C_in * kh1 * kw1), d2 = L2 fan-in (+1 for L2's
    bias; conv: width * kh2 * kw2), m = L2 outputs. Everything is a sum, so statistics of
    disjoint sample sets add up (.add_, +), e.g. an all-reduce of .tensors() across processes.
    """

    S1: torch.Tensor
    S2: torch.Tensor
    M1_folds: torch.Tensor
    M2_folds: torch.Tensor
    P_folds: torch.Tensor
    g2: torch.Tensor
    n_folds: torch.Tensor
    conv_fanout: str = "center"
    full: FullConvSums | None = None

    @classmethod
    def zeros(cls, d1: int, d2: int, m: int, folds: int = 2, device=None,
              conv_fanout: str = "center", dtype=torch.float32) -> "SiteStats":
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        return cls(z(d1, d1), z(d2, d2), z(folds, d1, m), z(folds, d2, m), z(folds, d1, d2), z(()),
                   torch.zeros(folds, dtype=torch.int64, device=device), conv_fanout)

    @property
    def M1(self) -> torch.Tensor:
        return self.M1_folds.sum(0)

    @property
    def M2(self) -> torch.Tensor:
        return self.M2_folds.sum(0)

    @property
    def P(self) -> torch.Tensor:
        return self.P_folds.sum(0)

    @property
    def folds(self) -> int:
        return self.n_folds.shape[0]

    @property
    def n(self) -> int:
        """Number of samples (a host synchronisation)."""
        return int(self.n_folds.sum())

    @property
    def dims(self) -> tuple[int, int, int]:
        """(d1, d2, m)."""
        return self.S1.shape[0], self.S2.shape[0], self.M1_folds.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        """Every sum, for in-place reductions (e.g. torch.distributed.all_reduce)."""
        base = [self.S1, self.S2, self.M1_folds, self.M2_folds, self.P_folds, self.g2, self.n_folds]
        return base + (self.full.tensors() if self.full is not None else [])

    def add_(self, other: "SiteStats") -> "SiteStats":
        if self.dims != other.dims or self.folds != other.folds or self.conv_fanout != other.conv_fanout \
                or (self.full is None) != (other.full is None):
            raise ValueError("cannot add statistics of different sites, fold counts or fan-outs")
        for a, b in zip(self.tensors(), other.tensors()):
            a.add_(b.to(a.device))
        return self

    def __add__(self, other: "SiteStats") -> "SiteStats":
        return self.clone().add_(other)

    def clone(self) -> "SiteStats":
        return SiteStats(*(t.clone() for t in self.tensors()[:7]), conv_fanout=self.conv_fanout,
                         full=None if self.full is None else self.full.clone())

    def normalized(self) -> NormalizedStats:
        """Float64 copies divided by n (per-fold sums by their fold's n); zeros if n = 0."""
        nf = [int(v) for v in self.n_folds.tolist()]
        n = sum(nf)
        inv = 1.0 / n if n else 0.0
        d = lambda t: t.to(torch.float64)  # noqa: E731
        fscale = torch.tensor([1.0 / k if k else 0.0 for k in nf], dtype=torch.float64,
                              device=self.S1.device).view(-1, 1, 1)
        M1f, M2f, Pf = d(self.M1_folds), d(self.M2_folds), d(self.P_folds)
        return NormalizedStats(
            S1=d(self.S1) * inv, S2=d(self.S2) * inv, M1=M1f.sum(0) * inv, M2=M2f.sum(0) * inv,
            P=Pf.sum(0) * inv, g2=float(self.g2) * inv, n=n, M1_folds=M1f * fscale,
            M2_folds=M2f * fscale, P_folds=Pf * fscale, n_folds=nf)


def panel_size(d: int) -> int:
    """Row-panel height for the symmetric product: ~256-576 rows keep the GEMMs efficient."""
    return max(1, -(-d // max(1, min(8, d // 256))))


def sym_addmm_(acc: torch.Tensor, F: torch.Tensor, panel: int) -> None:
    """acc += F F^T on the upper row panels only (acc[r:r+b, r:] for r = 0, b, 2b, ...).

    About (1 + 1/k)/2 of the flops of the full product for k panels; finish with mirror_().
    """
    d = F.shape[0]
    for r in range(0, d, panel):
        acc[r:r + panel, r:].addmm_(F[r:r + panel], F[r:].t())


def mirror_(acc: torch.Tensor, panel: int) -> None:
    """Copy the upper row panels' transposes into the (never written) lower part."""
    d = acc.shape[0]
    for r in range(0, d, panel):
        acc[r + panel:, r:r + panel] = acc[r:r + panel, r + panel:].t()


class _Scratch:
    """Reusable flat buffers (one per role), so that big feature matrices are not reallocated
    (and page-faulted) for every site and batch."""

    def __init__(self) -> None:
        self.bufs: dict[str, torch.Tensor] = {}

    def matrix(self, role: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        buf = self.bufs.get(role)
        if buf is None or buf.numel() < rows * cols or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.bufs[role] = like.new_empty(rows * cols)
        return buf[: rows * cols].view(rows, cols)


def _padded(t: torch.Tensor, p) -> int:
    B, C, H, W = t.shape
    return B * C * (H + 2 * p[0]) * (W + 2 * p[1])


class _SiteRecorder:
    """Hooks of one site (capture x = L1 input and h = L2 input, add a zero probe to a = L2
    output) and its accumulators.

    Per batch, with A = x-features (d1, N) and W = [h-features; g^T] (d2 + m, N) sharing the
    column order (b, i, j) over L2's output positions (an x-column is 0 where the centre tap
    falls in L2's padding):  S1 += A A^T (upper row panels), C_f += A_f W_f^T = [P_f | M1_f],
    Q_f += W_f W_f^T = [[S2_f, M2_f], [., G^T G_f]] for the column blocks A_f, W_f of fold f.
    Fusing the products this way keeps every GEMM wide (the thin ones are slow).
    conv_fanout="full" on a conv site also feeds x and W to a fullconv.FullConvAccumulator.
    """

    def __init__(self, site: Site, folds: int, device, dtype, conv_fanout: str = "center") -> None:
        self.site, self.folds, self.dtype = site, folds, dtype
        l1, l2 = site.l1, site.l2
        self.bias1, self.bias2 = l1.bias is not None, l2.bias is not None
        if site.width != (l2.in_channels if site.is_conv else l2.in_features):
            raise ValueError(f"site {site.name}: L1 outputs != L2 inputs")
        self.d1, self.d2, self.m = site_dims(site)
        D = self.d2 + self.m
        z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.S1, self.C, self.Q = z(self.d1, self.d1), z(folds, self.d1, D), z(folds, D, D)
        self.n_folds = torch.zeros(folds, dtype=torch.int64, device=device)
        self.p1, self.pq = panel_size(self.d1), panel_size(D)
        self.x = self.h = self.probe = self.probe_buf = None
        self.v1 = self.v2 = None
        self.conv_fanout = conv_fanout
        self.full = FullConvAccumulator(site, self.d1, D, device, dtype) \
            if conv_fanout == "full" and site.is_conv else None

    def hooks(self) -> list:
        return [self.site.l1.register_forward_pre_hook(self._pre1),
                self.site.l2.register_forward_pre_hook(self._pre2),
                self.site.l2.register_forward_hook(self._post2)]

    def _pre1(self, _m, args) -> None:
        if self.x is not None:
            raise RuntimeError(f"site {self.site.name}: L1 called twice in one forward pass")
        self.x = args[0].detach()
        self.v1 = self.x._version

    def _pre2(self, _m, args) -> None:
        if self.h is not None:
            raise RuntimeError(f"site {self.site.name}: L2 called twice in one forward pass")
        self.h = args[0].detach()
        self.v2 = self.h._version

    def _post2(self, _m, _args, out):
        # a zero leaf added to a: d loss / d probe = g. Reused across batches (it is never
        # modified and gradients are taken with autograd.grad, so nothing accumulates)
        p = self.probe_buf
        if p is None or p.shape != out.shape or p.dtype != out.dtype or p.device != out.device:
            p = self.probe_buf = torch.zeros_like(out, requires_grad=True)
        self.probe = p
        return out + p

    def reset(self) -> None:
        self.x = self.h = self.probe = None

    def check_captured(self) -> None:
        if self.x is None or self.h is None or self.probe is None:
            raise RuntimeError(f"site {self.site.name}: its layers were not called by the forward pass")

    def accumulate(self, g: torch.Tensor | None, batch_index: int, scratch: _Scratch) -> None:
        """Add this batch's products to the sums (all on the device, no host sync)."""
        if (self.x._version, self.h._version) != (self.v1, self.v2):
            raise RuntimeError(f"site {self.site.name}: an input of L1/L2 was modified in place "
                               "after the layer used it; the statistics would be wrong")
        if g is None:  # L2's output does not reach the loss
            g = torch.zeros_like(self.probe)
        x, h, g = (t.to(self.dtype) for t in (self.x, self.h, g))
        B = x.shape[0]
        N = g.numel() // self.m
        W = scratch.matrix("w", self.d2 + self.m, N, g)
        if self.site.is_conv:
            A = self._conv_features(x, h, g, W, scratch)
        else:
            A = linear_features(x, self.bias1)
            linear_features(h, self.bias2, dest=W[:self.d2])
        gradient_rows(g, W[self.d2:])
        if self.full is not None:
            self.full.add(x, W, tuple(g.shape[-2:]), scratch.matrix,
                          scratch.matrix("pad", 1, _padded(x, conv_geometry(self.site.l1)[2]), x).view(-1))
        # deal the samples of this batch into the folds: contiguous chunks, rotating order
        per = N // B if B else 0
        base, extra = divmod(B, self.folds)
        start = 0
        for r in range(self.folds):
            f = (batch_index + r) % self.folds
            size = base + (1 if r < extra else 0)
            if size:
                cols = slice(start * per, (start + size) * per)
                self.C[f].addmm_(A[:, cols], W[:, cols].t())
                sym_addmm_(self.Q[f], W[:, cols], self.pq)
                self.n_folds[f] += size
            start += size
        sym_addmm_(self.S1, A, self.p1)
        self.reset()

    def _conv_features(self, x, h, g, W, scratch):
        l1, l2 = self.site.l1, self.site.l2
        k1, s1, p1 = conv_geometry(l1)
        k2, s2, p2 = conv_geometry(l2)
        H1, W1 = h.shape[-2:]
        if (out_len(x.shape[2], k1[0], s1[0], p1[0]), out_len(x.shape[3], k1[1], s1[1], p1[1])) != (H1, W1):
            raise RuntimeError(f"site {self.site.name}: h is not L1's output map (resize between L1 and L2?)")
        H2, W2 = g.shape[-2:]
        pad = scratch.matrix("pad", 1, max(_padded(x, p1), _padded(h, p2)), x).view(-1)
        im2col(h, k2, s2, p2, grid=(H2, W2), ones_row=self.bias2, dest=W[:self.d2], pad_buffer=pad)
        # x-patch of L1 output position q(i, j) = s2*(i, j) - p2 + c starts at padded row s1*q;
        # L2 outputs whose centre tap lies in L2's padding (outside rect) get a zero column
        rect = (aligned_range(H1, H2, k2[0], s2[0], p2[0]), aligned_range(W1, W2, k2[1], s2[1], p2[1]))
        (i0, _), (j0, _) = rect
        c = (k2[0] // 2, k2[1] // 2)
        start = (s1[0] * (s2[0] * i0 - p2[0] + c[0]), s1[1] * (s2[1] * j0 - p2[1] + c[1]))
        A = scratch.matrix("x", self.d1, W.shape[1], x)
        return im2col(x, k1, (s1[0] * s2[0], s1[1] * s2[1]), p1, start=start, grid=(H2, W2), rect=rect,
                      ones_row=self.bias1, dest=A, pad_buffer=pad)

    def finish(self) -> SiteStats:
        """Mirror the symmetric sums and split the fused accumulators into a SiteStats."""
        mirror_(self.S1, self.p1)
        for f in range(self.folds):
            mirror_(self.Q[f], self.pq)
        d2 = self.d2
        Qs = self.Q.sum(0)
        g2 = Qs[d2:, d2:].diagonal().sum()
        st = SiteStats(self.S1, Qs[:d2, :d2].contiguous(), self.C[:, :, d2:].contiguous(),
                       self.Q[:, :d2, d2:].contiguous(), self.C[:, :, :d2].contiguous(), g2, self.n_folds,
                       self.conv_fanout, None if self.full is None else self.full.sums)
        self.C = self.Q = None
        return st


def collect_statistics(model: nn.Module, sites: Sequence[Site], batches: Iterable,
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                       conv_fanout: str = "center", folds: int = 2) -> dict[str, SiteStats]:
    """Sums S1, S2, M1, M2, P, g2, n of every site over all batches (section 2).

    batches: iterable of (inputs, targets) already on the model's device. loss_fn(logits, y)
    must return the SUM of the per-sample losses (so g_i = d loss_i / d a_i). One forward and
    one backward (w.r.t. the L2 outputs only) per batch. Returns {site.name: SiteStats}.
    conv_fanout: "center" (a new channel's fan-out in L2 is its kernel's centre tap); "full"
    also collects, for conv sites, the sums of a new channel's whole L2 kernel (SiteStats.full,
    fullconv.py; it means nothing for Linear ones).
    """
    if conv_fanout not in CONV_FANOUTS:
        raise ValueError(f"conv_fanout={conv_fanout!r}; allowed: {CONV_FANOUTS}")
    if folds < 1:
        raise ValueError("folds must be >= 1")
    sites = list(sites)
    if len({s.name for s in sites}) != len(sites):
        raise ValueError("site names must be unique")
    first = next(iter(model.parameters()))
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    recorders = [_SiteRecorder(s, folds, first.device, dtype, conv_fanout) for s in sites]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    handles = []
    scratch = _Scratch()
    try:
        with frozen_bn_stats(model):
            for rec in recorders:
                handles += rec.hooks()
            for p in params:
                p.requires_grad_(False)
            for index, (inputs, targets) in enumerate(batches):
                for rec in recorders:
                    rec.reset()
                with torch.enable_grad():
                    loss = loss_fn(model(inputs), targets)
                    for rec in recorders:
                        rec.check_captured()
                    probes = [r.probe for r in recorders]
                    grads = (torch.autograd.grad(loss, probes, allow_unused=True) if loss.requires_grad
                             else [None] * len(probes))
                del loss
                for rec, g in zip(recorders, grads):
                    rec.accumulate(g, index, scratch)
                del grads
    finally:
        for hnd in handles:
            hnd.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        for rec in recorders:
            rec.reset()
    return {rec.site.name: rec.finish() for rec in recorders}
