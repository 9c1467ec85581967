"""Sample weights, grouped AUC and time-ordered splits through the pipeline, the CLI and the Python API
(issue 18 items 3-5). The metric functions themselves are checked against scikit-learn in test_metrics.py."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import log_loss, roc_auc_score

from deepfm import pipeline
from deepfm.cli import main
from deepfm.data.preprocess import Preprocessor
from deepfm.data.side import SideColumns
from deepfm.errors import DataError, DeepFMError
from deepfm.schema import Field, Schema
from deepfm.train.metrics import group_auc
from deepfm.train.trainer import TrainConfig, fit

SCHEMA = "label: label\nfields:\n  - {name: user}\n  - {name: site}\n  - {name: price, kind: numeric, transform: log}\n"
FAST = ["--epochs", "1", "--batch-size", "256", "--quiet", "--model", "lr"]


def _logs(tmp_path, n: int = 3000, seed: int = 0):
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 80, n)
    site = rng.choice(list("abcdefgh"), n)
    day = rng.integers(1, 8, n)  # not sorted: the split must order by the column, not by the file
    logit = np.where(np.isin(site, ["a", "b"]), 1.0, -1.5) + (user % 3 == 0)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    df = pd.DataFrame({"label": y, "user": [f"u{u}" for u in user], "site": site, "price": rng.lognormal(size=n),
                       "w": np.round(rng.exponential(size=n), 3), "day": [f"2024-05-0{d}" for d in day],
                       "ts": 1_700_000_000 + day * 86400 + rng.integers(0, 86400, n)})
    path = tmp_path / "logs.csv"
    df.to_csv(path, index=False)
    (tmp_path / "schema.yaml").write_text(SCHEMA)
    return path, df


def _schema(tmp_path):
    from deepfm.schema import load

    return load(tmp_path / "schema.yaml")


# ------------------------------------------------------------------ time splits

def test_time_split_cut_values_counts_and_order(tmp_path):
    path, df = _logs(tmp_path)
    prep = pipeline.prepare(path, "csv", _schema(tmp_path), split="time:day", valid_from="2024-05-06",
                            test_from="2024-05-07", use_cache=False)
    day = df["day"].to_numpy()
    assert prep.train_rows.tolist() == np.flatnonzero(day < "2024-05-06").tolist()
    assert prep.valid_rows.tolist() == np.flatnonzero(day == "2024-05-06").tolist()
    assert prep.test_rows.tolist() == np.flatnonzero(day == "2024-05-07").tolist()
    assert prep.test is prep.train  # one store, three row sets


@pytest.mark.parametrize("column", ["ts", "day"])
def test_time_split_fractions_never_put_an_earlier_row_after_training(tmp_path, column):
    path, df = _logs(tmp_path)
    prep = pipeline.prepare(path, "csv", _schema(tmp_path), valid_fraction=0.15, split=f"time:{column}",
                            test_fraction=0.1, use_cache=False)
    t = df[column].to_numpy()
    tr, va, te = prep.train_rows, prep.valid_rows, prep.test_rows
    assert tr.size + va.size + te.size == len(df) and len(np.intersect1d(tr, va)) == 0
    assert t[va].min() > t[tr].max() and t[te].min() > t[va].max()  # ties at a cut go to the later split
    if column == "ts":  # distinct values: the fractions are met to the row
        assert (va.size, te.size) == (450, 300)
    # the preprocessing is fitted on the training rows only: a user seen only later is out of vocabulary
    later = set(df["user"].to_numpy()[np.r_[va, te]]) - set(df["user"].to_numpy()[tr])
    assert all(u not in prep.pre.vocab("user") for u in later)


def test_time_split_is_cached_with_its_rows(tmp_path):
    path, _ = _logs(tmp_path)
    kw = dict(split="time:ts", valid_fraction=0.1, test_fraction=0.1, side=SideColumns(weight="w"),
              cache_dir=tmp_path / "cache")
    a = pipeline.prepare(path, "csv", _schema(tmp_path), **kw)
    b = pipeline.prepare(path, "csv", _schema(tmp_path), **kw)  # from the cache: the store carries the weights
    assert np.array_equal(a.test_rows, b.test_rows) and np.array_equal(a.train.weight, b.train.weight)
    c = pipeline.prepare(path, "csv", _schema(tmp_path), **{**kw, "test_fraction": 0.2})
    assert c.test_rows.size > b.test_rows.size


def test_time_split_refusals(tmp_path):
    path, _ = _logs(tmp_path)
    s = _schema(tmp_path)
    with pytest.raises(DeepFMError, match="need --split time"):
        pipeline.prepare(path, "csv", s, valid_from="2024-05-06", use_cache=False)
    with pytest.raises(DeepFMError, match="'random' or 'time:COLUMN'"):
        pipeline.prepare(path, "csv", s, split="day", use_cache=False)
    with pytest.raises(DataError, match="no training rows"):
        pipeline.prepare(path, "csv", s, split="time:day", valid_from="2024-01-01", use_cache=False)
    with pytest.raises(DataError, match="not a number"):
        pipeline.prepare(path, "csv", s, split="time:ts", valid_from="May", use_cache=False)
    with pytest.raises(DataError, match="required by the schema is missing"):
        pipeline.prepare(path, "csv", s, split="time:nope", use_cache=False)


# ------------------------------------------------------------------ weights in the data

def test_bad_weights_name_file_row_and_column(tmp_path):
    path, df = _logs(tmp_path)
    df.loc[41, "w"] = -2.0
    df.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"logs.csv, field 'w': data row 42: sample weight must be .* got -2"):
        pipeline.prepare(path, "csv", _schema(tmp_path), side=SideColumns(weight="w"), use_cache=False)
    df["w"] = df["w"].astype(object)
    df.loc[41, "w"] = "heavy"
    df.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"line 43, field 'w'.*not a number"):  # the reader's own check
        pipeline.prepare(path, "csv", _schema(tmp_path), side=SideColumns(weight="w"), use_cache=False)
    with pytest.raises(DataError, match="also a feature"):
        pipeline.prepare(path, "csv", _schema(tmp_path), side=SideColumns(weight="site"), use_cache=False)


def _fm_and_data(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    import pyarrow as pa

    from deepfm.data import readers

    schema = Schema(fields=(Field("a"), Field("b")))
    table = pa.table({"a": rng.choice(list("pqrstu"), n), "b": rng.choice(list("xyz"), n)})
    y = (rng.random(n) < 0.3).astype(np.float32)
    data = readers.from_arrow(table, schema, y)
    pre = Preprocessor(schema).fit(data)
    return pre, data


def _train_once(pre, enc, cfg):
    from deepfm.models.build import build_model
    from deepfm.models.ctr import ModelConfig

    torch.manual_seed(0)
    fields = pipeline.Prepared(pre, enc, None, None, None).fields
    model = build_model(fields, ModelConfig.from_dict({"model": "fm", "embed_dim": 4}), enc.rows)
    fit(model, pipeline.batcher(enc, fields), cfg, progress=False)
    return model


def test_integer_weights_train_like_repeated_rows():
    """One full-batch step: the weighted loss sum(w l) / sum(w) is the mean loss over the repeated rows."""
    pre, data = _fm_and_data()
    k = np.random.default_rng(1).integers(0, 4, data.rows)
    k[0] = 1
    cfg = TrainConfig(epochs=1, batch_size=100_000, prefetch=False, threads=1)
    weighted = pre.transform(data)
    weighted.weight = k.astype(np.float32)
    rep = pre.transform(data)
    rows = np.repeat(np.arange(data.rows), k)
    rep.cat, rep.num, rep.label = np.ascontiguousarray(rep.cat[rows]), rep.num[rows], rep.label[rows]
    a = _train_once(pre, weighted, cfg).state_dict()
    b = _train_once(pre, rep, cfg).state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    ones = pre.transform(data)
    ones.weight = np.ones(data.rows, np.float32)
    c, d = _train_once(pre, ones, cfg).state_dict(), _train_once(pre, pre.transform(data), cfg).state_dict()
    assert all(torch.equal(c[n], d[n]) for n in c)  # unit weights: the unweighted run, to the bit


# ------------------------------------------------------------------ CLI

def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_weights_groups_time_split_and_evaluate(tmp_path):
    path, df = _logs(tmp_path)
    out = tmp_path / "m"
    r = run("train", "--format", "csv", "--schema", tmp_path / "schema.yaml", "--train", path, "--split", "time:ts",
            "--valid-fraction", "0.2", "--test-fraction", "0.2", "--weight-column", "w", "--group-column", "user",
            "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    assert "GAUC" in r.output and "(weighted)" in r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["rows"] == 600 and m["valid"]["rows"] == 600
    assert {"ne", "gauc", "gauc_groups", "weight_sum"} <= set(m["test"])
    training = json.loads((out / "training.json").read_text())
    assert training["train"]["weight_column"] == "w"
    h = training["history"][-1]  # what early stopping saw: the weighted validation metrics
    assert h["valid_weight_sum"] == pytest.approx(m["valid"]["weight_sum"])
    assert h["valid_auc"] == pytest.approx(m["valid"]["auc"], abs=1e-9)
    # evaluate on the test rows: the bundle's weight column by default, GAUC on request; = scikit-learn
    test = df.iloc[np.argsort(df["ts"].to_numpy(), kind="stable")[-600:]]
    test.to_csv(tmp_path / "test.csv", index=False)
    r = run("evaluate", out, tmp_path / "test.csv", "--group-column", "user", "--json")
    assert r.exit_code == 0, r.output
    e = json.loads(r.output)
    assert e["auc"] == pytest.approx(m["test"]["auc"], abs=1e-6) and e["gauc"] == pytest.approx(m["test"]["gauc"],
                                                                                              abs=1e-6)
    from deepfm.serve.predictor import Predictor

    p = Predictor(out).predict_file(tmp_path / "test.csv").probabilities
    y, w, g = test["label"].to_numpy(), test["w"].to_numpy(), test["user"].to_numpy()
    assert e["auc"] == pytest.approx(roc_auc_score(y, p, sample_weight=w), abs=1e-9)
    assert e["logloss"] == pytest.approx(log_loss(y, p, sample_weight=w), abs=1e-9)
    assert e["gauc"] == pytest.approx(group_auc(y, p, g, w)[0], abs=1e-12)
    r = run("evaluate", out, tmp_path / "test.csv", "--weight-column", "w", "--json")
    assert json.loads(r.output)["weight_sum"] == pytest.approx(w.sum(), rel=1e-6)


def test_cli_streaming_refuses_side_columns(tmp_path):
    path, _ = _logs(tmp_path, n=300)
    r = CliRunner().invoke(main, ["train", "--format", "csv", "--schema", str(tmp_path / "schema.yaml"), "--train",
                                  str(path), "--weight-column", "w", "--streaming", "--out", str(tmp_path / "m"),
                                  *FAST])
    assert r.exit_code != 0 and "not available with --streaming" in r.output


# ------------------------------------------------------------------ Python API

def test_estimator_sample_weight():
    from deepfm.estimator import DeepFMClassifier

    rng = np.random.default_rng(0)
    n = 600
    X = pd.DataFrame({"site": rng.choice(list("abcdef"), n), "price": rng.lognormal(size=n)})
    y = (rng.random(n) < np.where(X["site"].isin(["a", "b"]), 0.6, 0.2)).astype(int)
    kw = dict(epochs=1, batch_size=64, model="fm")
    p0 = DeepFMClassifier(**kw).fit(X, y).predict_proba(X)
    p1 = DeepFMClassifier(**kw).fit(X, y, sample_weight=np.ones(n)).predict_proba(X)
    assert np.array_equal(p0, p1)
    w = np.where(y == 1, 5.0, 1.0)  # up-weighted clicks: a higher predicted CTR
    clf = DeepFMClassifier(**kw).fit(X, y, sample_weight=w)
    assert clf.predict_proba(X)[:, 1].mean() > p0[:, 1].mean()
    assert "weight_sum" in clf.metrics_["valid"]
    with pytest.raises(ValueError, match="one weight per row"):
        DeepFMClassifier(**kw).fit(X, y, sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="finite number >= 0"):
        DeepFMClassifier(**kw).fit(X, y, sample_weight=-np.ones(n))


def test_compare_tables_have_ne_and_gauc(tmp_path):
    from deepfm.compare import compare

    path, df = _logs(tmp_path, n=2000)
    test = tmp_path / "test.csv"
    df.iloc[:500].to_csv(test, index=False)
    res = compare(path, test, tmp_path / "cmp", fmt="csv", models="lr,fm", seeds=1,
                  schema_path=tmp_path / "schema.yaml", epochs=1, overrides=["train.batch_size=256"],
                  weight_column="w", group_column="user", echo=lambda s: None)
    md = (tmp_path / "cmp" / "table.md").read_text()
    assert "| Test NE | Test GAUC |" in md and "GAUC = the impression-weighted" in md
    t = res.runs[0].record["metrics"]["test"]
    assert {"ne", "gauc", "weight_sum"} <= set(t)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "cmp" / "results.csv")))
    assert float(rows[0]["test_gauc"]) == pytest.approx(t["gauc"], abs=1e-6)
    assert float(rows[0]["test_ne"]) == pytest.approx(t["ne"], abs=1e-6)
