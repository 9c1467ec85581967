import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from deepfm.train.metrics import auc, evaluate, logloss


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 3000)
    s = np.round(rng.random(3000) + 0.3 * y, 1)  # heavy ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_edge_cases():
    assert auc([0, 1], [0.1, 0.9]) == 1.0
    assert auc([0, 1], [0.9, 0.1]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert np.isnan(auc([1, 1], [0.2, 0.3]))


def test_logloss_clipped_and_equal_to_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    p = rng.random(1000)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-9)
    assert np.isfinite(logloss([1, 0], [0.0, 1.0]))  # clipped, not inf


def test_evaluate_reports_calibration_and_rows():
    m = evaluate(np.array([0, 1, 0, 1]), np.array([0.25, 0.75, 0.25, 0.75]))
    assert m["rows"] == 4 and m["calibration"] == pytest.approx(1.0) and m["auc"] == 1.0


# --- weighted metrics, NE and grouped AUC (issue 18 items 3-4) ----------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_weighted_auc_and_logloss_equal_sklearn_with_ties(seed):
    from deepfm.train.metrics import auc as w_auc

    rng = np.random.default_rng(seed)
    n = 4000
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n) + 0.3 * y, 1)  # heavy ties
    w = rng.exponential(size=n) * (rng.random(n) > 0.1)  # some zero weights
    assert w_auc(y, s, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-9)
    p = np.clip(rng.random(n), 1e-3, 1 - 1e-3)
    assert logloss(y, p, sample_weight=w) == pytest.approx(log_loss(y, p, sample_weight=w), abs=1e-9)
    # integer weights = repeated rows
    k = rng.integers(0, 4, n)
    assert w_auc(y, s, k) == pytest.approx(auc(np.repeat(y, k), np.repeat(s, k)), abs=1e-12)


def test_unit_weights_change_nothing_and_bad_weights_are_refused():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 2, 500), rng.random(500)
    a, b = evaluate(y, p), evaluate(y, p, sample_weight=np.ones(500))
    assert all(a[k] == pytest.approx(b[k], abs=1e-12) for k in a)
    with pytest.raises(ValueError, match="finite and >= 0"):
        evaluate(y, p, sample_weight=-np.ones(500))
    with pytest.raises(ValueError, match="finite"):
        auc(y, p, np.full(500, np.nan))


def test_normalized_entropy():
    from deepfm.train.metrics import entropy, normalized_entropy

    rng = np.random.default_rng(2)
    y = (rng.random(2000) < 0.2).astype(int)
    base = np.full(2000, y.mean())
    assert normalized_entropy(y, base) == pytest.approx(1.0, abs=1e-9)  # predicting the base rate: NE 1
    p = rng.random(2000)
    w = rng.random(2000)
    ctr = np.sum(w * y) / w.sum()
    want = log_loss(y, p, sample_weight=w) / -(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr))
    assert normalized_entropy(y, p, w) == pytest.approx(want, rel=1e-9)
    assert evaluate(y, p, sample_weight=w)["ne"] == pytest.approx(want, rel=1e-9)
    assert np.isnan(entropy(0.0))


@pytest.mark.parametrize("weighted", [False, True])
def test_group_auc_equals_per_group_sklearn(weighted):
    from deepfm.train.metrics import group_auc

    rng = np.random.default_rng(3)
    n = 3000
    g = rng.choice(np.array([f"u{i}" for i in range(60)]), n)
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n) + 0.2 * y, 1)
    y[g == "u0"] = 1  # one-class groups are left out
    y[g == "u1"] = 0
    w = rng.exponential(size=n) if weighted else None
    num = den = 0.0
    used = 0
    for key in np.unique(g):
        m = g == key
        if y[m].min() == y[m].max():
            continue
        imp = w[m].sum() if weighted else m.sum()
        num += imp * roc_auc_score(y[m], s[m], sample_weight=None if w is None else w[m])
        den += imp
        used += 1
    got, groups = group_auc(y, s, g, w)
    assert groups == used == 58 and got == pytest.approx(num / den, abs=1e-9)
    m = evaluate(y, s, sample_weight=w, groups=g)
    assert m["gauc"] == pytest.approx(num / den, abs=1e-9) and m["gauc_groups"] == 58
    assert np.isnan(group_auc([1, 1, 0], [0.1, 0.2, 0.3], [0, 0, 1])[0])
