"""The optimisation step behind one small interface, whatever the update: dense Adam over every parameter,
or lazy Adam on the table rows a batch touches (``train.sparse``) with dense Adam for the rest, on one
process or data-parallel (``train.distributed``: gradients averaged over ranks, touched rows gathered).

The trainer calls, per step: ``prepare(idx)`` (in the loader thread), ``begin(prepared)``, then after the
forward pass ``backward(total, loss)`` -> (this rank's loss, the loss every rank checks), and ``step()``.
"""

from __future__ import annotations

from typing import Any

import torch

from deepfm.models.ctr import CTRModel
from deepfm.train import distributed as dist
from deepfm.train.sparse import SparseEmbeddings


class Updater:
    """Adam for ``model``: parameter groups (the rest; the MLP with ``net_l2`` weight decay; the first-order
    weights and the bias at ``wide_lr_scale`` x lr when scaled), the fused tables under lazy Adam when
    ``sparse``, and the gradient all-reduce when more than one rank trains."""

    def __init__(self, model: CTRModel, lr: float, sparse: bool = False, wide_lr_scale: float = 1.0) -> None:
        self.sparse = SparseEmbeddings(model, lr) if sparse else None
        tables = {id(t.weight) for t in self.sparse.tables} if self.sparse else set()
        named = [(n, p) for n, p in model.named_parameters() if id(p) not in tables]
        dense = [p for n, p in named if n.startswith("dnn.")]
        # the first-order weights and the bias at wide_lr_scale x lr (their own group only when scaled)
        wide = [p for n, p in named if n in ("bias", "w.weight")] if wide_lr_scale != 1 else []
        other = [p for n, p in named if not n.startswith("dnn.") and not any(p is q for q in wide)]
        # fused: one kernel per tensor for the whole Adam update (half the foreach time on CPU); same algorithm
        groups = [{"params": other}, {"params": dense, "weight_decay": model.cfg.net_l2}]
        self.opt = torch.optim.Adam(groups + ([{"params": wide, "lr": lr * wide_lr_scale}] if wide else []),
                                    lr=lr, fused=True)
        self.ranks = dist.world()
        # the parameters whose gradients are averaged over ranks (the tables under lazy Adam are gathered)
        self.reduce = [p for p in model.parameters() if id(p) not in tables and p.requires_grad]

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def scale_lr(self, factor: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] *= factor
        if self.sparse:
            self.sparse.lr *= factor

    def prepare(self, idx: torch.Tensor) -> Any:
        """What ``begin`` needs for the batch ``idx`` (numpy only: a loader thread may call it); None if nothing."""
        return self.sparse.prepare(idx) if self.sparse else None

    def begin(self, prepared: Any) -> None:
        if self.sparse:
            self.sparse.begin(*prepared)

    def backward(self, total: torch.Tensor, loss: torch.Tensor) -> tuple[float, float]:
        """Gradients of ``total`` (the loss plus penalties), averaged over ranks; returns (this rank's ``loss``,
        the mean over ranks, in the same all-reduce: every rank sees a NaN on any rank)."""
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        loss_value = checked = loss.item()
        if self.ranks > 1:
            for p in self.reduce:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            mean_loss = loss.detach().reshape(1).clone()
            dist.allreduce_mean([p.grad for p in self.reduce] + [mean_loss])
            checked = mean_loss.item()
        return loss_value, checked

    def step(self) -> None:
        self.opt.step()
        if self.sparse:
            self.sparse.step(dist.allgather_rows if self.ranks > 1 else None)

    def state_dict(self) -> dict[str, Any]:
        return {"adam": self.opt.state_dict(), "lazy_adam": self.sparse.state_dict() if self.sparse else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["lazy_adam"] is None) != (self.sparse is None):
            raise ValueError("the optimiser state is of another embedding update (dense/sparse)")
        self.opt.load_state_dict(state["adam"])
        if self.sparse:
            self.sparse.load_state_dict(state["lazy_adam"])
