"""Calibration (issue 18 item 1): Platt scaling and isotonic regression against brute force, ECE, the
bundle's calibration.json round trip (CLI predict, the Python API, the server's predictor and the HTTP app,
the ONNX export's post-processing file give the same numbers), and the refusals."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from deepfm import calibration
from deepfm.calibration import PostProcess, fit_isotonic, fit_platt, pav, platt_loss
from deepfm.cli import main
from deepfm.data import readers
from deepfm.errors import BundleError, DeepFMError
from deepfm.serve.bundle import load
from deepfm.serve.predictor import Predictor
from deepfm.train.metrics import auc, expected_calibration_error
from deepfm.utils import sigmoid

FAST = ["--epochs", "1", "--batch-size", "256", "--quiet", "--set", "model.hidden=[16,16]", "--seed", "3"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _miscalibrated(n: int, seed: int):
    """True logits t, labels ~ Bernoulli(sigmoid(t)), and a deliberately miscalibrated model's logits
    z = 2.5 t + 1.5 (overconfident and biased up): same ranking, wrong probabilities."""
    rng = np.random.default_rng(seed)
    t = rng.normal(-1.2, 1.0, n)
    y = (rng.random(n) < sigmoid(t)).astype(np.float64)
    return 2.5 * t + 1.5, y


# ------------------------------------------------------------------ Platt
def test_platt_matches_brute_force_and_recovers_the_map():
    z, y = _miscalibrated(20000, 0)
    w = np.random.default_rng(1).exponential(size=z.size)
    for weights in (None, w):
        a, b = fit_platt(z, y, weights)
        best = platt_loss(z, y, a, b, weights)
        # brute force: a fine grid around the solution never beats Newton's optimum
        grid = [(aa, bb) for aa in np.linspace(a - 0.05, a + 0.05, 21) for bb in np.linspace(b - 0.1, b + 0.1, 21)]
        assert best <= min(platt_loss(z, y, aa, bb, weights) for aa, bb in grid) + 1e-12
        # and the gradient is zero there
        p = sigmoid(a * z + b)
        ww = np.ones_like(z) if weights is None else weights
        assert abs(np.sum(ww * (p - y) * z)) / ww.sum() < 1e-8 and abs(np.sum(ww * (p - y))) / ww.sum() < 1e-8
    a, b = fit_platt(z, y)  # z = 2.5 t + 1.5, so the true map is t = 0.4 z - 0.6
    assert abs(a - 0.4) < 0.03 and abs(b + 0.6) < 0.06


def test_platt_equals_scikit_learn_unpenalised_logistic_regression():
    lr = pytest.importorskip("sklearn.linear_model")
    z, y = _miscalibrated(5000, 2)
    ref = lr.LogisticRegression(C=np.inf, tol=1e-12, max_iter=1000).fit(z[:, None], y)
    a, b = fit_platt(z, y)
    assert a == pytest.approx(ref.coef_[0, 0], abs=1e-5) and b == pytest.approx(ref.intercept_[0], abs=1e-5)


# ------------------------------------------------------------------ isotonic
def _pav_reference(y, w):
    """The textbook sequential PAV (a stack of blocks) -> fitted value per point."""
    blocks: list[list[float]] = []  # [sum w*y, sum w, count]
    for yi, wi in zip(y, w, strict=True):
        blocks.append([yi * wi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, ww, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += ww
            blocks[-1][2] += c
    return np.concatenate([np.full(c, s / ww) for s, ww, c in blocks])


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_pav_equals_the_sequential_algorithm(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    y = rng.random(n) if seed % 2 else (rng.random(n) < 0.3).astype(float)
    if seed == 4:  # a cascade: every merge makes a new violator with the block before
        y = np.r_[np.arange(n - 1) / n, -5.0]
    w = rng.exponential(size=n) + 0.01
    starts, means, _ = pav(y, w)
    got = np.repeat(means, np.diff(np.r_[starts, n]))
    np.testing.assert_allclose(got, _pav_reference(y, w), rtol=1e-12, atol=1e-12)


def test_isotonic_breakpoints_equal_scikit_learn_and_brute_force():
    iso = pytest.importorskip("sklearn.isotonic")
    rng = np.random.default_rng(7)
    p = np.round(rng.random(3000), 3)  # many ties
    y = (rng.random(p.size) < p ** 2).astype(np.float64)
    w = rng.exponential(size=p.size)
    for weights in (None, w):
        x, v = fit_isotonic(p, y, weights)
        assert (np.diff(x) > 0).all() and (np.diff(v) >= 0).all()
        ref = iso.IsotonicRegression(out_of_bounds="clip").fit(p, y, sample_weight=weights)
        probe = np.r_[p, rng.random(500), -1.0, 2.0]
        np.testing.assert_allclose(np.interp(probe, x, v), ref.predict(probe), atol=1e-10)
        # brute force on the data: fitted values equal the per-tie-group sequential PAV
        order = np.argsort(p, kind="stable")
        ux, inv = np.unique(p[order], return_inverse=True)
        ww = np.ones_like(p) if weights is None else weights
        sw = np.bincount(inv, ww[order])
        sy = np.bincount(inv, ww[order] * y[order])
        np.testing.assert_allclose(np.interp(ux, x, v), _pav_reference(sy / sw, sw), atol=1e-12)


# ------------------------------------------------------------------ ECE, and a miscalibrated model fixed
def test_ece_equal_frequency_bins_brute_force():
    rng = np.random.default_rng(3)
    p, y, w = rng.random(1003), (rng.random(1003) < 0.4).astype(float), rng.exponential(size=1003)
    for bins in (1, 10, 20):
        for weights in (None, w):
            ww = np.ones_like(p) if weights is None else weights
            order = np.argsort(p, kind="stable")
            total = 0.0
            for part in np.array_split(order, bins):  # equal row counts
                wb = ww[part].sum()
                total += wb / ww.sum() * abs(np.average(p[part], weights=ww[part])
                                             - np.average(y[part], weights=ww[part]))
            assert expected_calibration_error(y, p, weights, bins) == pytest.approx(total, abs=1e-12)
    assert expected_calibration_error(y[:5], p[:5], bins=20) >= 0  # fewer rows than bins: one row per bin


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_fixes_a_miscalibrated_model_and_keeps_its_auc(method):
    z_valid, y_valid = _miscalibrated(20000, 10)
    z_test, y_test = _miscalibrated(20000, 11)
    post = calibration.fit(method, z_valid, y_valid)
    raw, cal = sigmoid(z_test), post.from_logits(z_test)
    before, after = expected_calibration_error(y_test, raw), expected_calibration_error(y_test, cal)
    oracle = expected_calibration_error(y_test, sigmoid((z_test - 1.5) / 2.5))  # the true probabilities': noise
    # measured (20k test rows, 20 bins): 0.126 -> 0.013 (platt), 0.017 (isotonic); the true probabilities 0.011
    assert before > 0.1 and after < oracle + 0.01, (before, after, oracle)
    if method == "platt":  # a monotone map: the same ranking exactly
        assert auc(y_test, cal) == pytest.approx(auc(y_test, raw), abs=1e-12)
    else:  # piecewise constant: ties inside a block move the AUC a little
        assert abs(auc(y_test, cal) - auc(y_test, raw)) < 0.005
    truth = sigmoid((z_test - 1.5) / 2.5).mean()  # the true mean click probability
    assert abs(raw.mean() / truth - 1) > 0.1 and abs(cal.mean() / truth - 1) < 0.03  # measured: 1.16x -> 1.00x
    assert post.info["valid_ece_after"] < post.info["valid_ece_before"]


def test_postprocess_json_round_trip_and_refusals():
    z, y = _miscalibrated(2000, 4)
    for method in ("none", "platt", "isotonic"):
        post = calibration.fit(method, z, y, negative_rate=0.25)
        back = PostProcess.from_dict(json.loads(json.dumps(post.to_dict())))
        np.testing.assert_array_equal(back.from_logits(z), post.from_logits(z))
    good = calibration.fit("isotonic", z, y).to_dict()
    for bad, msg in (({**good, "method": "spline"}, "method"), ({**good, "negative_rate": 0}, "negative_rate"),
                     ({**good, "negative_rate": 1.5}, "negative_rate"), ({**good, "x": good["x"][::-1]}, "increase"),
                     ({**good, "y": good["y"][:-1]}, "same"), ({**good, "format": "x"}, "format"),
                     ({"format": "deepfm-calibration", "version": 1, "negative_rate": 1, "method": "platt",
                       "a": float("nan"), "b": 0}, "finite")):
        with pytest.raises(ValueError, match=msg):
            PostProcess.from_dict(bad)
    with pytest.raises(ValueError, match="both classes"):
        calibration.fit("platt", z, np.zeros_like(y))


# ------------------------------------------------------------------ through a real bundle
@pytest.fixture(scope="module")
def bundles(synth_small, tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated")
    out = {}
    for method in ("platt", "isotonic"):
        b = root / method
        r = run("train", "--format", "criteo", "--train", synth_small / "train.tsv", "--valid",
                synth_small / "valid.tsv", "--test", synth_small / "test.tsv", "--out", b, "--calibrate", method,
                *FAST)
        assert r.exit_code == 0, r.output
        out[method] = b
    return out


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_bundle_round_trip_cli_api_predictor_and_server_agree(bundles, synth_small, tmp_path, method):
    bundle = bundles[method]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "calibration.json" in manifest["files"]  # checksummed like the other files
    cal = json.loads((bundle / "calibration.json").read_text())
    assert cal["method"] == method and cal["negative_rate"] == 1.0
    assert json.loads((bundle / "training.json").read_text())["train"]["calibrate"] == method
    b = load(bundle)
    assert b.postprocess.method == method

    pred = Predictor(bundle)
    table = readers.read(synth_small / "test.tsv", "criteo").table
    rows = table.slice(0, 300).to_pylist()
    want = pred.predict_file(synth_small / "test.tsv").probabilities
    # the model's raw probabilities differ: the calibration is applied (300 rows: the torch path, as the file)
    idx, val = pred.records.encode(rows)
    raw = sigmoid(pred.logits(idx, val))
    assert not np.allclose(raw, want[:300], atol=1e-4)
    np.testing.assert_allclose(pred.postprocess.from_logits(pred.logits(idx, val)), want[:300], atol=1e-12)

    # CLI predict
    r = run("predict", bundle, synth_small / "test.tsv", "--out", tmp_path / "p.parquet")
    assert r.exit_code == 0, r.output
    got = pq.read_table(tmp_path / "p.parquet").column("probability").to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-7)  # the file holds float32
    # the server's predictor (records; small batches take the numpy path) and the HTTP app's micro-batcher
    np.testing.assert_allclose(pred.predict_records(rows), want[:300], atol=1e-9)
    testclient = pytest.importorskip("fastapi.testclient")
    from deepfm.serve.server import ServeConfig, create_app

    with testclient.TestClient(create_app(ServeConfig(bundle=str(bundle)), predictor=pred)) as client:
        resp = client.post("/v1/predict", json={"rows": rows[:40]})
    assert resp.status_code == 200, resp.text
    # the same path as the predictor's records (<= 256 rows: the numpy forward, float32 logits within ~1e-7)
    np.testing.assert_allclose(resp.json()["probabilities"], pred.predict_records(rows[:40]), atol=1e-12)
    # against the torch batch path: its logits differ by ~1e-7, which a steep isotonic segment magnifies
    np.testing.assert_allclose(resp.json()["probabilities"], want[:40], atol=1e-4)
    # the Python API on the loaded bundle
    from deepfm.estimator import DeepFMClassifier

    clf = DeepFMClassifier.load(bundle)
    np.testing.assert_allclose(clf.predict_proba(table)[:, 1], want, atol=1e-9)
    # evaluate reports the calibrated probabilities' metrics, as training recorded them on the test file
    r = run("evaluate", bundle, synth_small / "test.tsv", "--json")
    m = json.loads(r.output)
    rec = json.loads((bundle / "metrics.json").read_text())["test"]
    assert m["logloss"] == pytest.approx(rec["logloss"], abs=1e-9) and m["ece"] == pytest.approx(rec["ece"])
    assert 0 <= m["ece"] < 1 and "calibration" in m


def test_onnx_export_writes_the_post_processing_beside_the_graph(bundles, synth_small, tmp_path):
    pytest.importorskip("onnxruntime")
    from deepfm.serve.export import OnnxForward

    bundle = bundles["isotonic"]
    out = tmp_path / "m.onnx"
    r = run("export", bundle, "--out", out, "--check-rows", 200)
    assert r.exit_code == 0, r.output
    side = tmp_path / "m.onnx.calibration.json"
    assert side.exists() and "apply its isotonic calibration" in r.output
    pred = Predictor(bundle)
    idx, val = pred.records.encode(readers.read(synth_small / "test.tsv", "criteo").table.slice(0, 100).to_pylist())
    logit = OnnxForward(out)(idx, val)
    got = PostProcess.from_dict(json.loads(side.read_text())).from_logits(logit)
    # deepfm's own onnxruntime engine applies the bundle's post-processing to the same graph's logit
    onnx_pred = Predictor(bundle, engine="onnxruntime")
    np.testing.assert_allclose(got, onnx_pred.probabilities(onnx_pred.logits(idx, val)), atol=1e-9)
    np.testing.assert_allclose(got, pred.probabilities(pred.logits(idx, val)), atol=1e-4)  # torch: logits ~1e-7
    # a bundle without calibration: the stale side file of an earlier export is removed
    plain = tmp_path / "plain"
    shutil.copytree(bundle, plain)
    (plain / "calibration.json").unlink()
    man = json.loads((plain / "manifest.json").read_text())
    del man["files"]["calibration.json"]
    (plain / "manifest.json").write_text(json.dumps(man))
    r = run("export", plain, "--out", out, "--check-rows", 0)
    assert r.exit_code == 0 and not side.exists() and "removed" in r.output


def test_damaged_calibration_json_is_a_clear_bundle_error(bundles, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bundles["platt"], bad)
    doc = json.loads((bad / "calibration.json").read_text())
    doc["negative_rate"] = 0
    data = json.dumps(doc).encode()
    (bad / "calibration.json").write_bytes(data)
    with pytest.raises(BundleError, match="checksum mismatch for calibration.json"):
        load(bad)
    man = json.loads((bad / "manifest.json").read_text())
    man["files"]["calibration.json"] = hashlib.sha256(data).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match=r"calibration.json: negative_rate must be a number in \(0, 1\]"):
        load(bad)


def test_bad_calibrate_values_are_refused(synth_small, tmp_path):
    r = run("train", "--format", "criteo", "--train", synth_small / "train.tsv", "--out", tmp_path / "x",
            "--calibrate", "spline", *FAST)
    assert r.exit_code == 2 and "'spline' is not one of 'none', 'platt', 'isotonic'" in r.output
    r = run("train", "--format", "criteo", "--train", synth_small / "train.tsv", "--out", tmp_path / "x",
            "--set", "train.calibrate=beta", *FAST)
    assert r.exit_code == 2 and "train.calibrate must be one of" in r.output
    from deepfm import pipeline

    prep = pipeline.prepare(synth_small / "train.tsv", "criteo", valid_path=synth_small / "valid.tsv",
                            use_cache=False)
    prep = pipeline.Prepared(prep.pre, prep.train, None, None, None, prep.info)  # no validation split
    model_cfg, train_cfg = pipeline.resolve_config("default", ["model.hidden=[8]"], epochs=1, calibrate="platt")
    with pytest.raises(DeepFMError, match="--calibrate platt is fitted on the validation split"):
        pipeline.train(prep, model_cfg, train_cfg, progress=False)


def test_estimator_calibrates_like_the_bundle(synth_small, tmp_path):
    from deepfm.estimator import DeepFMClassifier

    res = readers.read(synth_small / "train.tsv", "criteo")
    X, y = res.table, res.label
    clf = DeepFMClassifier(epochs=1, batch_size=256, overrides=("model.hidden=[16]",), calibrate="platt").fit(X, y)
    assert clf.postprocess_.method == "platt"
    p = clf.predict_proba(X.slice(0, 200))[:, 1]
    clf.save(tmp_path / "m")
    again = DeepFMClassifier.load(tmp_path / "m")
    assert again.postprocess_.method == "platt"
    np.testing.assert_allclose(again.predict_proba(X.slice(0, 200))[:, 1], p, atol=1e-9)
    np.testing.assert_allclose(Predictor(tmp_path / "m").predict_table(X.slice(0, 200)), p, atol=1e-9)
