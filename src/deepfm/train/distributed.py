"""Data-parallel training on torch.distributed (launched by torchrun): gloo on CPU, nccl on CUDA (one process
per GPU, ``cuda:$LOCAL_RANK``; the backend follows the training device, ``train.device``, never merely the
presence of CUDA).

Every rank holds the whole model (identical initialisation from the shared seed) and trains on a disjoint
part of each epoch: its share of the rows (in memory) or of the shards (``--streaming``: shard i belongs
to rank i % world). A global batch of ``batch_size`` rows is ``batch_size / world`` rows per rank, so one
process and N processes take the same steps. After each backward pass:

- dense gradients (MLP, and the tables under the dense update) are summed with one all-reduce of a flat
  buffer and divided by the world size: the mean of the per-rank mean losses, the single-process gradient;
- under the sparse (lazy Adam) update, each rank's touched rows and their gradients are all-gathered, so
  every rank applies the same row update and the tables stay identical without a table-sized all-reduce.

Batch-norm running statistics are averaged over ranks after each epoch. Validation is scored by every rank
on a disjoint slice and the logits are gathered, so AUC/logloss are exact over the whole validation set.
Rank 0 writes the checkpoints, the log and the bundle. A rank that fails takes the job down: the others
get an error from their next collective, and torchrun stops the group.
"""

from __future__ import annotations

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist

# where the collectives' own tensors (sizes, flags, gathered arrays) live: the training device under nccl
_device = torch.device("cpu")


def backend_for(device: torch.device | None) -> str:
    """nccl when training on a CUDA device, else gloo (CPU tensors: NCCL cannot take them, even where CUDA
    is present)."""
    return "nccl" if device is not None and device.type == "cuda" else "gloo"


def init_from_env(device: torch.device | None = None) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1) for training on ``device`` (None: the
    CPU); False when running alone."""
    global _device
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = backend_for(device)
        if backend == "nccl":
            assert device is not None
            torch.cuda.set_device(device)
        _device = device if backend == "nccl" and device is not None else torch.device("cpu")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=int(os.environ.get(
            "DEEPFM_DIST_TIMEOUT", "600"))))
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def barrier() -> None:
    if active():
        dist.barrier()


def allreduce_mean(tensors: list[torch.Tensor]) -> None:
    """In place: each tensor becomes its mean over ranks (one all-reduce of a flat buffer)."""
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world()
    s = 0
    for t in tensors:
        t.copy_(flat[s: s + t.numel()].view_as(t))
        s += t.numel()


def allgather_rows(rows: torch.Tensor, grads: list[torch.Tensor | None]) -> tuple[torch.Tensor, list]:
    """Each rank's (unique table rows [U_r], per-table gradients [U_r, K]) -> the union over ranks, with the
    gradients of a row summed over ranks and divided by the world size (the mean-loss gradient)."""
    w = world()
    n = torch.tensor([rows.numel()], dtype=torch.long, device=rows.device)
    sizes = [torch.zeros_like(n) for _ in range(w)]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))

    def gather(t: torch.Tensor) -> torch.Tensor:
        padded = t.new_zeros((top, *t.shape[1:]))
        padded[: t.shape[0]] = t
        out = [torch.empty_like(padded) for _ in range(w)]
        dist.all_gather(out, padded)
        return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes, strict=True)])

    all_rows = gather(rows)
    uniq, inv = torch.unique(all_rows, return_inverse=True)
    summed = []
    for g in grads:
        if g is None:
            summed.append(None)
            continue
        acc = g.new_zeros((uniq.numel(), g.shape[1]))
        acc.index_add_(0, inv, gather(g))
        summed.append(acc / w)
    return uniq, summed


def gather_array(x: np.ndarray) -> list[np.ndarray]:
    """Every rank's 1-D float32 array, in rank order (sizes may differ)."""
    if not active():
        return [x]
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(_device)
    n = torch.tensor([t.numel()], dtype=torch.long, device=_device)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    padded = t.new_zeros(top)
    padded[: t.numel()] = t
    out = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(out, padded)
    return [o[: int(s.item())].cpu().numpy() for o, s in zip(out, sizes, strict=True)]


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's decision (e.g. early stopping), on every rank."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], device=_device)
    dist.broadcast(t, 0)
    return bool(t.item())


def share(order: np.ndarray, owner: np.ndarray | None = None) -> np.ndarray:
    """This rank's part of an epoch's row order: rows owned by it (``owner`` = rank per row, e.g. shard %
    world) or every world-th row; padded by wrapping to the longest part, so all ranks take the same steps."""
    if not active():
        return order
    w, r = world(), rank()
    if owner is None:
        parts = [order[i::w] for i in range(w)]
    else:
        parts = [order[owner == i] for i in range(w)]
    longest = max(p.size for p in parts)
    mine = parts[r]
    if mine.size == 0:
        raise ValueError(f"rank {r} has no training rows: use fewer processes or more shards")
    return np.resize(mine, longest)
