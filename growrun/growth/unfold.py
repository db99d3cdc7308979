"""Feature matrices of a growth site in the layout the statistics use (tiny_math.md, section 2).

Every matrix here is *feature-major*: shape (features, columns), one column per (sample,
position) in the order (b, i, j) (samples outermost), so that a statistic is a single matmul
  S = F F^T,   M = F G,   P = F1 F2^T.
Rows of a conv patch are ordered (c, u, v) like ``weight.view(out, -1)``; a layer with a bias
gets one extra constant-1 row *last* (so the bias of a new neuron is the last fan-in entry).

Patches are gathered with one strided copy from the zero-padded input (as_strided), straight
into the feature-major layout (into rows of a caller's buffer when given): no F.unfold and
permute (which would copy twice and allocate every time).

Centre-tap alignment (``aligned_range``): a new channel whose fan-out in L2 is only the centre
tap c = (kh2 // 2, kw2 // 2) reaches L2 output (i, j) from the L1 output position
    q(i, j) = (s2h * i - p2h + ch,  s2w * j - p2w + cw);
positions q outside L1's output (L2's zero padding) contribute nothing. The valid i form a
contiguous range (likewise j), and the x-patch of L1 position q starts at padded input row
s1 * q, so the aligned x-patches are an im2col of x with stride s1 * s2 and a start offset,
laid out on L2's output grid with zero columns outside the valid rectangle.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_geometry(layer: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(kernel, stride, padding) of a Conv2d as int pairs; only groups=1, dilation=1, zero padding."""
    if layer.groups != 1 or _pair(layer.dilation) != (1, 1):
        raise ValueError("growth sites need Conv2d with groups=1 and dilation=1")
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        raise ValueError("growth sites need Conv2d with explicit integer zero padding")
    return _pair(layer.kernel_size), _pair(layer.stride), _pair(layer.padding)


def out_len(n: int, k: int, s: int, p: int) -> int:
    """Conv output length: floor((n + 2p - k) / s) + 1."""
    return (n + 2 * p - k) // s + 1


def aligned_range(n1: int, n2: int, k2: int, s2: int, p2: int) -> tuple[int, int]:
    """L2 output indices [lo, hi) whose centre-tap input q = s2*i - p2 + k2//2 lies in [0, n1).

    n1: L1 output length (= length of h), n2: L2 output length.
    """
    c = k2 // 2
    lo = max(0, -(-(p2 - c) // s2))  # ceil((p2 - c) / s2), at least 0
    top = n1 - 1 + p2 - c
    hi = min(n2, top // s2 + 1) if top >= 0 else 0
    return lo, max(lo, hi)


def pad_into(x: torch.Tensor, ph: int, pw: int, buf: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, C, H, W) zero-padded by (ph, pw), contiguous; written into the prefix of the flat
    scratch `buf` when it is large enough (no fresh allocation, hence no page faults)."""
    B, C, H, W = x.shape
    shape = (B, C, H + 2 * ph, W + 2 * pw)
    if buf is None or buf.numel() < math.prod(shape):
        return F.pad(x, (pw, pw, ph, ph)).contiguous()
    xp = buf[: math.prod(shape)].view(shape)
    if ph:
        xp[:, :, :ph].zero_()
        xp[:, :, H + ph:].zero_()
    if pw:
        xp[:, :, ph:H + ph, :pw].zero_()
        xp[:, :, ph:H + ph, W + pw:].zero_()
    xp[:, :, ph:H + ph, pw:W + pw].copy_(x)
    return xp


def im2col(x: torch.Tensor, kernel, stride, padding, *, start=(0, 0), grid=None, rect=None,
           ones_row: bool = False, dest: torch.Tensor | None = None,
           pad_buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Patches of x (B, C, H, W) as a feature-major matrix (C*kh*kw [+1], B*I*J).

    grid = (I, J) (default: the ordinary conv output size). Columns (b, i, j) with (i, j) in
    rect = ((i0, i1), (j0, j1)) (default: the whole grid) hold, in row (c, u, v),
        x_pad[b, c, start_h + stride_h * (i - i0) + u, start_w + stride_w * (j - j0) + v]
    with x_pad = x zero-padded by `padding`, and a 1 in the last row when ones_row. Columns
    outside rect are entirely 0 (ones row included). dest: optional contiguous
    (rows, B*I*J) matrix written in place (e.g. rows of a larger buffer); pad_buffer: optional
    flat scratch for the padded copy of x (see pad_into).
    """
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    B, C, H, W = x.shape
    if grid is None:
        grid = (out_len(H, kh, sh, ph), out_len(W, kw, sw, pw))
    I, J = grid
    (i0, i1), (j0, j1) = rect if rect is not None else ((0, I), (0, J))
    d, n = C * kh * kw, B * I * J
    rows = d + int(ones_row)
    mat = x.new_empty(rows, n) if dest is None else dest
    if mat.shape != (rows, n) or not mat.is_contiguous():
        raise ValueError("im2col: dest must be a contiguous (rows, B*I*J) matrix")
    full = (i0, i1, j0, j1) == (0, I, 0, J)
    if not full:
        mat.zero_()
    ni, nj = i1 - i0, j1 - j0
    if d and n and ni > 0 and nj > 0:
        xp = pad_into(x, ph, pw, pad_buffer) if (ph or pw) else x.contiguous()
        Hp, Wp = xp.shape[-2:]
        if start[0] + sh * (ni - 1) + kh > Hp or start[1] + sw * (nj - 1) + kw > Wp or min(start) < 0:
            raise ValueError("im2col window leaves the padded input")
        src = xp.as_strided((C, kh, kw, B, ni, nj), (Hp * Wp, Wp, 1, C * Hp * Wp, sh * Wp, sw),
                            xp.storage_offset() + start[0] * Wp + start[1])
        mat[:d].view(C, kh, kw, B, I, J)[:, :, :, :, i0:i1, j0:j1].copy_(src)
    if ones_row:
        if full:
            mat[d].fill_(1.0)
        elif ni > 0 and nj > 0:
            mat[d].view(B, I, J)[:, i0:i1, j0:j1].fill_(1.0)
    return mat


def linear_features(x: torch.Tensor, ones_row: bool, dest: torch.Tensor | None = None) -> torch.Tensor:
    """Inputs of a Linear layer, (B, *, d) -> feature-major (d [+1], B * prod(*)).

    Without dest and without the ones row this is a transposed view (no copy); BLAS takes it
    as is. With dest (contiguous (rows, columns)) the features are written into it.
    """
    flat = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    if dest is None:
        if ones_row:
            flat = torch.cat([flat, flat.new_ones(flat.shape[0], 1)], dim=1)
        return flat.t()
    d = flat.shape[1]
    dest[:d].copy_(flat.t())
    if ones_row:
        dest[d].fill_(1.0)
    return dest


def gradient_rows(g: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """g = dloss/da written feature-major into dest (m, columns), columns ordered (b, i, j) like
    the patches (conv: g (B, m, H2, W2); linear: g (B, *, m))."""
    if g.dim() == 4:
        B, m, H2, W2 = g.shape
        dest.view(m, B, H2, W2).copy_(g.permute(1, 0, 2, 3))
    else:
        dest.copy_(g.reshape(math.prod(g.shape[:-1]), g.shape[-1]).t())
    return dest


def site_dims(site) -> tuple[int, int, int]:
    """(d1, d2, m) the statistics of this site must have (bias features included)."""
    l1, l2 = site.l1, site.l2
    if site.is_conv:
        (k1h, k1w), _, _ = conv_geometry(l1)
        (k2h, k2w), _, _ = conv_geometry(l2)
        d1, d2 = l1.in_channels * k1h * k1w, l2.in_channels * k2h * k2w
    else:
        d1, d2 = l1.in_features, l2.in_features
    return d1 + (l1.bias is not None), d2 + (l2.bias is not None), site.out_width
