"""Data parallel training across processes started by torchrun (torch.distributed; no launcher of the kit's own).

  torchrun --nproc_per_node N -m infusing_kit experiment --config FILE.toml --out DIR

Every rank draws the same (seed, step) batch and takes its contiguous slice of it (the global batch and the data
order do not depend on N); gradients are averaged over ranks with one all-reduce per step, so the update equals
the one-process update on the global batch (up to float summation order). The weight-space penalties add their
analytic gradient after that average, identically on every rank (it depends only on the weights). Teacher
extraction, validation and test embeddings are split across ranks and gathered. Rank 0 writes checkpoints, logs,
metrics and registry rows. Resume works with the same N.

Outside torchrun (WORLD_SIZE unset or 1) every function here is a no-op.
"""
from __future__ import annotations

import atexit
import os

import numpy as np
import torch
import torch.distributed as dist


def init_from_env(device: str = "cpu") -> str:
    """Start the process group when launched by torchrun (gloo on the CPU, nccl on GPUs); returns this rank's
    device ("cuda" becomes "cuda:LOCAL_RANK")."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        atexit.register(shutdown)
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if active() and str(device) == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def shutdown() -> None:
    """Destroy the process group (at exit): its threads are joined, so a rank does not abort at interpreter exit
    with "terminate called without an active exception" (seen once on rank 0 of a 2-process search)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def local_slice(n: int) -> slice:
    """This rank's contiguous part of n items (the first ranks take one more when n does not divide)."""
    base, extra = divmod(n, world())
    start = rank() * base + min(rank(), extra)
    return slice(start, start + base + (rank() < extra))


def batch_slice(idx: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global batch (which must divide evenly: every rank's mean then weighs the same)."""
    if not active():
        return idx
    if len(idx) % world():
        raise ValueError(f"batch_size {len(idx)} does not divide among {world()} processes; choose a multiple of "
                         f"{world()} (the update must equal the one-process update on the global batch)")
    return idx[local_slice(len(idx))]


@torch.no_grad()
def average_gradients(params: list[torch.Tensor]) -> None:
    """All-reduce the gradients of `params` into their mean over ranks, in one flat buffer."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def broadcast_module(module: torch.nn.Module) -> None:
    """Every rank takes rank 0's weights (parameters and buffers): all ranks start from one model, whatever each
    loaded or initialised."""
    if not active():
        return
    with torch.no_grad():
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


def broadcast_object(obj):
    """Rank 0's Python object on every rank (e.g. a search trial's parameters)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (for logging the global batch's losses)."""
    if not active():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world()


def gather_rows(part: np.ndarray, n: int) -> np.ndarray:
    """Concatenate every rank's rows (in rank order) into the full (n, ...) array, on every rank."""
    if not active():
        return part
    t = torch.from_numpy(np.ascontiguousarray(part))
    sizes = [local_slice_len(n, r) for r in range(world())]
    pieces = [torch.zeros((s, *t.shape[1:]), dtype=t.dtype) for s in sizes]
    dist.all_gather(pieces, t) if all(s == sizes[0] for s in sizes) else _gather_uneven(pieces, t, sizes)
    return torch.cat(pieces).numpy()


def local_slice_len(n: int, r: int) -> int:
    base, extra = divmod(n, world())
    return base + (r < extra)


def _gather_uneven(pieces, t, sizes):
    biggest = max(sizes)
    padded = torch.zeros((biggest, *t.shape[1:]), dtype=t.dtype)
    padded[:len(t)] = t
    bufs = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(bufs, padded)
    for i, s in enumerate(sizes):
        pieces[i].copy_(bufs[i][:s])


def check_config(cfg) -> None:
    """Settings whose meaning would change under data parallelism."""
    if active() and cfg.relational > 0:
        raise ValueError("relational distillation compares all pairs in a batch; split across processes each rank "
                         "would see only its slice's pairs. Run it in one process (or set relational=0)")
    if active() and cfg.avl > 0:
        raise ValueError("DiVE's average vector loss centres the difference vectors on their batch mean; split across "
                         "processes each rank would use its slice's mean. Run it in one process (or set avl=0)")
