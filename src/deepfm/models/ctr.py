"""DeepFM and the baselines that share its blocks (LR, FM, DNN, LR&DNN), as one class with switches.

    y_hat = sigmoid(b + y_first_order + y_FM + y_DNN)                 (Guo et al. 2017, eq. 1)

- first order: a scalar weight per feature value, times the value (``w``, its own table);
- FM:          pairwise <x_i v_i, x_j v_j> over ALL fields, numeric ones as value x vector (eq. 2);
- DNN:         an MLP over the concatenated field embeddings x_i v_i (eq. 3-4);
- the embeddings ``v`` are ONE table shared by the FM and the DNN (the paper's key point).

The other baselines of the paper's Table 2 (FNN, IPNN, OPNN, PNN*, FM&DNN) are subclasses in
models/baselines.py; ``build_model`` builds any of them by name (``MODEL_NAMES``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from deepfm.data.store import FieldSpec
from deepfm.models.layers import MLP, FastDropout, FusedTable, fm_second_order

# name -> (first order, FM second order, DNN) for the kinds CTRModel itself computes; "wdl" is the paper's
# LR&DNN (Wide & Deep with the wide part on the raw features only: b + first order + DNN)
MODELS = {"lr": (True, False, False), "fm": (True, True, False), "deepfm": (True, True, True),
          "dnn": (False, False, True), "wdl": (True, False, True)}
# the kinds built by models/baselines.py (FNN, the three PNNs, FM&DNN)
BASELINES = ("fnn", "ipnn", "opnn", "pnnstar", "fmdnn")
MODEL_NAMES = (*MODELS, *BASELINES)
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
    """forward(idx [B, S] int64, val [B, S] float32) -> logits [B]."""

    def __init__(self, fields: list[FieldSpec], cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.use_first, self.use_fm, self.use_dnn = self.blocks(cfg)
        self.bias = nn.Parameter(torch.zeros(1))
        self.w = FusedTable(fields, 1, std=0.0) if self.use_first else None
        self.v = FusedTable(fields, cfg.embed_dim, std=cfg.init_std) if (self.use_fm or self.use_dnn) else None
        self.dnn = (MLP(self.dnn_width(fields), cfg.hidden, cfg.dropout, cfg.batch_norm, cfg.activation)
                    if self.use_dnn else None)
        # (idx, sum of squares of the rows it used), from the fused forward of that idx (embedding_penalty)
        self._penalty: tuple[torch.Tensor, torch.Tensor] | None = None

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
        registration order: what the sparse update and ``embedding_penalty`` must cover."""
        return {name: m for name, m in self.named_children() if isinstance(m, FusedTable)}

    def forward(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        logit = self.bias.expand(idx.shape[0])
        self._penalty = None
        if self.v is not None and self.v.fusable(idx, val):  # CPU: the same terms, C kernels
            want = self.cfg.embedding_l2 > 0 and self.training and torch.is_grad_enabled()
            e, y_fm, y_first, pen = self.v.fused(idx, val, self.use_fm, self.w, penalty=want)
            if pen is not None and set(self.tables()) == {n for n in ("w", "v") if getattr(self, n) is not None}:
                self._penalty = (idx, pen)  # embedding_penalty(idx) returns it: no second gather
            for y in (y_first, y_fm):
                if y is not None:
                    logit = logit + y
            return logit + self.dnn(e.flatten(1)) if self.dnn is not None else logit
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
        if self._penalty is not None and self._penalty[0] is idx:
            pen, self._penalty = self._penalty[1], None
            return pen / idx.shape[0]
        total = self.bias.new_zeros(())
        for table in self.tables().values():
            total = total + table.rows(idx).pow(2).sum()
        return total / idx.shape[0]


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


def build_model(fields: list[FieldSpec], cfg: ModelConfig, rows: int | None = None) -> CTRModel:
    """Any model of ``MODEL_NAMES`` by ``cfg.model``; ``rows``: the training rows (for the ``auto`` options)."""
    cfg = resolve_config(cfg, rows)
    if cfg.model in MODELS:
        return CTRModel(fields, cfg)
    from deepfm.models.baselines import BASELINE_CLASSES

    if cfg.model not in BASELINE_CLASSES:
        raise ValueError(f"unknown model {cfg.model!r} (expected one of {', '.join(MODEL_NAMES)})")
    return BASELINE_CLASSES[cfg.model](fields, cfg)
