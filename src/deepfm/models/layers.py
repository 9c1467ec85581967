"""The blocks DeepFM is made of, each a few lines to check against the paper (Guo et al. 2017, eq. 1-4).

Inputs everywhere: ``idx`` [B, S] int64 per-field local indices and ``val`` [B, S] float32 values, one
slot per categorical/numeric field and ``max_len`` slots per multi-valued field (see data.store.Batcher).
"""

from __future__ import annotations

import torch
from torch import nn

from deepfm.data.store import FieldSpec


class FusedTable(nn.Module):
    """One ``[sum(field sizes), dim]`` table for all fields; slot i reads rows ``offset[field(i)] + idx``."""

    def __init__(self, fields: list[FieldSpec], dim: int, std: float) -> None:
        super().__init__()
        sizes = torch.tensor([f.size for f in fields])
        field_offsets = torch.cumsum(sizes, 0) - sizes
        slot_field = torch.repeat_interleave(torch.arange(len(fields)), torch.tensor([f.slots for f in fields]))
        self.register_buffer("slot_offsets", field_offsets[slot_field], persistent=False)
        self.register_buffer("slot_field", slot_field, persistent=False)
        self.n_fields = len(fields)
        self.pooled = len(slot_field) != len(fields)
        self.weight = nn.Parameter(torch.empty(int(sizes.sum()), dim))
        nn.init.normal_(self.weight, std=std) if std > 0 else nn.init.zeros_(self.weight)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, S] -> [B, S, dim]: the table rows each slot uses."""
        return nn.functional.embedding(idx + self.slot_offsets, self.weight)

    def forward(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        """[B, S] x2 -> [B, F, dim]: x_i * v_i per field (multi-valued slots summed into their field)."""
        e = self.rows(idx) * val.unsqueeze(-1)
        if self.pooled:
            e = e.new_zeros(e.shape[0], self.n_fields, e.shape[2]).index_add_(1, self.slot_field, e)
        return e


def fm_second_order(e: torch.Tensor) -> torch.Tensor:
    """[B, F, K] -> [B]: sum_{i<j} <e_i, e_j> = 0.5 * sum_k ((sum_i e_ik)^2 - sum_i e_ik^2) (paper eq. 2)."""
    square_of_sum = e.sum(dim=1).pow(2)
    sum_of_square = e.pow(2).sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)


class MLP(nn.Module):
    """Hidden layers (Linear -> [BatchNorm] -> activation -> Dropout) and a 1-unit output (paper eq. 3-4)."""

    ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "prelu": nn.PReLU, "gelu": nn.GELU}

    def __init__(self, d_in: int, hidden: list[int], dropout: float, batch_norm: bool, activation: str) -> None:
        super().__init__()
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r} (expected one of {sorted(self.ACTIVATIONS)})")
        layers: list[nn.Module] = []
        for h in hidden:
            layers.append(nn.Linear(d_in, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(self.ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d_in = h
        layers.append(nn.Linear(d_in, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)
