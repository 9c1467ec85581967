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
