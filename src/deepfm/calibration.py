"""What turns a model's logit into the probability a bundle serves: the negative-downsampling correction and
a calibration map fitted on the validation split's predictions (``deepfm train --negative-rate q
--calibrate {none,platt,isotonic}``), stored in the bundle as ``calibration.json`` (docs/bundle-format.md).

For a logit ``z`` (the model's output):

1. negative-rate correction (training kept every positive and a fraction ``q`` of the negatives):
   ``p' = p / (p + (1 - p) / q)`` with ``p = sigmoid(z)``, which is ``sigmoid(z + ln q)``: computed as the
   latter (no cancellation when p is near 0 or 1);
2. calibration of ``z' = z + ln q``: ``platt``: ``sigmoid(a * z' + b)`` (logistic regression on the logit,
   fitted by Newton's method); ``isotonic``: ``interp(sigmoid(z'), x, y)``, the pool-adjacent-violators fit
   stored as breakpoints ``x`` (increasing probabilities) and ``y`` (non-decreasing), linear between them and
   constant outside (numpy's ``interp``); ``none``: ``sigmoid(z')``.

:class:`PostProcess` is applied in one place for a loaded bundle (``serve.predictor.Predictor``, which
``deepfm predict``/``evaluate``, the server and the Python estimator use) and by ``pipeline.score`` for the
metrics a training run records. Everything here is numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepfm.utils import sigmoid

METHODS = ("none", "platt", "isotonic")
FORMAT = "deepfm-calibration"
VERSION = 1
FILE = "calibration.json"


@dataclass(frozen=True)
class PostProcess:
    """Logits -> served probabilities (see the module docstring). The identity (q = 1, method none) is
    exactly ``sigmoid``."""

    negative_rate: float = 1.0
    method: str = "none"
    a: float = 1.0  # platt
    b: float = 0.0
    x: np.ndarray | None = None  # isotonic breakpoints (probabilities, increasing)
    y: np.ndarray | None = None  # isotonic values (non-decreasing, in [0, 1])
    info: dict[str, Any] = field(default_factory=dict)  # how it was fitted (rows, ECE before/after)

    @property
    def identity(self) -> bool:
        return self.negative_rate == 1.0 and self.method == "none"

    def corrected_logits(self, logits: np.ndarray) -> np.ndarray:
        """float64 ``z + ln q`` (step 1 in logit space)."""
        z = np.asarray(logits, dtype=np.float64)
        return z + math.log(self.negative_rate) if self.negative_rate != 1.0 else z

    def from_logits(self, logits: np.ndarray) -> np.ndarray:
        """float64 [N] served probabilities for the model's logits [N]."""
        if self.identity:
            return sigmoid(np.asarray(logits))
        z = self.corrected_logits(logits)
        if self.method == "platt":
            return sigmoid(self.a * z + self.b)
        p = sigmoid(z)
        if self.method == "isotonic":
            assert self.x is not None and self.y is not None
            return np.interp(p, self.x, self.y)
        return p

    def from_probabilities(self, p: np.ndarray) -> np.ndarray:
        """The same map on uncorrected probabilities ``sigmoid(z)`` (e.g. an ONNX export's ``probability``);
        prefer :meth:`from_logits` (the ``logit`` output), which loses nothing near 0 and 1."""
        p = np.asarray(p, dtype=np.float64)
        with np.errstate(divide="ignore"):
            return self.from_logits(np.log(p) - np.log1p(-p))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "version": VERSION, "negative_rate": float(self.negative_rate),
                             "method": self.method}
        if self.method == "platt":
            d.update(a=float(self.a), b=float(self.b))
        if self.method == "isotonic":
            assert self.x is not None and self.y is not None
            d.update(x=[float(v) for v in self.x], y=[float(v) for v in self.y])
        if self.info:
            d["fit"] = self.info
        return d

    @classmethod
    def from_dict(cls, d: Any) -> PostProcess:
        """Parse ``calibration.json``; ValueError saying what is wrong (the bundle loader names the file)."""
        if not isinstance(d, dict):
            raise ValueError(f"must hold a JSON object, not {type(d).__name__}")
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError(f"format/version must be {FORMAT!r}/{VERSION}, got {d.get('format')!r}/"
                             f"{d.get('version')!r}")
        q, method = d.get("negative_rate"), d.get("method")
        if not _number(q) or not 0 < q <= 1:
            raise ValueError(f"negative_rate must be a number in (0, 1], got {q!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        info = d.get("fit") if isinstance(d.get("fit"), dict) else {}
        if method == "platt":
            a, b = d.get("a"), d.get("b")
            if not (_number(a) and _number(b)):
                raise ValueError(f"platt needs finite numbers a and b, got {a!r}, {b!r}")
            return cls(float(q), method, float(a), float(b), info=info)
        if method == "isotonic":
            x, y = d.get("x"), d.get("y")
            if not (isinstance(x, list) and isinstance(y, list) and 0 < len(x) == len(y)
                    and all(_number(v) for v in x + y)):
                raise ValueError("isotonic needs lists x and y of finite numbers, of the same non-zero length")
            xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
            if (np.diff(xa) <= 0).any() or (np.diff(ya) < 0).any() or ya.min() < 0 or ya.max() > 1:
                raise ValueError("isotonic x must increase strictly and y be non-decreasing within [0, 1]")
            return cls(float(q), method, x=xa, y=ya, info=info)
        return cls(float(q), method, info=info)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _weights(w: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n, dtype=np.float64) if w is None else np.asarray(w, dtype=np.float64).ravel()


def _check_fit_data(y: np.ndarray, w: np.ndarray) -> None:
    pos, neg = float(np.sum(w * y)), float(np.sum(w * (1 - y)))
    if not (pos > 0 and neg > 0):
        raise ValueError(f"calibration needs validation rows of both classes (positive weight {pos:g}, negative "
                         f"{neg:g})")


# ------------------------------------------------------------------------------------------------ Platt
def platt_loss(z: np.ndarray, y: np.ndarray, a: float, b: float, w: np.ndarray | None = None) -> float:
    """(Weighted) mean logloss of sigmoid(a * z + b): what ``fit_platt`` minimises."""
    t = a * np.asarray(z, dtype=np.float64) + b
    ww = _weights(w, t.size)
    # -[y log s(t) + (1 - y) log(1 - s(t))] = log(1 + e^t) - y t, computed stably
    return float(np.sum(ww * (np.logaddexp(0.0, t) - y * t)) / np.sum(ww))


def fit_platt(z: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, steps: int = 50,
              tol: float = 1e-12) -> tuple[float, float]:
    """(a, b) minimising the (weighted) logloss of sigmoid(a * z + b) on logits ``z`` and labels ``y``:
    Newton's method on the two parameters from (1, 0), with step halving when a step does not lower the loss
    (a handful of steps: the loss is convex and smooth)."""
    z = np.asarray(z, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    ww = _weights(w, z.size)
    _check_fit_data(y, ww)
    ww = ww / ww.sum()
    theta = np.array([1.0, 0.0])
    loss = platt_loss(z, y, *theta, ww)
    for _ in range(steps):
        p = sigmoid(theta[0] * z + theta[1])
        r = ww * (p - y)
        g = np.array([np.dot(r, z), r.sum()])
        h = ww * p * (1 - p)
        hess = np.array([[np.dot(h, z * z), np.dot(h, z)], [np.dot(h, z), h.sum()]]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, g)
        t = 1.0
        while True:
            cand = theta - t * step
            new = platt_loss(z, y, *cand, ww)
            if new <= loss or t < 1e-6:
                break
            t /= 2
        done = abs(loss - new) <= tol * max(1.0, abs(loss)) and float(np.abs(t * step).max()) < 1e-9
        if new <= loss:
            theta, loss = cand, new
        if done or t < 1e-6:
            break
    return float(theta[0]), float(theta[1])


# ------------------------------------------------------------------------------------------------ isotonic
def pav(y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool adjacent violators on values ``y`` with weights ``w`` > 0 in the order given -> (block starts,
    block means, block weights): the weighted least-squares non-decreasing fit is constant on each block.

    Vectorised: every pass merges each maximal run of blocks whose means decrease into one block (a sequence
    of adjacent-violator poolings, so the result is PAV's, which does not depend on the pooling order), until
    no block's mean exceeds the next one's; each pass is a few numpy calls over the blocks."""
    sw = np.asarray(w, dtype=np.float64)
    swy = sw * np.asarray(y, dtype=np.float64)
    starts = np.arange(sw.size)
    while sw.size > 1:
        m = swy / sw
        viol = m[:-1] > m[1:]
        if not viol.any():
            break
        keep = np.flatnonzero(np.r_[True, ~viol])  # a block starts a group unless it violates the previous
        sw, swy, starts = np.add.reduceat(sw, keep), np.add.reduceat(swy, keep), starts[keep]
    return starts, swy / sw, sw


def fit_isotonic(p: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Isotonic regression of labels ``y`` on probabilities ``p`` -> breakpoints (x, y) for ``np.interp``:
    rows sorted by p, equal p pooled first (a tie is one point), PAV, then each block's lowest and highest p
    with the block's (weighted) click rate. Rows of weight 0 are left out."""
    p = np.asarray(p, dtype=np.float64).ravel()
    yy = np.asarray(y, dtype=np.float64).ravel()
    ww = _weights(w, p.size)
    _check_fit_data(yy, ww)
    keep = ww > 0
    p, yy, ww = p[keep], yy[keep], ww[keep]
    order = np.argsort(p, kind="stable")
    ps, ys, ws = p[order], yy[order], ww[order]
    ux, first = np.unique(ps, return_index=True)
    tw = np.add.reduceat(ws, first)
    ty = np.add.reduceat(ws * ys, first) / tw
    starts, means, _ = pav(ty, tw)
    ends = np.r_[starts[1:], ux.size] - 1
    lo, hi = ux[starts], ux[ends]
    x = np.stack([lo, hi], axis=1).ravel()
    v = np.repeat(means, 2)
    single = np.repeat(lo == hi, 2) & np.tile([False, True], lo.size)  # a one-point block: one breakpoint
    return x[~single], np.clip(v[~single], 0.0, 1.0)


# ------------------------------------------------------------------------------------------------ fitting
def fit(method: str, logits: np.ndarray, y: np.ndarray, w: np.ndarray | None = None,
        negative_rate: float = 1.0) -> PostProcess:
    """The post-processing for ``method`` fitted on validation logits (the model's) and labels, after the
    negative-rate correction; ``info`` records the rows and the ECE before and after on these rows."""
    from deepfm.train.metrics import ECE_BINS, expected_calibration_error

    if method not in METHODS:
        raise ValueError(f"calibrate must be one of {', '.join(METHODS)}, got {method!r}")
    base = PostProcess(negative_rate=negative_rate)
    if method == "none":
        return base
    y = np.asarray(y, dtype=np.float64).ravel()
    z = base.corrected_logits(logits)
    if method == "platt":
        a, b = fit_platt(z, y, w)
        post = PostProcess(negative_rate, method, a, b)
    else:
        x, v = fit_isotonic(sigmoid(z), y, w)
        post = PostProcess(negative_rate, method, x=x, y=v)
    info = {"fitted_on": "validation", "rows": int(y.size), "ece_bins": ECE_BINS,
            "valid_ece_before": expected_calibration_error(y, sigmoid(z), w),
            "valid_ece_after": expected_calibration_error(y, post.from_logits(logits), w)}
    return PostProcess(post.negative_rate, post.method, post.a, post.b, post.x, post.y, info)


def downsample_negatives(rows: np.ndarray, labels: np.ndarray, rate: float, seed: int
                         ) -> tuple[np.ndarray, dict[str, Any]]:
    """Every positive of ``rows`` and a seeded random ``round(rate * negatives)`` of its negatives (without
    replacement), in row order -> (kept rows, counts). ``labels``: the label of every row of the store."""
    if not (_number(rate) and 0 < rate <= 1):
        raise ValueError(f"negative_rate must be in (0, 1], got {rate!r}")
    rows = np.asarray(rows)
    y = np.asarray(labels)[rows]
    pos, neg = rows[y > 0.5], rows[y <= 0.5]
    k = int(round(rate * neg.size))
    rng = np.random.default_rng([int(seed), 18])  # its own stream: not the split's nor the shuffle's
    chosen = neg[np.sort(rng.choice(neg.size, size=k, replace=False))] if k < neg.size else neg
    kept = np.sort(np.concatenate([pos, chosen]))
    return kept, {"rate": float(rate), "rows_before": int(rows.size), "rows_kept": int(kept.size),
                  "positives": int(pos.size), "negatives_before": int(neg.size), "negatives_kept": int(k)}
