import numpy as np
import pandas as pd
import polars as pl
import pytest

from deepfm import DeepFMClassifier
from deepfm.errors import DeepFMError


def _frame(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 20, n)
    b = rng.integers(0, 15, n)
    x = rng.normal(size=n)
    logit = 0.8 * np.sin(a) + 0.6 * np.cos(b) * np.sign(np.sin(a)) + 0.7 * x - 0.5
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return pd.DataFrame({"a": [f"a{v}" for v in a], "b": b.astype(str), "x": x}), y


def test_fit_predict_proba_pandas_and_polars(tmp_path):
    X, y = _frame()
    clf = DeepFMClassifier(epochs=4, batch_size=256, overrides=("model.hidden=[32]",), seed=1)
    assert clf.fit(X, y) is clf
    p = clf.predict_proba(X)
    assert p.shape == (len(X), 2) and np.allclose(p.sum(1), 1.0)
    from deepfm.train.metrics import auc

    assert auc(y, p[:, 1]) > 0.7
    np.testing.assert_allclose(clf.predict_proba(pl.from_pandas(X))[:, 1], p[:, 1])
    clf.save(tmp_path / "m")
    again = DeepFMClassifier.load(tmp_path / "m")
    np.testing.assert_array_equal(again.predict_proba(X), p)
    assert again.get_params()["epochs"] == 4


def test_get_set_params_and_unfitted_error():
    clf = DeepFMClassifier(model="fm")
    assert clf.get_params()["model"] == "fm"
    clf.set_params(epochs=1)
    assert clf.epochs == 1
    with pytest.raises(ValueError):
        clf.set_params(nope=1)
    with pytest.raises(DeepFMError):
        clf.predict_proba({"a": ["x"]})


def test_unseen_and_missing_values_at_predict_time():
    X, y = _frame(800)
    clf = DeepFMClassifier(epochs=1, batch_size=256, overrides=("model.hidden=[8]",)).fit(X, y)
    Z = pd.DataFrame({"a": ["never-seen", None], "b": ["3", None], "x": [0.1, None], "extra": [1, 2]})
    p = clf.predict_proba(Z)[:, 1]
    assert np.isfinite(p).all()
