"""Sampling: which domain each training step draws from and which images its batch holds.

`domain_at(step, ...)` says which domain a training step draws from (the samplers of the paper's data mixing:
round robin, balanced, proportional, adaptive) and `batch_indices` the indices of its batch. Both are pure
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

Sampler = Literal["target_only", "round_robin", "balanced", "proportional", "adaptive"]
SAMPLERS = ("target_only", "round_robin", "balanced", "proportional", "adaptive")


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
    adapts it from the training losses, `regularizers.adaptive_generic_share`); target_only: always 0."""
    if sampler == "target_only":
        return 0
    if sampler == "round_robin":
        return step % 2
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
            workers: int | None = None, adaptive: AdaptiveState | None = None):
    """The training stream: (step, domain, idx, uint8 images) from global step `start` on, a pure function of
    (seed, step) (and, for the adaptive sampler, of `adaptive.p_generic` when each step is drawn). In-memory splits
    are indexed directly; file splits are decoded ahead in DataLoader workers (in the main process for the
    adaptive sampler, whose next domain is not known ahead). Under torchrun each process gets its slice of every
    batch (distributed.batch_slice)."""
    from .distributed import batch_slice
    sizes = (len(domains[0]), len(domains[1]) if domains[1] is not None else 0)
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


def file_loader(split: FileSplit, index_lists: list, workers: int | None):
    """The batches split.take(index_lists[i]), in order, decoded ahead in `workers` DataLoader workers. Under
    torchrun the workers start from a fork server: a worker forked from a process whose process group runs
    background threads can inherit a held lock and wait forever (seen: a 2-process run's validation hung with its
    worker on a futex)."""
    from torch.utils.data import DataLoader

    from . import distributed
    workers = default_workers() if workers is None else workers
    loader = DataLoader(_Take(split, index_lists), batch_size=None, shuffle=False, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=False,
                        prefetch_factor=4 if workers else None,
                        multiprocessing_context="forkserver" if workers and distributed.active() else None)
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
