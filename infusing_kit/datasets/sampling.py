"""Sampling: which domain each training step draws from and which images its batch holds.

`domain_at(step, ...)` says which domain a training step draws from (the samplers of the paper's data mixing:
round robin, balanced, proportional, adaptive; `OfficialAdaptive` for the official code's dynamic rule,
"adaptive_official") and `batch_indices` the indices of its batch. Both are pure
functions of (seed, step), so a resumed run sees exactly the batches an uninterrupted one would, with any number
of workers; `batches` is the training stream built from them (in-memory splits indexed directly, file splits
decoded ahead in DataLoader workers). `chunks` reads a split in order for evaluation, through the same loader.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .data import AnySplit, FileSplit, Split

Sampler = Literal["target_only", "round_robin", "balanced", "proportional", "adaptive", "adaptive_official"]
SAMPLERS = ("target_only", "round_robin", "balanced", "proportional", "adaptive", "adaptive_official")
ADAPTIVE = ("adaptive", "adaptive_official")  # samplers whose schedule depends on the run's losses


@dataclass
class AdaptiveState:
    """The adaptive sampler's state (train() updates it from the training losses; resumable): the probability of a
    generic batch, and how many target batches were drawn before the current step."""
    p_generic: float = 0.5
    target_done: int = 0


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step, stream): the randomness of one training step."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def domain_at(step: int, sampler: Sampler, seed: int, sizes: tuple[int, int], p_generic: float | None = None) -> int:
    """0 (target) or 1 (generic) for global step `step`.

    round_robin: target, generic, target, ... (the paper); balanced: each with probability 1/2;
    proportional: probability proportional to the datasets' sizes; adaptive: probability `p_generic` (train()
    adapts it from the training losses, `regularizers.adaptive_generic_share`, the kit's variant); target_only:
    always 0. adaptive_official draws from an `OfficialAdaptive` state instead (the official code's rule)."""
    if sampler == "target_only":
        return 0
    if sampler == "round_robin":
        return step % 2
    if sampler == "adaptive_official":
        raise ValueError("the adaptive_official sampler's domains come from its OfficialAdaptive state")
    if sampler == "adaptive":
        if p_generic is None:
            raise ValueError("the adaptive sampler needs its current p_generic")
    elif sampler in ("proportional", "balanced"):
        p_generic = 0.5 if sampler == "balanced" else sizes[1] / (sizes[0] + sizes[1])
    else:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return int(torch.rand(1, generator=step_generator(seed, step, 1)).item() < p_generic)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """batch_size distinct indices in [0, n) (all n if the set is smaller), drawn for this step."""
    return torch.randperm(n, generator=step_generator(seed, step, 2))[:batch_size]


def schedule(sampler: Sampler, seed: int, sizes: tuple[int, int], target_steps: int, start: int = 0):
    """(step, domain) pairs from global step `start` until `target_steps` target batches have been drawn."""
    target = sum(domain_at(s, sampler, seed, sizes) == 0 for s in range(start))
    step = start
    while target < target_steps:
        d = domain_at(step, sampler, seed, sizes)
        yield step, d
        target += d == 0
        step += 1


def batches(domains: tuple, sampler: Sampler, seed: int, batch_size: int, target_steps: int, start: int = 0,
            workers: int | None = None, adaptive: "AdaptiveState | OfficialAdaptive | None" = None):
    """The training stream: (step, domain, idx, uint8 images) from global step `start` on, a pure function of
    (seed, step) (and, for the adaptive sampler, of `adaptive.p_generic` when each step is drawn). In-memory splits
    are indexed directly; file splits are decoded ahead in DataLoader workers (in the main process for the
    adaptive sampler, whose next domain is not known ahead). Under torchrun each process gets its slice of every
    batch (distributed.batch_slice)."""
    from ..distributed import batch_slice
    sizes = (len(domains[0]), len(domains[1]) if domains[1] is not None else 0)
    if sampler == "adaptive_official":
        if not isinstance(adaptive, OfficialAdaptive):
            raise ValueError("sampler='adaptive_official' needs its OfficialAdaptive state")
        step = start
        while adaptive.target_done < target_steps:
            d = adaptive.domain(step, seed)
            idx = batch_slice(batch_indices(sizes[d], batch_size, seed, step))
            yield step, d, idx, domains[d].take(idx)
            adaptive.target_done += d == 0
            step += 1
        return
    if sampler == "adaptive":
        if adaptive is None:
            raise ValueError("sampler='adaptive' needs its AdaptiveState")
        step = start
        while adaptive.target_done < target_steps:
            d = domain_at(step, sampler, seed, sizes, adaptive.p_generic)
            idx = batch_slice(batch_indices(sizes[d], batch_size, seed, step))
            yield step, d, idx, domains[d].take(idx)
            adaptive.target_done += d == 0
            step += 1
        return
    plan = [(s, d, batch_slice(batch_indices(sizes[d], batch_size, seed, s))) for s, d in  # this rank's part
            schedule(sampler, seed, sizes, target_steps, start)]
    if all(d is None or isinstance(d, Split) for d in domains):
        for s, d, idx in plan:
            yield s, d, idx, domains[d].images[idx]
        return
    if any(isinstance(d, Split) for d in domains if d is not None):  # the rest decode on demand (files, records)
        raise ValueError("mix of in-memory and file splits: use one kind for the target and the generic data")
    merged = _Domains(domains)
    for (s, d, idx), images in zip(plan, file_loader(merged, [(d, idx) for _, d, idx in plan], workers)):
        yield s, d, idx, images


# ---------------------------------------------------------------------------- the official dynamic rule
def official_weights(losses, previous, ema: float = 0.0) -> tuple[float, ...]:
    """The official code's dynamic sampling weights (`sampling_utils.calc_sampling_weights`, github
    nikosips/infusing), one per domain (target first, as the official dataset order).

    losses[d]: domain d's mean raw classifier loss over the last window, or None for a domain without one (no
    classifier on its batches, as the generic domain of the paper's method, or no batch drawn in the window).
    previous: the current weights (summing to 1). With every domain's loss known (the official case):
        raw_d = L_d / sum_e L_e;   new_d = ema * previous_d + (1 - ema) * raw_d
    (the official smoothing `do_ema_on_sampler`, decay 0.3 in its config; ema = 0: none), no clipping: a domain
    whose loss is higher gets more batches. A domain without a loss keeps its previous weight (the official code
    keeps the old weight of a domain missing from its metrics; on a domain present without a classifier loss it
    stops with a KeyError), and the domains with a loss share the rest in proportion to their losses. No loss at
    all, or losses summing to 0: the weights stay."""
    previous = [float(p) for p in previous]
    if len(losses) != len(previous):
        raise ValueError(f"{len(losses)} losses for {len(previous)} domains")
    have = [d for d, l in enumerate(losses) if l is not None]
    if any(not np.isfinite(losses[d]) or losses[d] < 0 for d in have):
        raise ValueError(f"the classifier losses must be finite and >= 0, got {losses}")
    total = sum(float(losses[d]) for d in have)
    if not have or total <= 0:
        return tuple(previous)
    rest = sum(previous[d] for d in have)  # the share the domains with a loss hold between them
    new = list(previous)
    for d in have:
        new[d] = ema * previous[d] + (1 - ema) * rest * float(losses[d]) / total
    return tuple(new)


def official_counts(weights, period: int) -> list[int]:
    """Batches of each domain in a block of `period` steps, as the official `_indices_from_weights`: int(period x
    w_d) (truncated) for every domain but the last, which gets the remainder, so the counts sum to `period`."""
    counts = [int(period * float(w)) for w in weights[:-1]]
    return counts + [period - sum(counts)]


def official_block(weights, period: int, seed: int, start: int) -> torch.Tensor:
    """The domains of the `period` steps from global step `start`: exactly `official_counts` of each, in an order
    shuffled by (seed, start) alone (stream 3 of `step_generator`; a resumed run rebuilds the same block)."""
    counts = official_counts(weights, period)
    order = torch.cat([torch.full((c,), d, dtype=torch.long) for d, c in enumerate(counts)])
    return order[torch.randperm(period, generator=step_generator(seed, start, 3))]


@dataclass
class OfficialAdaptive:
    """The state of sampler="adaptive_official" (train() feeds it each step's raw classifier loss; resumable).

    Global steps run in blocks of `period` (TrainConfig.adaptive_every; the official update_sampler_every_steps is
    1000). Each block is a shuffled list holding exactly `official_counts(weights, period)` batches of each domain;
    at the first step of the next block the weights are recomputed by `official_weights` from the mean classifier
    loss of each domain's batches in the block just finished (smoothing `ema`: TrainConfig.adaptive_ema; the
    official do_ema_on_sampler uses 0.3), and the next block is drawn. The first block has weights 1/2, 1/2 (the
    official balanced start). The generic domain of the kit has no classifier loss, so under this rule it keeps
    its share of 1/2 (official_weights) and the blocks stay balanced: the rule only moves shares between domains
    that each have a classifier loss."""
    period: int = 1000
    ema: float = 0.0
    weights: tuple = (0.5, 0.5)
    block_start: int = 0
    sums: list = None            # per domain: sum and number of the classifier losses seen in the current block
    counts: list = None
    target_done: int = 0
    _block: torch.Tensor | None = None

    def __post_init__(self):
        n = len(self.weights)
        self.sums = [0.0] * n if self.sums is None else list(self.sums)
        self.counts = [0] * n if self.counts is None else list(self.counts)

    def domain(self, step: int, seed: int) -> int:
        """The domain of global step `step` (steps are asked for in order; a new block is drawn at its first)."""
        start = step - step % self.period
        if start != self.block_start:
            if start < self.block_start:
                raise ValueError(f"step {step} lies before the current block (from step {self.block_start})")
            self.weights = official_weights(self.window_losses(), self.weights, self.ema)
            self.sums, self.counts = [0.0] * len(self.weights), [0] * len(self.weights)
            self.block_start, self._block = start, None
        if self._block is None:
            self._block = official_block(self.weights, self.period, seed, start)
            if not bool((self._block == 0).any()):
                raise ValueError(f"the official rule gave the target domain no batch of {self.period} (weights "
                                 f"{self.weights}): training could not go on")
        return int(self._block[step - start])

    def observe(self, domain: int, classifier_loss: float | None) -> None:
        """One step's raw (unweighted) classifier loss; None: the batch had no classifier."""
        if classifier_loss is not None:
            self.sums[domain] += float(classifier_loss)
            self.counts[domain] += 1

    def window_losses(self) -> list[float | None]:
        """Each domain's mean classifier loss in the current block (None: none seen), averaged over every process
        under torchrun (each sees its slice of the batch), so that every rank draws the same next block."""
        from ..distributed import mean_over_ranks
        both = mean_over_ranks(torch.tensor(self.sums + [float(c) for c in self.counts], dtype=torch.float64))
        n = len(self.weights)
        return [float(both[d] / both[n + d]) if both[n + d] > 0 else None for d in range(n)]

    def state_dict(self) -> dict:
        return {"weights": list(self.weights), "block_start": self.block_start, "sums": list(self.sums),
                "counts": list(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.weights, self.block_start = tuple(state["weights"]), int(state["block_start"])
        self.sums, self.counts, self._block = list(state["sums"]), list(state["counts"]), None


class _Domains:
    """Two file splits behind one take((domain, idx)) for the loader."""

    def __init__(self, domains):
        self.domains = domains

    def take(self, item):
        d, idx = item
        return self.domains[d].take(idx)


# ---------------------------------------------------------------------------- loading batches
def chunks(split: AnySplit, batch_size: int, workers: int | None = None):
    """Consecutive batches of a split (evaluation, teacher extraction): uint8 tensors, in order. A FileSplit
    is decoded in DataLoader workers."""
    n = len(split)
    if isinstance(split, Split):
        for i in range(0, n, batch_size):
            yield split.images[i:i + batch_size]
        return
    order = [np.arange(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]
    yield from file_loader(split, order, workers)


def _records(split) -> bool:
    """A records split (ArrayRecord / TFRecord): its C++ readers and their threads must not be forked (a forked
    worker segfaulted in a full test session); workers start from a fork server and open their own readers. The
    training loader's `_Domains` counts as records when any of its domains is one (the fix that looked at the split
    alone left training forked, and CI's full session segfaulted again)."""
    if isinstance(split, _Domains):
        return any(_records(d) for d in split.domains if d is not None)
    return getattr(split, "kind", None) in ("array_record", "tfrecord")


def file_loader(split: FileSplit, index_lists: list, workers: int | None):
    """The batches split.take(index_lists[i]), in order, decoded ahead in `workers` DataLoader workers. Under
    torchrun the workers start from a fork server: a worker forked from a process whose process group runs
    background threads can inherit a held lock and wait forever (seen: a 2-process run's validation hung with its
    worker on a futex).

    The loader draws its workers' base seed from a generator of its own, never from the process's global torch
    random state: every DataLoader iterator would otherwise take one number from it (`torch.utils.data`'s
    `_base_seed`, also with num_workers=0), so a run reading files would leave the global state elsewhere than the
    same run on in-memory splits, which never creates a loader. Decoding draws nothing at random, so the workers'
    seeds change no pixel."""
    from torch.utils.data import DataLoader

    from .. import distributed
    workers = default_workers() if workers is None else workers
    loader = DataLoader(_Take(split, index_lists), batch_size=None, shuffle=False, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=False,
                        prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(0),
                        multiprocessing_context="forkserver" if workers and (distributed.active() or _records(split))
                        else None)
    yield from loader


class _Take(torch.utils.data.Dataset):
    """Item i = the whole batch split.take(index_lists[i]), decoded in a worker (one tensor per batch)."""

    def __init__(self, split: FileSplit, index_lists: list):
        self.split, self.index_lists = split, index_lists

    def __len__(self):
        return len(self.index_lists)

    def __getitem__(self, i):
        return self.split.take(self.index_lists[i])


def default_workers() -> int:
    """Decoding workers: all cores but one (at least 0: decode in the main process on a single core)."""
    return max(0, min(16, (os.cpu_count() or 1) - 1))
