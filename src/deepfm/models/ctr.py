"""DeepFM and the baselines that share its blocks (LR, FM, DNN), as one class with switches.

    y_hat = sigmoid(b + y_first_order + y_FM + y_DNN)                 (Guo et al. 2017, eq. 1)

- first order: a scalar weight per feature value, times the value (``w``, its own table);
- FM:          pairwise <x_i v_i, x_j v_j> over ALL fields, numeric ones as value x vector (eq. 2);
- DNN:         an MLP over the concatenated field embeddings x_i v_i (eq. 3-4);
- the embeddings ``v`` are ONE table shared by the FM and the DNN (the paper's key point).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from deepfm.data.store import FieldSpec
from deepfm.models.layers import MLP, FastDropout, FusedTable, fm_second_order

# name -> (first order, FM second order, DNN)
MODELS = {"lr": (True, False, False), "fm": (True, True, False), "deepfm": (True, True, True),
          "dnn": (False, False, True)}


@dataclass
class ModelConfig:
    model: str = "deepfm"
    embed_dim: int = 10
    hidden: list[int] = field(default_factory=lambda: [400, 400, 400])
    dropout: float = 0.5
    batch_norm: bool = False
    activation: str = "relu"
    embedding_l2: float = 0.0  # L2 on the embedding rows used in each batch (v and w)
    net_l2: float = 0.0  # L2 (Adam weight decay) on the DNN weights
    init_std: float = 1e-4

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise ValueError(f"unknown model option(s) {sorted(bad)}; allowed: {sorted(known)}")
        cfg = cls(**d)
        if cfg.model not in MODELS:
            raise ValueError(f"unknown model {cfg.model!r} (expected one of {', '.join(MODELS)})")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CTRModel(nn.Module):
    """forward(idx [B, S] int64, val [B, S] float32) -> logits [B]."""

    def __init__(self, fields: list[FieldSpec], cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.use_first, self.use_fm, self.use_dnn = MODELS[cfg.model]
        self.bias = nn.Parameter(torch.zeros(1))
        self.w = FusedTable(fields, 1, std=0.0) if self.use_first else None
        self.v = FusedTable(fields, cfg.embed_dim, std=cfg.init_std) if (self.use_fm or self.use_dnn) else None
        self.dnn = (MLP(len(fields) * cfg.embed_dim, cfg.hidden, cfg.dropout, cfg.batch_norm, cfg.activation)
                    if self.use_dnn else None)

    def forward(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        logit = self.bias.expand(idx.shape[0])
        if self.w is not None:
            logit = logit + self.w(idx, val).sum(dim=(1, 2))
        if self.v is not None:
            e = self.v(idx, val)  # [B, F, K], shared by FM and DNN
            if self.use_fm:
                logit = logit + fm_second_order(e)
            if self.dnn is not None:
                logit = logit + self.dnn(e.flatten(1))
        return logit

    def premake_dropout(self, batch: int) -> None:
        """Draw the dropout masks of a coming training step of ``batch`` rows (see FastDropout.premake)."""
        if self.dnn is None:
            return
        width = self.dnn.net[0].in_features
        for layer in self.dnn.net:
            if isinstance(layer, nn.Linear):
                width = layer.out_features
            elif isinstance(layer, FastDropout) and layer.p > 0:
                layer.premake((batch, width))

    def clear_premade(self) -> None:
        for layer in self.modules():
            if isinstance(layer, FastDropout):
                layer.pending.clear()

    def embedding_penalty(self, idx: torch.Tensor) -> torch.Tensor:
        """Sum of squares of the table rows this batch uses (so the cost scales with the batch, not the
        vocabulary), divided by the batch size; multiply by ``embedding_l2``."""
        total = self.bias.new_zeros(())
        for table in (self.w, self.v):
            if table is not None:
                total = total + table.rows(idx).pow(2).sum()
        return total / idx.shape[0]


def build_model(fields: list[FieldSpec], cfg: ModelConfig) -> CTRModel:
    return CTRModel(fields, cfg)
