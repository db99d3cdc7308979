"""A small deterministic greedy all-pairs (pairwise) generator for test matrices.

all_pairs(factors, valid) returns combinations (dicts factor -> value) such that every pair of
values of two different factors that occurs in at least one valid combination occurs in at
least one returned combination. Greedy: among all valid combinations of the full product
(enumerated in order, so only for factor spaces of up to some tens of thousands of combinations), take the
one covering the most still-uncovered pairs, the first in product order on ties; repeat until
every coverable pair is covered. The result depends only on the arguments.
"""
from __future__ import annotations

import itertools
from typing import Callable, Hashable, Sequence

def all_pairs(factors: dict[str, Sequence[Hashable]],
              valid: Callable[[dict], bool] = lambda combo: True) -> list[dict]:
    """Valid combinations covering every coverable pair of factor values (module doc). A pair of
    values is a bit of an int, the pairs a combination covers an int mask: counting the still
    uncovered pairs of a candidate is a popcount (fast enough for tens of thousands of candidates)."""
    names = list(factors)
    values = [list(factors[n]) for n in names]
    if any(not v for v in values):
        raise ValueError("every factor needs at least one value")
    # bit of the pair (factor i, value a), (factor j, value b), i < j
    bit, n = {}, 0
    for i, j in itertools.combinations(range(len(values)), 2):
        for a, b in itertools.product(range(len(values[i])), range(len(values[j]))):
            bit[i, a, j, b], n = 1 << n, n + 1
    candidates = []
    for indices in itertools.product(*(range(len(v)) for v in values)):
        combo = {name: values[i][k] for i, (name, k) in enumerate(zip(names, indices))}
        if valid(combo):
            mask = 0
            for (i, a), (j, b) in itertools.combinations(enumerate(indices), 2):
                mask |= bit[i, a, j, b]
            candidates.append((combo, mask))
    uncovered = 0
    for _, mask in candidates:
        uncovered |= mask
    chosen = []
    while uncovered:
        combo, mask = max(candidates, key=lambda c: (c[1] & uncovered).bit_count())  # max keeps the first on ties
        chosen.append(combo)
        uncovered &= ~mask
    return chosen


def covered_pairs(combos: list[dict]) -> set[tuple[tuple[str, Hashable], tuple[str, Hashable]]]:
    """Every ((factor, value), (factor, value)) pair the combinations cover (for checks)."""
    out = set()
    for combo in combos:
        out.update(itertools.combinations(list(combo.items()), 2))
    return out
