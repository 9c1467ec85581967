"""DeepFM and the baselines that share its blocks (LR, FM, DNN, LR&DNN), as one class with switches.

    y_hat = sigmoid(b + y_first_order + y_FM + y_DNN)                 (Guo et al. 2017, eq. 1)

- first order: a scalar weight per feature value, times the value (``w``, its own table);
- FM:          pairwise <x_i v_i, x_j v_j> over ALL fields, numeric ones as value x vector (eq. 2);
- DNN:         an MLP over the concatenated field embeddings x_i v_i (eq. 3-4);
- the embeddings ``v`` are ONE table shared by the FM and the DNN (the paper's key point).

The other baselines of the paper's Table 2 (FNN, IPNN, OPNN, PNN*, FM&DNN) are subclasses in
models/baselines.py; ``models.build.build_model`` builds any of them by name (``MODEL_NAMES``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from deepfm.config import MODEL_NAMES  # the one list (MODELS + BASELINES), re-exported
from deepfm.layout import FieldSpec
from deepfm.models.layers import MLP, FastDropout, FusedTable, fm_second_order

# name -> (first order, FM second order, DNN) for the kinds CTRModel itself computes; "wdl" is the paper's
# LR&DNN (Wide & Deep with the wide part on the raw features only: b + first order + DNN)
MODELS = {"lr": (True, False, False), "fm": (True, True, False), "deepfm": (True, True, True),
          "dnn": (False, False, True), "wdl": (True, False, True)}
# the kinds built by models/baselines.py (FNN, the three PNNs, FM&DNN)
BASELINES = ("fnn", "ipnn", "opnn", "pnnstar", "fmdnn")
# Per-model defaults for options a config leaves unset (None). The DeepFM paper (Sec. 3.1, "Parameter
# Settings") follows Qu et al. 2016: "tanh for IPNN, relu for other deep models". An explicit value wins.
DEFAULTS: dict[str, Any] = {"activation": "relu"}
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {"ipnn": {"activation": "tanh"}}


@dataclass
class ModelConfig:
    model: str = "deepfm"
    embed_dim: int = 10
    hidden: list[int] = field(default_factory=lambda: [400, 400, 400])
    dropout: float = 0.5
    batch_norm: bool | str = False  # or "auto": on from AUTO_BATCH_NORM_ROWS training rows (build_model)
    activation: str | None = None  # None: the model's default (MODEL_DEFAULTS; relu but for ipnn)
    embedding_l2: float = 0.0  # L2 on the table rows used in each batch (every table: w, v, fmdnn's v_dnn)
    net_l2: float = 0.0  # L2 (Adam weight decay) on the DNN weights
    init_std: float = 1e-4

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise ValueError(f"unknown model option(s) {sorted(bad)}; allowed: {sorted(known)}")
        cfg = cls(**d)
        if cfg.model not in MODEL_NAMES:
            raise ValueError(f"unknown model {cfg.model!r} (expected one of {', '.join(MODEL_NAMES)})")
        return cfg

    def __post_init__(self) -> None:
        for key, value in {**DEFAULTS, **MODEL_DEFAULTS.get(self.model, {})}.items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CTRModel(nn.Module):
    """``forward(idx [B, S] int64, val [B, S] float32) -> logits [B]``, in two steps (the model protocol
    that export, explain and the numpy fast path call too):

    - ``embed(idx, val)`` -> {table name: [B, F, dim]}: e_i = x_i * row_i of each table (``w``: [B, F, 1]
      first-order weights, ``v``: [B, F, K] embeddings), multi-valued slots pooled into their field;
    - ``head(e)`` -> logits [B]: paper eq. 1 from those.

    Plain PyTorch; ``deepfm.accel.accelerate(model)`` swaps in the fused CPU kernels (same parameters,
    same state_dict, same numbers).

    >>> from deepfm.layout import FieldSpec
    >>> fields = [FieldSpec("user", "cat", 100, 1), FieldSpec("age", "num", 2, 1)]
    >>> model = CTRModel(fields, ModelConfig(embed_dim=4, hidden=[8]))
    >>> idx, val = torch.tensor([[7, 1], [9, 1]]), torch.tensor([[1.0, 0.3], [1.0, -1.2]])
    >>> {name: tuple(e.shape) for name, e in model.embed(idx, val).items()}, model(idx, val).shape
    ({'w': (2, 2, 1), 'v': (2, 2, 4)}, torch.Size([2]))
    """

    DNN_INPUT: tuple[str, ...] = ("v",)  # the tables the MLP reads, concatenated per field (see dnn_input)
    FIRST_ORDER_TERM = True  # sum_i w_i x_i is a term of the logit (FNN feeds w to its MLP instead)

    def __init__(self, fields: list[FieldSpec], cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.use_first, self.use_fm, self.use_dnn = self.blocks(cfg)
        self.bias = nn.Parameter(torch.zeros(1))
        self.w = FusedTable(fields, 1, std=0.0) if self.use_first else None
        self.v = FusedTable(fields, cfg.embed_dim, std=cfg.init_std) if (self.use_fm or self.use_dnn) else None
        self.dnn = (MLP(self.dnn_width(fields), cfg.hidden, cfg.dropout, cfg.batch_norm, cfg.activation)
                    if self.use_dnn else None)

    def forward(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(idx, val))

    def embed(self, idx: torch.Tensor, val: torch.Tensor) -> dict[str, torch.Tensor]:
        """{table name: [B, F, dim]} for every table (``tables()``)."""
        return {name: table(idx, val) for name, table in self.tables().items()}

    def head(self, e: dict[str, torch.Tensor]) -> torch.Tensor:
        """Paper eq. 1, y = sigmoid(b + y_first + y_FM + y_DNN), before the sigmoid; the terms this kind has."""
        logit = self.bias  # [1], broadcast over the batch
        if self.w is not None and self.FIRST_ORDER_TERM:
            logit = logit + e["w"].sum(dim=(1, 2))  # y_first = sum_i w_i x_i
        if self.use_fm:
            logit = logit + fm_second_order(e["v"])  # y_FM = sum_{i<j} <v_i, v_j> x_i x_j (eq. 2)
        if self.dnn is not None:
            logit = logit + self.dnn(self.dnn_input(e))  # y_DNN (eq. 3-4)
        return logit

    def dnn_input(self, e: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, dnn_width]: a^(0) = [e_1, ..., e_F] (eq. 3) of the ``DNN_INPUT`` tables, concatenated per field."""
        if len(self.DNN_INPUT) == 1:
            return e[self.DNN_INPUT[0]].flatten(1)
        return torch.cat([e[name] for name in self.DNN_INPUT], dim=2).flatten(1)

    def blocks(self, cfg: ModelConfig) -> tuple[bool, bool, bool]:
        """(first-order table ``w``, FM term, MLP ``dnn``) of this model kind (``v`` exists with FM or DNN)."""
        if cfg.model not in MODELS:
            raise ValueError(f"CTRModel computes {', '.join(MODELS)}; build {cfg.model!r} with build_model")
        return MODELS[cfg.model]

    def dnn_width(self, fields: list[FieldSpec]) -> int:
        """Input width of the MLP: the F field embeddings of size K, concatenated."""
        return len(fields) * self.cfg.embed_dim

    def tables(self) -> dict[str, FusedTable]:
        """Every fused table of the model by attribute name (``w``, ``v``, and any a subclass adds), in
        registration order: what ``embed``, the sparse update and ``embedding_penalty`` cover."""
        return {name: m for name, m in self.named_children() if isinstance(m, FusedTable)}

    def embedding_penalty(self, idx: torch.Tensor) -> torch.Tensor:
        """Sum of squares of the table rows this batch uses (so the cost scales with the batch, not the
        vocabulary), divided by the batch size; multiply by ``embedding_l2``."""
        total = self.bias.new_zeros(())
        for table in self.tables().values():
            total = total + table.rows(idx).pow(2).sum()
        return total / idx.shape[0]

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


# batch_norm "auto": batch norm in the MLP from this many training rows up. Measured (docs/quality.md): on the
# 8-9k-row Criteo/Avazu samples it costs 0.02-0.03 test AUC (the MLP fits the training rows within 2-3
# epochs); on Frappe (46k rows), MovieLens (80k) and the synthetic sets (100k-1M) it is as good or better.
AUTO_BATCH_NORM_ROWS = 20_000


def resolve_config(cfg: ModelConfig, rows: int | None) -> ModelConfig:
    """``cfg`` with the data-size rules applied (``batch_norm: auto``) for ``rows`` training rows."""
    if cfg.batch_norm != "auto":
        return cfg
    if rows is None:
        raise ValueError("batch_norm 'auto' needs the number of training rows")
    return ModelConfig.from_dict({**cfg.to_dict(), "batch_norm": rows >= AUTO_BATCH_NORM_ROWS})
