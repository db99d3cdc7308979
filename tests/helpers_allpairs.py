"""A small deterministic greedy all-pairs (pairwise) generator for test matrices.

all_pairs(factors, valid) returns combinations (dicts factor -> value) such that every pair of
values of two different factors that occurs in at least one valid combination occurs in at
least one returned combination. Greedy: among all valid combinations of the full product
(enumerated in order, so only for small factor spaces: a few thousand combinations), take the
one covering the most still-uncovered pairs, the first in product order on ties; repeat until
every coverable pair is covered. The result depends only on the arguments.
"""
from __future__ import annotations

import itertools
from typing import Callable, Hashable, Sequence

Pair = tuple[tuple[int, int], tuple[int, int]]  # ((factor i, value index), (factor j, value index)), i < j


def _pairs(indices: Sequence[int]) -> frozenset[Pair]:
    """The value pairs one combination (given as value indices per factor) covers."""
    return frozenset(((i, a), (j, b)) for (i, a), (j, b) in itertools.combinations(enumerate(indices), 2))


def all_pairs(factors: dict[str, Sequence[Hashable]],
              valid: Callable[[dict], bool] = lambda combo: True) -> list[dict]:
    """Valid combinations covering every coverable pair of factor values (module doc)."""
    names = list(factors)
    values = [list(factors[n]) for n in names]
    if any(not v for v in values):
        raise ValueError("every factor needs at least one value")
    candidates = []
    for indices in itertools.product(*(range(len(v)) for v in values)):
        combo = {n: values[i][k] for i, (n, k) in enumerate(zip(names, indices))}
        if valid(combo):
            candidates.append((combo, _pairs(indices)))
    uncovered = set().union(*(pairs for _, pairs in candidates)) if candidates else set()
    chosen = []
    while uncovered:
        combo, pairs = max(candidates, key=lambda c: len(c[1] & uncovered))  # max keeps the first on ties
        chosen.append(combo)
        uncovered -= pairs
    return chosen


def covered_pairs(combos: list[dict]) -> set[tuple[tuple[str, Hashable], tuple[str, Hashable]]]:
    """Every ((factor, value), (factor, value)) pair the combinations cover (for checks)."""
    out = set()
    for combo in combos:
        out.update(itertools.combinations(list(combo.items()), 2))
    return out
