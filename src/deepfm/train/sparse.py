"""Embedding updates whose cost scales with the rows a batch touches, not with the vocabulary.

Dense Adam over one fused ``[V, K]`` table reads and writes ``V * K`` parameters, gradients and two moment
buffers every step; with Criteo-scale vocabularies (1M-30M rows) that dominates the step. Here each step:

1. ``begin(idx)``: the unique table rows ``u`` of the batch (O(batch) with one persistent scratch array,
   no sort), and for every table a leaf ``weight[u]`` that the table reads through ``inv`` for this step
   (``FusedTable.use_gathered``), so backward yields a ``[U, K]`` gradient;
2. ``step()``: lazy Adam on those rows only (the moments of untouched rows are left as they are, as in
   ``torch.optim.SparseAdam`` and TensorFlow's LazyAdam), with the global step count for bias correction.

The update is the same as Adam for every row a batch touches; rows it does not touch are not moved by
stale momentum (dense Adam moves them). ``TrainConfig.embedding_update`` selects it; the benchmarks
(docs/benchmarks.md) show the AUC of both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from deepfm.models.ctr import CTRModel
from deepfm.models.layers import FusedTable


class UniqueRows:
    """Unique values of a batch of row numbers in ``[0, n)`` without sorting: O(batch) per call, using one
    persistent ``[n]`` int32 scratch array that is never cleared (each call reads only what it wrote)."""

    def __init__(self, n: int) -> None:
        self.pos = np.zeros(n, dtype=np.int32)

    def __call__(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """flat [M] int64 -> (unique rows [U] int64, inverse [M] int64 with ``uniq[inverse] == flat``)."""
        m = np.arange(len(flat), dtype=np.int32)
        self.pos[flat] = m  # one occurrence per value wins, whichever
        uniq = flat[self.pos[flat] == m]  # exactly that occurrence of each value
        self.pos[uniq] = np.arange(len(uniq), dtype=np.int32)
        return uniq, self.pos[flat].astype(np.int64)


class LazyAdam:
    """Adam restricted to the rows of each step (``torch.optim.Adam`` formula, ``amsgrad=False``)."""

    def __init__(self, tables: list[FusedTable], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.tables = tables
        self.lr, self.betas, self.eps = lr, betas, eps
        self.exp_avg = [torch.zeros_like(t.weight) for t in tables]
        self.exp_avg_sq = [torch.zeros_like(t.weight) for t in tables]
        self.steps = 0

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grads: list[torch.Tensor | None]) -> None:
        self.steps += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1**self.steps, 1 - b2**self.steps
        step_size = self.lr / bc1
        for t, m_all, v_all, g in zip(self.tables, self.exp_avg, self.exp_avg_sq, grads, strict=True):
            if g is None:
                continue
            m = m_all.index_select(0, rows).mul_(b1).add_(g, alpha=1 - b1)
            v = v_all.index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / bc2).sqrt_().add_(self.eps)
            w = t.weight.data.index_select(0, rows).addcdiv_(m, denom, value=-step_size)
            m_all.index_copy_(0, rows, m)
            v_all.index_copy_(0, rows, v)
            t.weight.data.index_copy_(0, rows, w)

    def state_dict(self) -> dict[str, Any]:
        """The moments of every table row (tensors, not copies), the step count and the learning rate."""
        return {"exp_avg": list(self.exp_avg), "exp_avg_sq": list(self.exp_avg_sq), "steps": self.steps,
                "lr": self.lr}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("exp_avg", "exp_avg_sq"):
            mine, theirs = getattr(self, name), state[name]
            if len(theirs) != len(mine):
                raise ValueError(f"lazy Adam state has {len(theirs)} {name} tables, the model {len(mine)}")
            for m, t in zip(mine, theirs, strict=True):
                m.copy_(t)
        self.steps, self.lr = int(state["steps"]), float(state["lr"])


class SparseEmbeddings:
    """Drives the sparse path for a model's fused tables (``w`` and ``v`` share slot offsets)."""

    def __init__(self, model: CTRModel, lr: float) -> None:
        self.tables = list(model.tables().values())  # w, v (and fmdnn's v_dnn): same rows and offsets
        n = self.tables[0].weight.shape[0]
        offsets = self.tables[0].slot_offsets
        self.offsets = offsets.cpu().numpy()
        self.device_offsets = offsets  # on the model's device (a GPU: see prepare)
        self.unique = UniqueRows(n) if offsets.device.type == "cpu" else None
        self.opt = LazyAdam(self.tables, lr)
        self.rows: torch.Tensor | None = None
        self.leaves: list[torch.Tensor] = []  # this step's weight[rows] of each table, between begin and step

    def prepare(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """idx [B, S] -> (unique rows [U], inv [B, S]). A CPU batch: numpy only (no sort, O(batch)), so a
        loader thread can call it; a batch on a GPU: ``torch.unique`` there, no copy to the host."""
        if idx.device.type != "cpu":
            return self.prepare_on_device(idx)
        if self.unique is None:  # the tables are on a GPU, the batch is not yet
            self.unique = UniqueRows(self.tables[0].weight.shape[0])
        flat = (idx.numpy() + self.offsets).reshape(-1)
        uniq, inv = self.unique(flat)
        return torch.from_numpy(uniq), torch.from_numpy(inv).view(idx.shape)

    def prepare_on_device(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``prepare`` in torch ops only, where ``idx`` is (unique rows sorted, as ``torch.unique`` gives them)."""
        flat = (idx + self.device_offsets.to(idx.device)).reshape(-1)
        uniq, inv = torch.unique(flat, return_inverse=True)
        return uniq, inv.view(idx.shape)

    def begin(self, rows: torch.Tensor, inv: torch.Tensor) -> None:
        """Make this step's leaves ``weight[rows]`` and have each table read them through ``inv``."""
        self.rows = rows
        self.leaves = [t.weight.detach().index_select(0, rows).requires_grad_() for t in self.tables]
        for t, leaf in zip(self.tables, self.leaves, strict=True):
            t.use_gathered(inv, leaf)

    def step(self, reduce: Callable | None = None) -> None:
        """Apply the lazy Adam update; ``reduce(rows, grads) -> (rows, grads)`` combines ranks first."""
        grads = [leaf.grad for leaf in self.leaves]
        rows = self.rows
        if reduce is not None:
            rows, grads = reduce(rows, grads)
        self.opt.step(rows, grads)
        self.end()

    def end(self) -> None:
        for t in self.tables:
            t.clear_gathered()
        self.rows, self.leaves = None, []

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)

    @property
    def lr(self) -> float:
        return self.opt.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.opt.lr = value
