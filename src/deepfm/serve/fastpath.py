"""The trained model's forward pass in plain numpy, for small batches (online serving, 1-row latency).

A torch forward costs tens of dispatched ops of ~5-15 us each, whatever the batch; for one row that
overhead is the whole cost. This evaluates the same equations (Guo et al. 2017, eq. 1-4) in the
model protocol's two steps (``embed``, ``head``; see models/ctr.py) with a handful of numpy calls on the
eval-mode weights, batch norm folded into the linear layers. ``Predictor`` uses it up to ``SMALL_BATCH``
rows and torch above; tests check both agree.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from deepfm.models.ctr import CTRModel
from deepfm.models.layers import FastDropout

SMALL_BATCH = 256
# the model kinds evaluated here; any other (the PNNs, fmdnn) raises ValueError, and Predictor keeps torch
NUMPY_KINDS = ("lr", "fm", "dnn", "deepfm", "wdl", "fnn")


def _act(name: str, param: np.ndarray | None):
    if name == "ReLU":
        return lambda x: np.maximum(x, 0, out=x)
    if name == "Tanh":
        return lambda x: np.tanh(x, out=x)
    if name == "Sigmoid":
        return lambda x: 1.0 / (1.0 + np.exp(-x))
    if name == "PReLU":
        return lambda x: np.where(x > 0, x, param * x)
    return None


class NumpyForward:
    """``__call__(idx [B, S] int64, val [B, S] float32) -> logits [B] float32`` for an eval-mode
    :class:`CTRModel`: the model protocol's ``embed`` and ``head`` in numpy. Raises ``ValueError`` for model
    kinds (``NUMPY_KINDS``) and layers (e.g. GELU) it does not cover; callers then keep the torch path."""

    def __init__(self, model: CTRModel) -> None:
        kind = getattr(getattr(model, "cfg", None), "model", None)
        if kind not in NUMPY_KINDS:
            raise ValueError(f"no numpy forward for model kind {kind!r} (only {', '.join(NUMPY_KINDS)})")
        model = model.eval()
        with torch.no_grad():
            self.bias = np.float32(model.bias.item())
            tables = model.tables()
            table = next(iter(tables.values()))  # every table has the same fields, offsets and slots
            self.offsets = table.slot_offsets.numpy().astype(np.int64)
            slot_field = table.slot_field.numpy()
            self.pooled = table.pooled
            # slots are grouped by field in order, so pooling is a reduceat over group starts
            self.starts = np.flatnonzero(np.r_[True, slot_field[1:] != slot_field[:-1]])
            self.tables = {name: t.weight.numpy().copy() for name, t in tables.items()}
            self.first = model.w is not None and model.FIRST_ORDER_TERM
            self.use_fm = model.use_fm
            self.dnn_input = model.DNN_INPUT
            self.layers = self._fold(model.dnn.net) if model.dnn is not None else None

    @staticmethod
    def _fold(net: nn.Sequential) -> list[tuple[np.ndarray, np.ndarray, object]]:
        """Linear [-> BatchNorm] [-> activation] [-> Dropout] groups as (W^T, b, activation or None)."""
        out: list[tuple[np.ndarray, np.ndarray, object]] = []
        for layer in net:
            if isinstance(layer, nn.Linear):
                out.append((layer.weight.detach().numpy().T.copy(), layer.bias.detach().numpy().copy(), None))
            elif isinstance(layer, nn.BatchNorm1d):
                w_t, b, _ = out[-1]
                scale = (layer.weight / torch.sqrt(layer.running_var + layer.eps)).detach().numpy()
                shift = (layer.bias - layer.running_mean * layer.weight
                         / torch.sqrt(layer.running_var + layer.eps)).detach().numpy()
                out[-1] = ((w_t * scale).astype(np.float32), (b * scale + shift).astype(np.float32), None)
            elif isinstance(layer, (nn.Dropout, FastDropout)):
                continue
            else:
                param = layer.weight.detach().numpy() if isinstance(layer, nn.PReLU) else None
                fn = _act(type(layer).__name__, param)
                if fn is None:
                    raise ValueError(f"no numpy forward for {type(layer).__name__}")
                w_t, b, _ = out[-1]
                out[-1] = (w_t, b, fn)
        return out

    def embed(self, idx: np.ndarray, val: np.ndarray) -> dict[str, np.ndarray]:
        """CTRModel.embed: {table name: [B, F, dim] = x_i * row_i, slots pooled into their field}."""
        rows = idx + self.offsets
        out = {}
        for name, weight in self.tables.items():
            e = weight[rows] * val[:, :, None]  # [B, S, dim]
            out[name] = np.add.reduceat(e, self.starts, axis=1) if self.pooled else e
        return out

    def head(self, e: dict[str, np.ndarray]) -> np.ndarray:
        """CTRModel.head: b + y_first + y_FM + y_DNN (paper eq. 1), the terms the model has."""
        logit = np.full(next(iter(e.values())).shape[0], self.bias, dtype=np.float32)
        if self.first:
            logit += e["w"].sum(axis=(1, 2))
        if self.use_fm:
            v = e["v"]
            s = v.sum(axis=1)
            logit += 0.5 * (s * s - (v * v).sum(axis=1)).sum(axis=1)
        if self.layers is not None:
            parts = [e[name] for name in self.dnn_input]
            h = (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)).reshape(logit.shape[0], -1)
            for w_t, b, act in self.layers:
                h = h @ w_t
                h += b
                if act is not None:
                    h = act(h)
            logit += h[:, 0]
        return logit

    def __call__(self, idx: np.ndarray, val: np.ndarray) -> np.ndarray:
        return self.head(self.embed(idx, val))
