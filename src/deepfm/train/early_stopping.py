"""Early stopping on a monitored validation value, keeping the weights of the best validation.

>>> es = EarlyStopping("auc", patience=2)
>>> [es.update({"auc": a, "logloss": 0.5}).action for a in (0.70, 0.71, 0.71, 0.70)]
['improved', 'improved', 'wait', 'stop']
>>> es.best, es.bad
(0.71, 2)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

MONITORS = ("auc", "auc-logloss")


def monitored(m: dict[str, float], monitor: str) -> tuple[float, str]:
    """The value early stopping maximises and its name. AUC is undefined (NaN) when the validation rows
    have one class: then -logloss, which is defined (and a NaN comparison would never improve)."""
    if math.isnan(m["auc"]):
        return -m["logloss"], "-logloss"
    if monitor == "auc-logloss":
        return m["auc"] - m["logloss"], "auc-logloss"
    return m["auc"], "auc"


@dataclass
class Decision:
    """What one validation decided: ``action`` is "improved" (a new best), "wait" (no gain, patience left),
    "reduce_lr" (no gain for ``patience`` validations the first time, with ``reduce_lr_on_plateau``: go back
    to the best weights and lower the learning rate) or "stop"; ``value``/``name``: the monitored value."""

    action: str
    value: float
    name: str

    @property
    def stop(self) -> bool:
        return self.action == "stop"


class EarlyStopping:
    """Stop once ``monitor`` (see :func:`monitored`) gained no more than ``min_delta`` for ``patience``
    validations in a row; with ``reduce_lr``, the first such plateau asks for a lower learning rate instead
    (and the count starts again). :meth:`update` with a model keeps a copy of its weights at each new best
    (``best_weights``)."""

    def __init__(self, monitor: str = "auc", patience: int = 2, reduce_lr: bool = False,
                 min_delta: float = 1e-6) -> None:
        if monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {MONITORS}, got {monitor!r}")
        self.monitor, self.patience, self.reduce_lr, self.min_delta = monitor, patience, reduce_lr, min_delta
        self.best = float("-inf")
        self.bad = 0  # validations since the last improvement
        self.reduced = False
        self.best_weights: dict[str, torch.Tensor] | None = None

    def update(self, metrics: dict[str, float], model: torch.nn.Module | None = None) -> Decision:
        value, name = monitored(metrics, self.monitor)
        improved = value > self.best + self.min_delta
        if improved:
            self.best, self.bad = value, 0
            if model is not None:
                self.best_weights = copy.deepcopy(model.state_dict())
        else:
            self.bad += 1
        if self.bad >= self.patience:
            if self.reduce_lr and not self.reduced:
                self.reduced, self.bad = True, 0
                return Decision("reduce_lr", value, name)
            return Decision("stop", value, name)
        return Decision("improved" if improved else "wait", value, name)

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "best": self.best, "bad": self.bad, "reduced": self.reduced,
                "best_weights": self.best_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["monitor"] != self.monitor:
            raise ValueError(f"early stopping state monitors {state['monitor']!r}, not {self.monitor!r}")
        self.best, self.bad, self.reduced = float(state["best"]), int(state["bad"]), bool(state["reduced"])
        self.best_weights = state["best_weights"]
