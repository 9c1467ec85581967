"""Exact, vectorised CTR metrics, all optionally weighted by per-row sample weights.

AUC handles ties with average ranks (equal to scikit-learn's ``roc_auc_score``, with ``sample_weight`` the
weighted Mann-Whitney statistic, again equal to scikit-learn's); logloss is the (weighted) mean binary
cross-entropy; NE (normalized entropy) is logloss over the entropy of the (weighted) base rate; grouped AUC
(GAUC, as in the DIN paper) is the impression-weighted mean of per-group AUCs over the groups that hold both
classes. One pass of sorting serves AUC and GAUC (``_group_auc``): no per-group Python loop."""

from __future__ import annotations

import numpy as np

EPS = 1e-7


def _weights(w: np.ndarray | None, n: int) -> np.ndarray:
    if w is None:
        return np.ones(n, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64).ravel()
    if w.shape[0] != n:
        raise ValueError(f"{w.shape[0]} weights for {n} rows")
    if not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError("sample weights must be finite and >= 0")
    return w


def _group_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray, g: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group (in sorted group order; g None: one group): (AUC, positive weight, negative weight); AUC is
    NaN for a group with one class. Rows sorted by (group, score); a block of equal (group, score) is a tie:
    its positives count half of its negatives."""
    if g is None:
        g = np.zeros(y.size, dtype=np.int64)
        order = np.argsort(s, kind="stable")
    else:
        order = np.lexsort((s, g))
    ys, ss, ws, gs = y[order], s[order], w[order], g[order]
    pos, neg = ws * ys, ws * (1.0 - ys)
    n = ys.size
    # starts of tie blocks (a new group or a new score) and of groups, in row space
    new_group = np.r_[True, gs[1:] != gs[:-1]] if n else np.zeros(0, bool)
    new_block = new_group | np.r_[True, ss[1:] != ss[:-1]] if n else new_group
    b_start = np.flatnonzero(new_block)
    b_pos, b_neg = np.add.reduceat(pos, b_start), np.add.reduceat(neg, b_start)
    b_group = np.cumsum(new_group)[b_start] - 1  # group index of each block
    g_start_block = np.flatnonzero(np.r_[True, b_group[1:] != b_group[:-1]])
    # weighted negatives ranked below each block inside its group (exclusive cumulative sum, per group)
    cum = np.cumsum(b_neg) - b_neg
    below = cum - cum[g_start_block][b_group]
    num = np.add.reduceat(b_pos * (below + 0.5 * b_neg), g_start_block)
    g_pos, g_neg = np.add.reduceat(b_pos, g_start_block), np.add.reduceat(b_neg, g_start_block)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc_g = np.where((g_pos > 0) & (g_neg > 0), num / (g_pos * g_neg), np.nan)
    return auc_g, g_pos, g_neg


def auc(y_true: np.ndarray, y_score: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """Exact ROC AUC (Mann-Whitney U with ties counted half), weighted by ``sample_weight`` if given.

    y_true: [N] in {0, 1}; y_score: [N] any real scores. NaN when only one class (of positive weight) is present.
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.size == 0:
        return float("nan")
    a, _, _ = _group_auc(y, s, _weights(sample_weight, y.size), None)
    return float(a[0])


def group_auc(y_true: np.ndarray, y_score: np.ndarray, groups: np.ndarray,
              sample_weight: np.ndarray | None = None) -> tuple[float, int]:
    """GAUC: sum_g impressions_g * AUC_g / sum_g impressions_g over the groups with both classes (DIN, Zhou
    et al. 2018); impressions_g is the group's row count, or its weight sum when weighted (AUC_g is then
    weighted too). ``groups``: any array of group keys (ids, strings); negative integer keys are rows without
    a group (left out). Returns (GAUC, groups counted); NaN, 0
    when no group has both classes."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    g = np.asarray(groups).ravel()
    if g.shape[0] != y.size:
        raise ValueError(f"{g.shape[0]} group keys for {y.size} rows")
    if y.size == 0:
        return float("nan"), 0
    if g.dtype.kind in "iu" and g.size and g.min() < 0:  # integer codes: < 0 is no group (an empty key)
        keep = g >= 0
        y, s, g = y[keep], s[keep], g[keep]
        sample_weight = None if sample_weight is None else np.asarray(sample_weight).ravel()[keep]
        if y.size == 0:
            return float("nan"), 0
    if g.dtype.kind not in "iub":
        g = np.unique(g, return_inverse=True)[1].ravel()
    a, p, n = _group_auc(y, s, _weights(sample_weight, y.size), g.astype(np.int64, copy=False))
    ok = ~np.isnan(a)
    if not ok.any():
        return float("nan"), 0
    imp = (p + n)[ok]
    return float(np.sum(imp * a[ok]) / np.sum(imp)), int(ok.sum())


def logloss(y_true: np.ndarray, y_prob: np.ndarray, eps: float = EPS,
            sample_weight: np.ndarray | None = None) -> float:
    """(Weighted) mean binary cross-entropy with probabilities clipped to [eps, 1 - eps]."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.clip(np.asarray(y_prob, dtype=np.float64).ravel(), eps, 1 - eps)
    if y.size == 0:
        return float("nan")
    w = _weights(sample_weight, y.size)
    total = w.sum()
    if total <= 0:
        return float("nan")
    return float(-np.sum(w * (y * np.log(p) + (1 - y) * np.log1p(-p))) / total)


def entropy(rate: float) -> float:
    """Binary entropy (nats) of a base rate: the logloss of always predicting it. NaN at 0 or 1."""
    if not 0 < rate < 1:
        return float("nan")
    return float(-(rate * np.log(rate) + (1 - rate) * np.log1p(-rate)))


def normalized_entropy(y_true: np.ndarray, y_prob: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """NE (He et al. 2014, "Practical lessons from predicting clicks on ads at Facebook"): logloss divided by
    the entropy of the observed (weighted) CTR; below 1 means better than predicting the base rate."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    w = _weights(sample_weight, y.size)
    total = w.sum()
    if total <= 0:
        return float("nan")
    return logloss(y, y_prob, sample_weight=w) / entropy(float(np.sum(w * y) / total))


ECE_BINS = 20  # equal-frequency bins of expected_calibration_error (the ``ece`` of evaluate)


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, sample_weight: np.ndarray | None = None,
                               bins: int = ECE_BINS) -> float:
    """ECE over ``bins`` equal-frequency bins: rows sorted by predicted probability and cut into bins of equal
    row counts (``numpy.array_split``: sizes differ by at most one; fewer rows than bins: one row each), then
    sum_b (W_b / W) |mean_b(p) - mean_b(y)| with weighted means (= sum_b |sum_b w (p - y)| / W). NaN for
    no rows or zero total weight."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    w = _weights(sample_weight, y.size)
    total = w.sum()
    if y.size == 0 or total <= 0:
        return float("nan")
    order = np.argsort(p, kind="stable")
    k = min(bins, y.size)  # bins as numpy.array_split(order, k): the first n % k hold one row more
    sizes = np.full(k, y.size // k) + (np.arange(k) < y.size % k)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    gap = np.add.reduceat((w * (p - y))[order], starts)
    return float(np.abs(gap).sum() / total)


def evaluate(y_true: np.ndarray, y_prob: np.ndarray, sample_weight: np.ndarray | None = None,
             groups: np.ndarray | None = None) -> dict[str, float]:
    """AUC, logloss, NE, calibration (mean predicted CTR / observed CTR), ECE (expected calibration error,
    ``ECE_BINS`` equal-frequency bins), CTRs and the row count; with
    ``sample_weight`` every figure but ``rows`` is weighted (and ``weight_sum`` added), with ``groups`` the
    grouped AUC (``gauc``) and the number of groups it averages (``gauc_groups``)."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    w = _weights(sample_weight, y.size)
    total = float(w.sum())
    observed = float(np.sum(w * y) / total) if total > 0 else float("nan")
    predicted = float(np.sum(w * p) / total) if total > 0 else float("nan")
    ll = logloss(y, p, sample_weight=w)
    out: dict[str, float] = {
        "auc": auc(y, p, w),
        "logloss": ll,
        "ne": ll / entropy(observed) if total > 0 else float("nan"),
        "calibration": predicted / observed if observed > 0 else float("nan"),
        "ece": expected_calibration_error(y, p, w),
        "observed_ctr": observed,
        "predicted_ctr": predicted,
        "rows": int(y.size),
    }
    if sample_weight is not None:
        out["weight_sum"] = total
    if groups is not None:
        out["gauc"], out["gauc_groups"] = group_auc(y, p, groups, w)  # type: ignore[assignment]
    return out
