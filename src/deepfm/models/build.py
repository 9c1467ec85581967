"""Any model of ``MODEL_NAMES`` by name: CTRModel's own kinds (models/ctr.py) and the baselines
(models/baselines.py). Here, not in ctr.py, so that the two model modules import one way (baselines -> ctr)."""

from __future__ import annotations

from deepfm.layout import FieldSpec
from deepfm.models.baselines import BASELINE_CLASSES
from deepfm.models.ctr import MODEL_NAMES, MODELS, CTRModel, ModelConfig, resolve_config


def model_class(name: str) -> type[CTRModel]:
    """The class that computes model kind ``name`` (ValueError for an unknown one)."""
    if name in MODELS:
        return CTRModel
    if name not in BASELINE_CLASSES:
        raise ValueError(f"unknown model {name!r} (expected one of {', '.join(MODEL_NAMES)})")
    return BASELINE_CLASSES[name]


def build_model(fields: list[FieldSpec], cfg: ModelConfig, rows: int | None = None) -> CTRModel:
    """Any model of ``MODEL_NAMES`` by ``cfg.model``; ``rows``: the training rows (for the ``auto`` options).

    >>> from deepfm.layout import FieldSpec
    >>> build_model([FieldSpec("a", "cat", 10, 1)], ModelConfig(model="ipnn", hidden=[4])).cfg.activation
    'tanh'
    """
    cfg = resolve_config(cfg, rows)
    return model_class(cfg.model)(fields, cfg)
