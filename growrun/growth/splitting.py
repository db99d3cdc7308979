"""growth=splitting: splitting steepest descent (Liu, Wang, Wu, Liu, "Splitting Steepest Descent for
Growing Neural Architectures", NeurIPS 2019; fast variant: Wang, Li, Wu, Liu, "Energy-aware neural
architecture optimization with fast splitting steepest descent", 2019) for one site
x --L1--> u --[BN]--> z --sigma--> h --L2--> a (site.py).

Split: neuron i (fan-in w_i, L1 row + bias entry, in x-space) becomes two neurons of fan-in
w_i + eps v_i (the existing one) and w_i - eps v_i (a new one, BatchNorm channel copied as net2net
does), each with half the fan-out W2[:, i] / 2. At eps = 0 the function is exactly the same (train
and eval mode). The mean loss changes by (eps^2 / 2) v^T S_i v + O(eps^3), with the splitting matrix

    S_i = (1/n) sum_{samples, positions p} c_{p,i} x_p x_p^T,   c_{p,i} = g_{p,i} sigma''(z_{p,i}) a_i^2

x_p: L1's input patch (conv: im2col, the bias's 1 last), g = d(summed loss)/dh_i, a_i = dz_i/du_i:
BatchNorm taken as the fixed affine map of the batch's statistics, a_i = weight_i / sqrt(var_i + eps)
(training mode: the batch's biased variance of u_i; eval mode: the running one), 1 without BN. The
second order is the first that does not vanish: per gamma^2 the predicted change is second order.
Exact for eval-mode BN (tests); in training mode the split also moves the batch's mean / variance,
terms S_i leaves out (the line search measures the true loss; the authors also fix BN, in eval mode).
The authors split by a fixed eps = 1e-2 along unit v and select over all layers by one threshold;
here gamma is line-searched and each site gets growth.neurons' count, like every method.

ReLU: sigma'' = 0 almost everywhere (a Dirac at 0: S_i is the expectation of g a^2 delta(z) x x^T).
The authors' fast-splitting code (github.com/dilinwang820/fast-energy-aware-splitting, sp_conv.py
`sp_forward`) replaces it by softplus_beta'' (beta = 3: a logistic density of scale 1/3 in BN-output
units), with BN in eval mode (running variance). Here: a Gaussian kernel estimate of delta,
sigma''(z) ~ phi_h(z) = exp(-z^2 / 2h^2) / (sqrt(2 pi) h), h = growth.splitting.bandwidth (0.25)
times the neuron's std of z over the batch; it converges to the exact expected loss change of a
split over a continuous input distribution as h -> 0 (h ~ the size of the split's own perturbation
of z at the line-searched amplitude). "identity" sites: sigma'' = 0, S = 0, nothing is split.

Eigenvectors: the split neurons are those of most negative lambda_min(S_i) (only lambda_min < 0,
below -rel_eps max_i |lambda|), ties by index, at most `count`, each split once; v_i its unit
eigenvector. d1 <= exact_dim: every S_i formed and torch.linalg.eigh; else matrix-free batched
Lanczos (full reorthogonalisation, restarted from the Ritz vector) with S_i v = (1/n) X^T (c_i * (X v)).
Memory: X keeps at most growth.splitting.patches (sample, position) pairs: batch b (B_b of the n
samples, P positions each) keeps ceil(patches B_b / n) of its B_b P pairs drawn uniformly without
replacement, each weighted B_b P / kept (an unbiased estimate of the sums; all pairs when they fit).
The authors instead run RMSprop on the Rayleigh quotient v^T S v / v^T v over the training set.

Scale: the inserted direction is v_i times r = the mean norm of the site's fan-ins [w_j, b_j], the
same for every neuron (the paper: one eps for all), so gamma is relative to a typical fan-in. The
predicted change per gamma^2 is (1/2) sum_k lambda_min,k r^2 (Proposal.first_order / per_neuron).
gamma: the line search (linesearch.py; candidates attached by `attach`), insertion by `insert_split`.
Width-0 sites have nothing to split (refused up front: growrun/growth/policy.py growth_blocker).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

from growrun.models.site import Neurons, Site, frozen_bn_stats
from .surgery import insert_copies, l1_op, l2_op
from .unfold import conv_geometry, out_len, site_dims

DEFAULTS = dict(bandwidth=0.25, patches=4096, iters=32)  # growth.splitting.* (growrun/growth/methods/splitting.py)
EXACT_DIM = 160  # form every S_i when d1 <= this (N d1^2 K flops, vs ~4 N d1 K per Lanczos step)


def gaussian_delta(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """phi_h(z) = exp(-z^2 / 2h^2) / (sqrt(2 pi) h): the kernel estimate of sigma''(z) for ReLU."""
    return torch.exp(-0.5 * (z / h) ** 2) / (math.sqrt(2 * math.pi) * h)


def splitting_matrices(X: torch.Tensor, C: torch.Tensor, n: float) -> torch.Tensor:
    """S (K, d, d), S_k = (1/n) sum_p C[p, k] X[p] X[p]^T; X (N, d) patches, C (N, K) weights."""
    return torch.einsum("pk,pi,pj->kij", C, X, X) / n


def splitting_matvec(X: torch.Tensor, C: torch.Tensor, V: torch.Tensor, n: float) -> torch.Tensor:
    """S_k v_k for every k, matrix-free: (1/n) X^T (C[:, k] * (X v_k)); V (K, d) -> (K, d)."""
    return ((X @ V.T) * C).T @ X / n


def min_eig_exact(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lambda_min (K,), unit eigenvectors (K, d)) of symmetric S (K, d, d) by eigh."""
    lam, vec = torch.linalg.eigh(0.5 * (S + S.transpose(1, 2)))
    return lam[:, 0], vec[:, :, 0]


def min_eig_lanczos(matvec: Callable, K: int, d: int, *, iters: int = 32, restarts: int = 3, tol: float = 1e-2,
                    generator=None, dtype=torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Smallest eigenpair of K symmetric d x d operators at once (matvec: V (K, d) -> (S_k v_k)_k):
    Lanczos with full reorthogonalisation, min(iters, d) steps per cycle, restarted from the Ritz
    vector until every residual |S v - theta v| <= tol max|theta| (or `restarts` cycles). A breakdown
    (invariant subspace) continues from a random orthogonal vector with beta = 0. Returns
    (lambda (K,), unit vectors (K, d), matvecs used)."""
    gdev = generator.device if generator is not None else "cpu"
    rand = lambda: torch.randn(K, d, generator=generator, dtype=dtype, device=gdev).to(device)  # noqa: E731
    v, m, used = rand(), min(iters, d), 0
    v = v / v.norm(dim=1, keepdim=True)
    for _ in range(restarts):
        Q, T = v.new_zeros(m, K, d), v.new_zeros(K, m, m)
        q, scale = v, v.new_zeros(K)
        for j in range(m):
            Q[j] = q
            w = matvec(q)
            used += 1
            T[:, j, j] = (w * q).sum(1)
            for _ in range(2):  # full reorthogonalisation, twice
                w = w - torch.einsum("jk,jkd->kd", torch.einsum("jkd,kd->jk", Q[: j + 1], w), Q[: j + 1])
            b = w.norm(dim=1)
            scale = torch.maximum(scale, torch.maximum(T[:, j, j].abs(), b))
            if j + 1 == m:
                break
            broke = b <= 1e3 * torch.finfo(dtype).eps * scale
            if broke.any():
                r = rand()
                for _ in range(2):
                    r = r - torch.einsum("jk,jkd->kd", torch.einsum("jkd,kd->jk", Q[: j + 1], r), Q[: j + 1])
                w = torch.where(broke[:, None], r / r.norm(dim=1, keepdim=True), w / b.clamp_min(1e-300)[:, None])
                b = torch.where(broke, torch.zeros_like(b), b)
            else:
                w = w / b[:, None]
            T[:, j, j + 1] = T[:, j + 1, j] = b
            q = w
        theta, Y = torch.linalg.eigh(T)
        v = torch.einsum("km,mkd->kd", Y[:, :, 0], Q)
        v = v / v.norm(dim=1, keepdim=True)
        residual = b * Y[:, -1, 0].abs()
        if m == d or bool((residual <= tol * theta.abs().amax(1).clamp_min(1e-300)).all()):
            break
    return theta[:, 0], v, used


def select(lam: torch.Tensor, count: int, rel_eps: float = 1e-7) -> torch.Tensor:
    """The neurons to split: most negative lambda_min first (ties by index), only those below
    -rel_eps max|lambda|, at most `count` (int64, on lam's device)."""
    order = torch.argsort(lam, stable=True)
    scale = float(lam.abs().max()) if lam.numel() else 0.0
    order = order[lam[order] < -rel_eps * scale] if scale > 0 else order[:0]
    return order[: max(0, int(count))]


def _rows(t: torch.Tensor, conv: bool) -> torch.Tensor:
    """(B, K, H, W) or (B, *, K) -> (positions, K), positions ordered (b, i, j)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) if conv else t.reshape(-1, t.shape[-1])


def _patches(site: Site, x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """L1's input patches (bias 1 last) at the flat (b, i, j) positions sel: (len(sel), d1)."""
    if site.is_conv:
        (kh, kw), (sh, sw), (ph, pw) = conv_geometry(site.l1)
        H1, W1 = out_len(x.shape[2], kh, sh, ph), out_len(x.shape[3], kw, sw, pw)
        b, i, j = sel // (H1 * W1), sel % (H1 * W1) // W1, sel % W1
        ii = (i * sh)[:, None] + torch.arange(kh, device=x.device)
        jj = (j * sw)[:, None] + torch.arange(kw, device=x.device)
        p = F.pad(x, (pw, pw, ph, ph))[b[:, None, None], :, ii[:, :, None], jj[:, None, :]]  # (N, kh, kw, C)
        p = p.permute(0, 3, 1, 2).reshape(len(sel), -1)
    else:
        p = x.reshape(-1, x.shape[-1])[sel]
    return torch.cat([p, p.new_ones(len(sel), 1)], 1) if site.l1.bias is not None else p


def collect(model, site: Site, batches, loss_fn: Callable, *, forward: Callable | None = None,
            bandwidth: float = DEFAULTS["bandwidth"], patches: int = DEFAULTS["patches"], generator=None,
            ddsigma: Callable | None = None, reduce: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(X (N, d1), C (N, K), n) over the statistics batches [(inputs of `forward`, labels)]: the kept
    patches and their weights c = g sigma''(z) a^2 (times the subsampling weight), see the module
    doc. loss_fn: the batch's summed loss. ddsigma(z, h) replaces the kernel (tests: a smooth
    activation's sigma''(z)). reduce: as min_eigenpairs; each rank holds its share of every batch,
    and the kernel width h comes from std(z) over the whole batch (batch_std). Nothing of the
    model changes."""
    forward, conv, cap = forward or model, site.is_conv, {}
    n_total = sum(len(y) for _, y in batches)

    def pre2(_m, args):
        cap["probe"] = torch.zeros_like(args[0], requires_grad=True)
        return (args[0] + cap["probe"], *args[1:])

    hooks = [site.l1.register_forward_hook(lambda _m, a, o: cap.update(x=a[0].detach(), u=o.detach())),
             site.l2.register_forward_pre_hook(pre2)]
    if site.bn is not None:
        hooks.append(site.bn.register_forward_hook(lambda _m, a, o: cap.update(z=o.detach())))
    Xs, Cs = [], []
    try:
        with torch.enable_grad(), frozen_bn_stats(model):
            for xb, yb in batches:
                g, = torch.autograd.grad(loss_fn(forward(xb), yb), [cap["probe"]], allow_unused=True)
                u, x = _rows(cap["u"], conv), cap["x"]
                z, g = _rows(cap.get("z", cap["u"]), conv), _rows(cap["probe"] if g is None else g, conv)
                a = torch.ones_like(u[0])
                bn = site.bn
                if bn is not None:
                    batch_stats = bn.training or not bn.track_running_stats
                    var = u.var(0, unbiased=False) if batch_stats else bn.running_var.to(u)
                    a = (bn.weight.detach().to(u) if bn.affine else a) / (var + bn.eps).sqrt()
                h = (bandwidth * batch_std(z, reduce)).clamp_min(torch.finfo(z.dtype).tiny)
                dd = ddsigma(z, h) if ddsigma is not None else \
                    gaussian_delta(z, h) if site.activation == "relu" else torch.zeros_like(z)
                c = g * dd * a * a
                total = c.shape[0]
                keep = min(total, math.ceil(patches * len(yb) / max(n_total, 1)))
                gdev = generator.device if generator is not None else "cpu"
                sel = torch.arange(total) if keep == total else \
                    torch.randperm(total, generator=generator, device=gdev)[:keep]
                sel = sel.to(c.device)
                Xs.append(_patches(site, x, sel))
                Cs.append(c[sel] * (total / keep))
    finally:
        for hnd in hooks:
            hnd.remove()
    return torch.cat(Xs), torch.cat(Cs), n_total


def batch_std(z: torch.Tensor, reduce: Callable | None = None) -> torch.Tensor:
    """Per-column std (biased) of z (N, K); with reduce, of the rows of every rank together
    (two passes: the mean, then the mean squared deviation), as one process holding them all."""
    z64 = z.double()  # sums in float64: the same to ~1e-16 whatever their order (one process or ranks)
    if reduce is None:
        return z64.std(0, unbiased=False).to(z.dtype)
    total = torch.cat([z64.sum(0), z64.new_full((1,), z.shape[0])])
    reduce([total])
    mean = total[:-1] / total[-1]
    sq = ((z64 - mean) ** 2).sum(0)
    reduce([sq])
    return (sq / total[-1]).sqrt().to(z.dtype)


def min_eigenpairs(X, C, n, *, iters: int = DEFAULTS["iters"], exact_dim: int = EXACT_DIM, generator=None,
                   tol: float = 1e-2, restarts: int = 3,
                   reduce: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(lambda_min (K,), unit eigenvectors (K, d), flops) of every S_k (exact or Lanczos, module doc);
    reduce(list of tensors): in-place sum over processes of the products (None: one process).
    In float64 throughout (products, their sums across ranks, Lanczos): a float32 sum's rounding
    depends on its order (one process, or ranks' partial sums; AVX2 or AVX-512 kernels), and the
    eigenvectors and the line search after them would carry that difference into a decision."""
    X, C = X.double(), C.double()
    N, d = X.shape
    K = C.shape[1]
    if d <= exact_dim:
        S = splitting_matrices(X, C, n)
        if reduce is not None:
            reduce([S])
        lam, v = min_eig_exact(S)
        return lam, v, 2 * N * d * d * K

    def matvec(V):
        out = splitting_matvec(X, C, V.to(X), n)
        if reduce is not None:
            reduce([out])
        return out.to(V)

    lam, v, used = min_eig_lanczos(matvec, K, d, iters=iters, restarts=restarts, tol=tol, generator=generator,
                                   dtype=X.dtype, device=X.device)
    return lam, v, 4 * N * d * K * used


def fanin_scale(site: Site) -> float:
    """r: the mean norm of the site's fan-ins [w_j, b_j] (1 if they are all 0)."""
    if not site.width:
        return 1.0
    W = site.l1.weight.detach().reshape(site.width, -1)
    if site.l1.bias is not None:
        W = torch.cat([W, site.l1.bias.detach()[:, None]], 1)
    r = float(W.double().norm(dim=1).mean())
    return r if r > 0 else 1.0


def directions(site: Site, idx: torch.Tensor, V: torch.Tensor) -> Neurons:
    """The split directions r v_k of neurons idx as Neurons (w1, b1: in L1's row shape; w2: the
    halves W2[:, i] / 2 that each replica keeps)."""
    V = (V * fanin_scale(site)).to(site.l1.weight)
    b1 = V[:, -1].contiguous() if site.l1.bias is not None else None
    w1 = (V[:, :-1] if b1 is not None else V).reshape(len(idx), *site.l1.weight.shape[1:]).contiguous()
    return Neurons(w1, b1, site.l2.weight.detach().index_select(1, idx) / 2)


class SplitHandle:
    """Forward hooks making the model compute the split of neurons idx along dirs at amplitude
    .gamma (what insert_split makes; gamma 0: the model unchanged), for the line search."""

    def __init__(self, site: Site, idx: torch.Tensor, dirs: Neurons):
        self.site, self.idx, self.dirs, self.gamma = site, idx, dirs, 0.0
        self.ch = 1 if site.is_conv else -1
        self._new = None
        self._hooks = [site.l1.register_forward_hook(self._l1), site.l2.register_forward_hook(self._l2)]

    def _l1(self, _m, args, out):
        if self.gamma == 0.0:
            return None
        g, nr = self.gamma, self.dirs
        dz = l1_op(self.site, args[0], g * nr.w1.to(out), None if nr.b1 is None else g * nr.b1.to(out))
        self._new = out.index_select(self.ch, self.idx) - dz  # the new neurons' L1 outputs
        return out.index_add(self.ch, self.idx, dz)  # the existing ones': w_i + gamma v_i

    def _l2(self, _m, args, out):
        new, self._new = self._new, None
        if self.gamma == 0.0 or new is None:
            return None
        site, idx, bn = self.site, self.idx, self.site.bn
        if bn is not None:  # the copied BatchNorm channels
            z = new if site.is_conv else new.reshape(-1, new.shape[-1])
            stats = [None if t is None else t.index_select(0, idx).clone() for t in (bn.running_mean, bn.running_var)]
            wb = [None if t is None else t.index_select(0, idx) for t in (bn.weight, bn.bias)]
            train = bn.training or not bn.track_running_stats
            new = F.batch_norm(z, *stats, *wb, train, 0.0, bn.eps).reshape(new.shape)
        h_new = F.relu(new) if site.activation == "relu" else new
        half = site.l2.weight.index_select(1, idx) / 2
        return out + l2_op(site, h_new - args[0].index_select(self.ch, idx), half)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def attach(site: Site, idx: torch.Tensor, dirs: Neurons) -> Callable:
    """line_search(attach=...): a context-manager factory yielding a SplitHandle."""
    @contextmanager
    def ctx():
        handle = SplitHandle(site, idx.to(site.l1.weight.device), dirs)
        try:
            yield handle
        finally:
            handle.remove()

    return ctx


@torch.no_grad()
def insert_split(site: Site, idx: torch.Tensor, dirs: Neurons, gamma: float, optimizer=None) -> None:
    """Split neurons idx along dirs at amplitude gamma, from the site's current weights: L1 rows
    w_i + gamma v_i (kept), new rows w_i - gamma v_i with copied BatchNorm channels, both fan-outs
    W2[:, i] / 2 (surgery.insert_copies; optimizer state as for net2net)."""
    l1, W2 = site.l1, site.l2.weight.detach()
    idx = idx.to(l1.weight.device)
    v = gamma * dirs.w1.to(l1.weight)
    new_w1 = l1.weight.detach().index_select(0, idx) - v
    l1.weight.index_add_(0, idx, v)
    new_b1 = None
    if l1.bias is not None:
        vb = gamma * dirs.b1.to(l1.bias)
        new_b1 = l1.bias.detach().index_select(0, idx) - vb
        l1.bias.index_add_(0, idx, vb)
    half = W2.index_select(1, idx) / 2
    l2_weight = W2.clone()
    l2_weight[:, idx] = half
    insert_copies(site, idx, Neurons(new_w1, new_b1, half.clone()), l2_weight, optimizer)


def proposer(model, batches, loss_fn: Callable, *, forward: Callable | None = None,
             bandwidth: float = DEFAULTS["bandwidth"], patches: int = DEFAULTS["patches"],
             iters: int = DEFAULTS["iters"], rel_eps: float = 1e-7, generator=None, reduce: Callable | None = None,
             add_flops: Callable[[int], None] | None = None) -> Callable:
    """The hook the splitting method calls (growrun/growth/methods/splitting.py): (site, count) -> (split
    neurons idx (int64), their directions r v_k (Neurons), predicted change per gamma^2 (float64)),
    measured on `batches` [(inputs of `forward`, labels)] (collect); reduce: as min_eigenpairs."""
    def hook(site, count):
        dev = site.l1.weight.device
        if not count or not site.width or site.activation != "relu":  # nothing to split
            empty = torch.zeros(0, dtype=torch.long, device=dev)
            return empty, directions(site, empty, site.l1.weight.new_zeros(0, site_dims(site)[0])), \
                torch.zeros(0, dtype=torch.float64)
        X, C, n = collect(model, site, batches, loss_fn, forward=forward, bandwidth=bandwidth, patches=patches,
                          generator=generator, reduce=reduce)
        if reduce is not None:
            total = torch.tensor([float(n)], dtype=torch.float64, device=dev)
            reduce([total])
            n = float(total)
        lam, V, flops = min_eigenpairs(X, C, n, iters=iters, generator=generator, reduce=reduce)
        if add_flops is not None:
            add_flops(flops)
        idx = select(lam, count, rel_eps).to(dev)
        per = 0.5 * lam[idx.to(lam.device)].double() * fanin_scale(site) ** 2
        return idx, directions(site, idx, V[idx.to(V.device)]), per

    return hook
