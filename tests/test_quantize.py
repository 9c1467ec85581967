"""Quantised scoring (serve.quantize): the int8 and bf16 engines against fp32, their parity checks, the auto
choice, the CLI flags and the int8 ONNX export."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from deepfm.cli import main
from deepfm.data import readers
from deepfm.data.store import Batcher
from deepfm.errors import DeepFMError
from deepfm.layout import layout
from deepfm.serve import quantize as Q
from deepfm.serve.bundle import load
from deepfm.serve.predictor import Predictor


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(synth_small, tmp_path_factory):
    """1 epoch on `deepfm synth` tiny data; three hidden layers with batch norm (the int8 engine quantises
    the second and third; folding covers batch norm)."""
    out = tmp_path_factory.mktemp("q") / "bundle"
    r = run("train", "--format", "criteo", "--train", synth_small / "train.tsv", "--valid", synth_small / "valid.tsv",
            "--out", out, "--seed", 0, "--epochs", 1, "--batch-size", 256, "--quiet",
            "--set", "model.hidden=[64,64,64]", "--set", "model.batch_norm=true")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def rows(trained, synth_small):
    """(model, idx, val, label) of the training split's 4.8k rows, encoded."""
    b = load(trained)
    data = readers.read(synth_small / "train.tsv", "criteo", b.preprocessor.schema)
    enc = b.preprocessor.transform(data)
    idx, val, _ = Batcher(enc, layout(b.preprocessor))(slice(0, enc.rows))
    return b.model.eval(), idx.numpy(), val.numpy(), np.asarray(enc.label)


def test_folded_fp32_mlp_equals_the_model_and_shares_the_tables(rows):
    model, idx, val, _ = rows
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.dnn.net)
    q = Q.scoring_model(model, "fp32")
    assert q.v.weight is model.v.weight and q.dnn is not model.dnn  # shallow: same tables, own MLP
    assert type(model.dnn).__name__ == "FusedMLP"  # the original is left as it was
    np.testing.assert_allclose(Q._logits(q, idx, val), Q._logits(model, idx, val), atol=1e-5)


@pytest.mark.parametrize("engine", ["int8", "bf16"])
def test_parity_within_targets_on_a_trained_bundle(rows, engine):
    model, idx, val, label = rows
    q = Q.scoring_model(model, engine)
    p = Q.parity(model, q, idx, val, label, engine=engine)
    assert p.rows == len(idx) and p.d_auc is not None
    assert p.max_dp <= Q.MAX_DP and p.d_auc <= Q.MAX_DAUC, p.line()
    assert p.max_dp > 0  # it is really a different computation
    assert p.ok and "parity holds" in p.line()


def test_int8_engine_quantises_the_hidden_layers_after_the_first(rows):
    q = Q.scoring_model(rows[0], "int8")
    kinds = [type(m).__name__ for m in q.dnn.hidden]
    assert kinds == ["Linear", "_Int8Linear", "_Int8Linear"]
    assert isinstance(q.dnn.out, torch.nn.Linear)


def test_predict_cli_engines_agree_with_fp32_and_report_parity(trained, synth_small, tmp_path):
    ref_out = tmp_path / "fp32.parquet"
    assert run("predict", trained, synth_small / "train.tsv", "--out", ref_out, "--quiet").exit_code == 0
    ref = pq.read_table(ref_out)["probability"].to_numpy()
    for engine in ("int8", "bf16", "auto"):
        out = tmp_path / f"{engine}.parquet"
        r = run("predict", trained, synth_small / "train.tsv", "--out", out, "--engine", engine, "--quiet")
        assert r.exit_code == 0, r.output
        assert f"engine {engine}" in r.output and "rows of the input" in r.output and "max |dp|" in r.output
        got = pq.read_table(out)["probability"].to_numpy()
        assert len(got) == len(ref) and np.abs(got - ref).max() <= Q.MAX_DP
        if engine != "auto":
            assert np.abs(got - ref).max() > 0


def test_bad_engine_name_is_a_clear_error(trained, synth_small, tmp_path):
    r = CliRunner().invoke(main, ["predict", str(trained), str(synth_small / "test.tsv"), "--out",
                                  str(tmp_path / "p.parquet"), "--engine", "int4"])
    assert r.exit_code == 2 and "'int4' is not one of" in r.output and "int8" in r.output
    r = CliRunner().invoke(main, ["serve", str(trained), "--engine", "fp16"])
    assert r.exit_code == 2 and "'fp16' is not one of" in r.output
    with pytest.raises(ValueError, match="engine must be one of torch, onnxruntime, int8, bf16, auto"):
        Predictor(trained, engine="int4")
    with pytest.raises(ValueError, match="quantised engine must be one of"):
        Q.Scorer(load(trained).model, "int4")


def test_auto_refuses_an_engine_whose_parity_fails(rows, monkeypatch):
    model, idx, val, label = rows
    real = Q.parity

    def bad_int8(*a, **kw):
        p = real(*a, **kw)
        if kw["engine"] == "int8":
            p.max_dp = 10 * Q.MAX_DP
        return p

    monkeypatch.setattr(Q, "parity", bad_int8)
    monkeypatch.setattr(Q, "time_pair", lambda *a, **kw: (1.0, 0.1))  # every candidate 10x faster
    monkeypatch.setattr(Q, "has_fast_bf16", lambda: False)  # candidates: int8 only
    lines = []
    s = Q.Scorer(model, "auto", report=lines.append)
    assert s.resolve(idx, val, label, "the input") == "fp32" and s.model is model
    assert "PARITY FAILS" in lines[0] and "auto -> fp32" in lines[0]
    # with bf16 a candidate too, auto takes the one that holds
    monkeypatch.setattr(Q, "has_fast_bf16", lambda: True)
    s = Q.Scorer(model, "auto", report=lines.append)
    assert s.resolve(idx, val, label) == "bf16"
    # an AUC failure alone refuses it as well
    monkeypatch.setattr(Q, "MAX_DAUC", -1.0)
    assert Q.Scorer(model, "auto", report=lines.append).resolve(idx, val, label) == "fp32"


def test_auto_refuses_an_engine_that_is_not_faster(rows, monkeypatch):
    model, idx, val, label = rows
    monkeypatch.setattr(Q, "time_pair", lambda *a, **kw: (1.0, 1.0))
    s = Q.Scorer(model, "auto", report=lambda _: None)
    assert s.resolve(idx, val, label) == "fp32"
    assert all(p.ok and p.speedup == 1.0 for p in s.checks)


def test_a_requested_engine_that_fails_parity_warns_with_the_figures_and_is_used(rows, monkeypatch):
    model, idx, val, label = rows
    monkeypatch.setattr(Q, "MAX_DP", 0.0)
    lines = []
    s = Q.Scorer(model, "int8", report=lines.append)
    assert s.resolve(idx, val, label, "x.tsv") == "int8" and s.model is s.candidates["int8"]
    assert lines[0].startswith("warning: engine int8") and "PARITY FAILS" in lines[0]
    assert "max |dp|" in lines[0] and "AUC difference" in lines[0] and "4,800 rows of x.tsv" in lines[0]


def test_few_rows_or_none_check_parity_on_random_rows(rows):
    model, idx, val, label = rows
    s = Q.Scorer(model, "bf16", report=lambda _: None)
    s(idx[:300], val[:300])  # a first call with a small batch: the check runs on random rows
    assert s.checks[0].rows == Q.PARITY_ROWS and s.checks[0].d_auc is None
    assert "random" in s.checks[0].source


def test_predictor_small_batches_keep_the_numpy_path(trained, rows):
    _, idx, val, _ = rows
    fp32, int8 = Predictor(trained), Predictor(trained, engine="int8", report=lambda _: None)
    np.testing.assert_array_equal(int8.logits(idx[:10], val[:10]), fp32.logits(idx[:10], val[:10]))
    assert int8.quant.chosen is None  # not needed yet
    assert np.abs(int8.logits(idx, val) - fp32.logits(idx, val)).max() > 0


def test_model_without_mlp(synth_small, tmp_path):
    out = tmp_path / "fm"
    r = run("train", "--format", "criteo", "--train", synth_small / "train.tsv", "--valid", synth_small / "valid.tsv",
            "--out", out, "--model", "fm", "--epochs", 1, "--quiet")
    assert r.exit_code == 0, r.output
    model = load(out).model
    with pytest.raises(DeepFMError, match="has no MLP"):
        Q.Scorer(model, "int8")
    s = Q.Scorer(model, "auto", report=lambda _: None)
    assert s.resolve() == "fp32"


def test_onnx_int8_export_parity(trained, rows, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from deepfm.serve.export import OnnxForward

    model, idx, val, label = rows
    path = Q.export_onnx_int8(model, tmp_path / "m.int8.onnx")
    got = Q.sigmoid(OnnxForward(path)(idx, val))
    ref = Q.sigmoid(Q._logits(model, idx, val))
    assert 0 < np.abs(got - ref).max() <= Q.MAX_DP
    assert abs(Q.auc(label, got) - Q.auc(label, ref)) <= Q.MAX_DAUC
    import onnx

    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulInteger") == 2 and "Gather" in ops  # two int8 layers; the tables stay fp32
    r = run("export", trained, "--quantize", "int8", "--out", tmp_path / "cli.onnx")
    assert r.exit_code == 0 and "(int8)" in r.output and "parity target" in r.output, r.output
    r = CliRunner().invoke(main, ["export", str(trained), "--quantize", "int8", "--format", "torchscript"])
    assert r.exit_code != 0 and "use --format onnx" in r.output


def test_onnx_int8_export_names_the_missing_package(rows, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ort(name, *a, **kw):
        if name == "onnxruntime":
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(DeepFMError, match="needs the onnxruntime package: pip install onnxruntime"):
        Q.export_onnx_int8(rows[0], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
