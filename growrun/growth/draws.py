"""What a growth event measures on (growrun.train.events.event uses these):

    draw_samples      the statistics batches and the held line-search batch, seeded per event
    log_draw_sizes    the up-front check that the training set holds both draws
    split_at          the network cut before a site's block (front, rest), so that each loss
                      the search evaluates runs from the site's block on
    advance           the search batch carried from one site's block to a later site's block
    measure           the mean loss of a batch without touching BatchNorm running statistics
    global_mean_loss  the mean loss across ranks (each rank holds a share of the batch)
"""
from __future__ import annotations

import functools
import logging

import torch

from growrun.growth import policy
from growrun.models.site import frozen_bn_stats

log = logging.getLogger("growrun")


def draw_samples(split, normalize, n_stats: int, n_search: int, batch_size: int, gen: torch.Generator,
                 memory_format: torch.memory_format):
    """Statistics batches (of batch_size; a last batch of one image joins the one before) and
    the held line-search batch: disjoint, drawn by gen from the split, normalised, not
    augmented; both shrunk by policy.draw_sizes when the split cannot hold them."""
    n_stats, n_search = policy.draw_sizes(len(split), n_stats, n_search) if n_stats else (0, min(n_search, len(split)))
    order = torch.randperm(len(split), generator=gen)[: n_stats + n_search].to(split.images.device)

    def batch(idx):
        x = normalize(split.images.index_select(0, idx))
        return x.contiguous(memory_format=memory_format), split.labels.index_select(0, idx)

    stats = [batch(idx) for idx in _chunks(order[:n_stats], batch_size)] if n_stats else []
    return stats, batch(order[n_stats:])


def _chunks(idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    """idx in chunks of `size`; a last chunk of a single entry is merged into the one before
    (BatchNorm in training mode needs 2 values per channel)."""
    chunks = list(idx.split(size))
    if len(chunks) > 1 and chunks[-1].numel() == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def global_mean_loss(loss_sum, dist):
    """The mean loss over every rank's share of a batch: sum of the shares' sums / their count."""
    def loss(logits, y):
        totals = [loss_sum(logits, y).detach().double(), torch.tensor(float(y.shape[0]), dtype=torch.float64,
                                                                        device=logits.device)]
        dist.sum_(totals)
        return totals[0] / totals[1]

    return loss


def log_draw_sizes(g, n_train: int) -> None:
    """Check up front that the training set holds both growth draws; say so when they shrink."""
    n_stats, n_search = policy.draw_sizes(n_train, g.samples, g.line_search.batch_size)
    if (n_stats, n_search) != (g.samples, g.line_search.batch_size):
        log.info("growth draws shrunk to the %d training images: %d statistics samples (growth.samples=%d), "
                 "%d line-search images (growth.line_search.batch_size=%d)", n_train, n_stats, g.samples,
                 n_search, g.line_search.batch_size)


def split_at(model, name: str):
    """(front, rest): the network before site `name`'s block and from it on (growrun.models.base);
    (identity, model) for a model that cannot be cut."""
    if hasattr(model, "forward_to"):
        return functools.partial(model.forward_to, name), functools.partial(model.forward_from, name)
    return (lambda x: x), model


@torch.no_grad()
def advance(model, start: str, stop: str, z: torch.Tensor) -> torch.Tensor | None:
    """z at `stop`'s block from z at `start`'s block (the model as it is now; models'
    forward_between, BatchNorm running statistics untouched); None when `stop` comes before
    `start` or the model cannot be cut (then front(x) is computed afresh)."""
    names = model.site_names() if hasattr(model, "forward_between") else []
    if start not in names or stop not in names or names.index(stop) < names.index(start):
        return None
    with frozen_bn_stats(model):
        return model.forward_between(start, stop, z)


@torch.no_grad()
def measure(model, batch, loss_fn, forward=None) -> float:
    with frozen_bn_stats(model):
        return float(loss_fn((forward or model)(batch[0]), batch[1]))
