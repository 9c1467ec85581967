"""Exact, vectorised CTR metrics. AUC handles ties with average ranks (equals sklearn's roc_auc_score)."""

from __future__ import annotations

import numpy as np

EPS = 1e-7


def auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Exact ROC AUC via the Mann-Whitney U statistic with tie-averaged ranks.

    y_true: [N] in {0, 1}; y_score: [N] any real scores. Returns NaN when only one class is present.
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    n_pos = float(y.sum())
    n_neg = float(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    # average rank (1-based) of each tie group
    boundaries = np.flatnonzero(np.diff(s_sorted)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [s_sorted.size]))
    avg_rank = (starts + ends + 1) / 2.0
    ranks = np.repeat(avg_rank, ends - starts)
    pos_rank_sum = float(ranks[y[order] == 1].sum())
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def logloss(y_true: np.ndarray, y_prob: np.ndarray, eps: float = EPS) -> float:
    """Mean binary cross-entropy with probabilities clipped to [eps, 1 - eps]."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.clip(np.asarray(y_prob, dtype=np.float64).ravel(), eps, 1 - eps)
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def evaluate(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, float]:
    """AUC, logloss, calibration (mean predicted CTR / observed CTR), CTRs and the row count."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    observed = float(y.mean()) if y.size else float("nan")
    predicted = float(p.mean()) if p.size else float("nan")
    return {
        "auc": auc(y, p),
        "logloss": logloss(y, p),
        "calibration": predicted / observed if observed > 0 else float("nan"),
        "observed_ctr": observed,
        "predicted_ctr": predicted,
        "rows": int(y.size),
    }
