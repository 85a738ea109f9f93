"""How the built-in world's held-out generic combinations are drawn (`world.make_world`, `WorldConfig.design`).

Design 1 (the first near world, and the far world): validation and test are random sets of combinations, so a
small validation has few near-duplicates (37 of 100 combinations with a one-attribute neighbour in the split,
against 988 of 1,000 in the test) and the image-text pairs are spread apart (`spread_combinations`). Design 2:
validation is as dense in near-duplicates as the test at a fraction of its size (`like_test_combinations`), and
the image-text test is drawn in clusters of one-word neighbours (`clustered_combinations`), so neither sits at its
ceiling.
"""
from __future__ import annotations

import numpy as np

from .vocab import N_COMBOS, N_VALUES, attributes_to_combo, combo_to_attributes


def spread_combinations(candidates: np.ndarray, n: int, min_distance: int) -> np.ndarray:
    """The first n of `candidates` (in order, greedily) whose attribute tuples pairwise differ in at least
    `min_distance` of the six attributes. min_distance 1: the first n distinct combinations."""
    attrs = combo_to_attributes(np.arange(N_COMBOS))
    chosen: list[int] = []
    for c in candidates:
        if not chosen or (attrs[chosen] != attrs[c]).sum(1).min() >= min_distance:
            chosen.append(int(c))
            if len(chosen) == n:
                return np.array(chosen, dtype=np.int64)
    raise ValueError(f"only {len(chosen)} of the {n} image-text combinations differ in >= {min_distance} attributes; "
                     "ask for fewer text_pairs or a smaller text_min_distance")


def one_attribute_neighbours(combos: np.ndarray) -> np.ndarray:
    """(N,) for each combination, how many others in `combos` differ from it in exactly one attribute (how many
    near-duplicates a query meets in a split)."""
    a = combo_to_attributes(np.asarray(combos))
    return ((a[:, None, :] != a[None, :, :]).sum(-1) == 1).sum(1)


def clustered_combinations(candidates: np.ndarray, n: int, rate: float, rng: np.random.Generator,
                           exclude=()) -> np.ndarray:
    """n distinct combinations drawn in clusters, none in `exclude`. Each cluster starts at the next free candidate
    (in order) and, for each attribute, adds each other value with probability `rate`; the cluster is every
    combination of the chosen values (a sub-grid, members in random order; the last one is cut at n). Inside a
    cluster a combination has about rate x 23 one-attribute neighbours, in the attributes' proportions, as a random
    split of 5,760 x rate combinations would: a small split as dense in near-duplicates as a large one."""
    used, out = {int(c) for c in np.asarray(exclude).reshape(-1)}, []
    for anchor in np.asarray(candidates):
        if len(out) == n:
            break
        anchor = int(anchor)
        if anchor in used:
            continue
        at = combo_to_attributes(np.array([anchor]))[0]
        values = [[int(at[i])] + [int(v) for v in rng.permutation([v for v in range(k) if v != at[i]])
                                   [:rng.binomial(k - 1, rate)]] for i, k in enumerate(N_VALUES)]
        grid = np.stack(np.meshgrid(*values, indexing="ij"), -1).reshape(-1, len(N_VALUES))
        members = [int(c) for c in rng.permutation(attributes_to_combo(grid)) if int(c) not in used and c != anchor]
        for c in [anchor] + members:
            if len(out) < n:
                out.append(c)
                used.add(c)
    if len(out) < n:
        raise ValueError(f"only {len(out)} of {n} held-out generic combinations are free; ask for fewer")
    return np.array(out, dtype=np.int64)


def like_test_combinations(candidates: np.ndarray, n: int, test: np.ndarray, seed: int, exclude=()) -> np.ndarray:
    """n combinations in clusters (`clustered_combinations`) whose mean number of one-attribute neighbours inside
    the split is the closest, over a grid of cluster rates, to the test split's: a validation as hard as the test
    (each query meets as many near-duplicates), at a fraction of its size. Deterministic from seed."""
    target = one_attribute_neighbours(np.unique(test)).mean()
    best = None
    for rate in np.linspace(0.0, 0.5, 26):
        c = clustered_combinations(candidates, n, float(rate), np.random.default_rng(seed), exclude)
        gap = abs(one_attribute_neighbours(c).mean() - target)
        if best is None or gap < best[0] - 1e-9:
            best = (gap, c)
    return best[1]
