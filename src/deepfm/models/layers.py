"""The blocks DeepFM is made of, each a few lines to check against the paper (Guo et al. 2017, eq. 1-4).

Inputs everywhere: ``idx`` [B, S] int64 per-field local indices and ``val`` [B, S] float32 values, one
slot per categorical/numeric field and ``max_len`` slots per multi-valued field (see data.store.Batcher).
These are the plain PyTorch blocks; ``deepfm.accel.accelerate`` swaps in their fused CPU versions.

>>> from deepfm.layout import FieldSpec
>>> table = FusedTable([FieldSpec("a", "cat", 5, 1), FieldSpec("tags", "multi", 4, 2, "sum")], dim=3, std=0.1)
>>> e = table(torch.tensor([[1, 2, 3]]), torch.tensor([[1.0, 0.5, 0.5]]))  # a=1, tags=(2, 3)
>>> e.shape, fm_second_order(e).shape, MLP(6, [8], 0.5, False, "relu")(e.flatten(1)).shape
(torch.Size([1, 2, 3]), torch.Size([1]), torch.Size([1]))
"""

from __future__ import annotations

import torch
from torch import nn

from deepfm.layout import FieldSpec
from deepfm.models.dropout import FastDropout


class FusedTable(nn.Module):
    """One ``[sum(field sizes), dim]`` table for all fields; slot i reads rows ``offset[field(i)] + idx``.

    forward(idx [B, S], val [B, S]) -> [B, F, dim]: e_i = x_i * row_i per field i (the paper's x_i v_i,
    Sec. 2.1), the slots of a multi-valued field summed into their field."""

    def __init__(self, fields: list[FieldSpec], dim: int, std: float) -> None:
        super().__init__()
        sizes = torch.tensor([f.size for f in fields])
        field_offsets = torch.cumsum(sizes, 0) - sizes
        slot_field = torch.repeat_interleave(torch.arange(len(fields)), torch.tensor([f.slots for f in fields]))
        self.register_buffer("slot_offsets", field_offsets[slot_field], persistent=False)
        self.register_buffer("slot_field", slot_field, persistent=False)
        self.n_fields = len(fields)
        self.sizes = [f.size for f in fields]  # rows per field, in order
        self.pooled = len(slot_field) != len(fields)
        self.weight = nn.Parameter(torch.empty(int(sizes.sum()), dim))
        nn.init.normal_(self.weight, std=std) if std > 0 else nn.init.zeros_(self.weight)
        # (inv [B, S] into leaf, leaf [U, dim] = weight[unique rows]) for one step of train.sparse, so that
        # autograd produces a [U, dim] gradient instead of a dense [sum(sizes), dim] one
        self.gathered: tuple[torch.Tensor, torch.Tensor] | None = None

    def use_gathered(self, inv: torch.Tensor, leaf: torch.Tensor) -> None:
        """Read rows ``leaf[inv]`` (leaf [U, dim], inv [B, S] into it) until :meth:`clear_gathered`."""
        self.gathered = (inv, leaf)

    def clear_gathered(self) -> None:
        self.gathered = None

    def global_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, S] local indices -> [B, S] row numbers in the fused table."""
        return idx + self.slot_offsets

    def source(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(table [R, dim], rows [B, S] into it): the whole table, or this step's gathered leaf."""
        if self.gathered is not None:
            inv, leaf = self.gathered
            return leaf, inv
        return self.weight, self.global_rows(idx)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, S] -> [B, S, dim]: the table rows each slot uses."""
        table, rows = self.source(idx)
        return table.index_select(0, rows.reshape(-1)).view(*rows.shape, table.shape[1])

    def forward(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        e = self.rows(idx) * val.unsqueeze(-1)  # [B, S, dim]
        if self.pooled:
            e = e.new_zeros(e.shape[0], self.n_fields, e.shape[2]).index_add_(1, self.slot_field, e)
        return e


def fm_second_order(e: torch.Tensor) -> torch.Tensor:
    """[B, F, K] -> [B]: sum_{i<j} <e_i, e_j> = 0.5 * sum_k ((sum_i e_ik)^2 - sum_i e_ik^2) (paper eq. 2)."""
    square_of_sum = e.sum(dim=1).pow(2)
    sum_of_square = e.pow(2).sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)


class InnerProducts(nn.Module):
    """[B, F, K] -> [B, F(F-1)/2]: <e_i, e_j> for every pair i < j, in row-major pair order (0,1), (0,2), ...,
    (1,2), ... (the inner product layer of IPNN, Qu et al. 2016; no parameters). Computed as the Gram matrix
    ``e e^T`` [B, F, F] and its strict upper triangle."""

    def __init__(self, n_fields: int) -> None:
        super().__init__()
        i, j = torch.triu_indices(n_fields, n_fields, offset=1)
        self.register_buffer("pairs", i * n_fields + j, persistent=False)  # flat (i, j) positions in e e^T

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return torch.bmm(e, e.transpose(1, 2)).flatten(1).index_select(1, self.pairs)


def outer_product_sum(e: torch.Tensor) -> torch.Tensor:
    """[B, F, K] -> [B, K*K]: sum_i sum_j e_i e_j^T = f f^T with f = sum_i e_i, flattened row-major (the
    outer product layer of OPNN with Qu et al.'s sum-pooling ("superposition") trick)."""
    f = e.sum(dim=1)
    return (f.unsqueeze(2) * f.unsqueeze(1)).flatten(1)


class MLP(nn.Module):
    """[B, d_in] -> [B]: hidden layers (Linear -> [BatchNorm] -> activation -> Dropout) and a 1-unit output
    (paper eq. 3-4: a^(l+1) = sigma(W^(l) a^(l) + b^(l)), y_DNN = W^|H|+1 a^|H| + b^|H|+1)."""

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
                layers.append(FastDropout(dropout))
            d_in = h
        layers.append(nn.Linear(d_in, 1))
        self.net = nn.Sequential(*layers)  # bundles name the weights dnn.net.<i>: keep this layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)
