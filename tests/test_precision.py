"""train.precision: "auto" (deepfm.accel.precision), and bf16 mixed precision against fp32."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from deepfm.accel import precision
from deepfm.data.preprocess import Encoded
from deepfm.data.store import Batcher
from deepfm.layout import FieldSpec
from deepfm.models import CTRModel, ModelConfig
from deepfm.train.trainer import TrainConfig, Trainer


class FakeTimer:
    """perf_counter stand-in: measure() reads it before and after each side, fp32 first, in turn; each
    fp32 side lasts ``fp32`` s, each bf16 side ``bf16`` s."""

    def __init__(self, fp32: float, bf16: float) -> None:
        self.t, self.steps = 0.0, itertools.cycle([1.0, fp32, 1.0, bf16])

    def __call__(self) -> float:
        self.t += next(self.steps)
        return self.t


def _model(hidden=(16, 16)) -> CTRModel:
    return CTRModel([FieldSpec("a", "cat", 50, 1), FieldSpec("b", "cat", 70, 1)],
                    ModelConfig(embed_dim=4, hidden=list(hidden), dropout=0.2))


@pytest.mark.parametrize("fp32, bf16, chosen", [(2.0, 1.0, "bf16"), (1.0, 1.0, "fp32"), (1.2, 1.0, "fp32"),
                                                (1.0, 2.0, "fp32")])
def test_auto_picks_bf16_only_when_clearly_faster(fp32, bf16, chosen):
    d = precision.decide("auto", _model(), 64, cache=False, timer=FakeTimer(fp32, bf16))
    assert (d.requested, d.chosen) == ("auto", chosen)
    assert d.ratio == pytest.approx(fp32 / bf16)
    assert d.fp32_ms == pytest.approx(fp32 * 1e3) and d.bf16_ms == pytest.approx(bf16 * 1e3)
    assert d.shapes == ((8, 16), (16, 16), (16, 1)) and d.batch == 64 and not d.cached


def test_auto_decision_is_cached_per_cpu_torch_and_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPFM_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "_memo", {})
    first = precision.decide("auto", _model(), 32, timer=FakeTimer(3.0, 1.0))
    files = list((tmp_path / "precision").glob("*.json"))
    assert first.chosen == "bf16" and len(files) == 1
    assert json.loads(files[0].read_text())["chosen"] == "bf16"
    monkeypatch.setattr(precision, "_memo", {})  # a new process: read from the file, not measured again
    again = precision.decide("auto", _model(), 32, timer=FakeTimer(1.0, 3.0))
    assert again.chosen == "bf16" and again.cached and again.ratio == first.ratio
    other = precision.decide("auto", _model(hidden=(8,)), 32, timer=FakeTimer(1.0, 3.0))  # other shapes
    assert other.chosen == "fp32" and not other.cached
    files[0].write_text("not json")  # a damaged cache file: measured again
    monkeypatch.setattr(precision, "_memo", {})
    assert precision.decide("auto", _model(), 32, timer=FakeTimer(1.0, 1.0)).chosen == "fp32"


def test_a_remembered_decision_is_the_last_one(tmp_path, monkeypatch):
    # a decision served from the in-process memo must still be what the pipeline records in training.json
    # (it used to keep an earlier decision, e.g. the wide start's LR with no GEMMs and no ratio)
    monkeypatch.setenv("DEEPFM_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "_memo", {})
    first = precision.decide("auto", _model(), 32, timer=FakeTimer(3.0, 1.0))
    lr = CTRModel([FieldSpec("a", "cat", 50, 1)], ModelConfig(model="lr"))
    precision.decide("auto", lr, 32)
    assert precision.last_decision().ratio is None
    assert precision.decide("auto", _model(), 32) is first and precision.last_decision() is first


def test_fixed_precisions_and_no_gemm_models_are_not_measured():
    def boom():
        raise AssertionError("measured")

    assert precision.decide("bf16", _model(), 64, timer=boom).chosen == "bf16"
    assert precision.decide("fp32", _model(), 64, timer=boom).chosen == "fp32"
    lr = CTRModel([FieldSpec("a", "cat", 50, 1)], ModelConfig(model="lr"))
    assert precision.decide("auto", lr, 64, timer=boom).chosen == "fp32"
    assert precision.decide("auto", _model(), 64, device="cuda", timer=boom).chosen == "fp32"
    with pytest.raises(ValueError, match="precision"):
        precision.decide("fp16", _model(), 64)


def test_presets_default_auto_paper_and_bars_fp32():
    from deepfm.pipeline import resolve_config

    assert resolve_config("default")[1].precision == "auto"
    assert resolve_config("paper")[1].precision == "fp32"
    assert resolve_config("bars")[1].precision == "fp32"
    assert resolve_config("paper", ["train.precision=auto"])[1].precision == "auto"


def _data(n: int = 6000, seed: int = 0):
    rng = np.random.default_rng(seed)
    cat = np.stack([rng.integers(2, 50, n), rng.integers(2, 70, n)], 1).astype(np.int32)
    logit = np.where(cat[:, 0] % 2 == 0, 1.0, -1.0) + np.where(cat[:, 1] % 3 == 0, 0.8, -0.4)
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    enc = Encoded(cat=cat, num=np.zeros((n, 0), np.float32), multi={}, label=label)
    return enc, [FieldSpec("a", "cat", 50, 1), FieldSpec("b", "cat", 70, 1)]


def test_bf16_training_matches_fp32_auc_and_keeps_fp32_master_weights():
    enc, fields = _data()
    aucs = {}
    for prec in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = CTRModel(fields, ModelConfig(embed_dim=4, hidden=[32, 32], dropout=0.2, batch_norm=True))
        cfg = TrainConfig(epochs=3, batch_size=256, lr=0.01, precision=prec, prefetch=False, seed=3)
        tr = Trainer(model, cfg, Batcher(enc, fields), np.arange(4500), Batcher(enc, fields),
                     np.arange(4500, 6000), progress=False)
        assert tr.precision.chosen == prec
        hist = tr.fit()
        aucs[prec] = max(h["valid_auc"] for h in hist)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        opt = tr.updater.state_dict()
        tensors = [t for t in _tensors(opt) if t.is_floating_point()]
        assert tensors and all(t.dtype == torch.float32 for t in tensors)
    assert aucs["fp32"] > 0.7
    assert abs(aucs["bf16"] - aucs["fp32"]) < 0.01, aucs


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_auto_on_this_machine_is_recorded_in_training_json(synth_small, tmp_path):
    from click.testing import CliRunner

    from deepfm.cli import main

    out = tmp_path / "m"
    r = CliRunner().invoke(main, ["train", "--format", "criteo", "--train", str(synth_small / "train.tsv"),
                                  "--valid-fraction", "0.2", "--out", str(out), "--epochs", "1", "--quiet",
                                  "--precision", "auto", "--no-cache"])
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "training.json").read_text())["precision"]
    assert rec["requested"] == "auto" and rec["chosen"] in ("fp32", "bf16")
    assert rec["ratio"] > 0 and rec["fp32_ms"] > 0 and rec["bf16_ms"] > 0 and rec["shapes"]
    assert (rec["chosen"] == "bf16") == (rec["ratio"] >= precision.AUTO_MIN_RATIO)
    print(f"auto on {rec['cpu']} {rec['flags']}: {rec['chosen']} (ratio {rec['ratio']})")


def test_bf16_validation_scoring_only_where_parity_holds(monkeypatch):
    from deepfm.train import trainer as tr_mod
    from deepfm.train.trainer import predict_logits

    enc, fields = _data(3000)
    torch.manual_seed(0)
    model = CTRModel(fields, ModelConfig(embed_dim=4, hidden=[32], dropout=0.2))
    cfg = TrainConfig(epochs=1, batch_size=256, precision="bf16", prefetch=False)
    tr = Trainer(model, cfg, Batcher(enc, fields), np.arange(2000), Batcher(enc, fields), np.arange(2000, 3000),
                 progress=False)
    tr.fit()
    rows = np.arange(2000, 3000)
    fp32 = predict_logits(model, Batcher(enc, fields), rows)
    got = tr._valid_logits(rows)
    assert tr._valid_precision_logged is True and not np.array_equal(got, fp32)  # bf16: close, not equal
    assert np.abs(got - fp32).max() < 0.05
    monkeypatch.setattr(tr_mod, "PARITY_MAX_DP", -1.0)  # parity "fails": fp32 scores
    np.testing.assert_array_equal(tr._valid_logits(rows), fp32)
    assert tr._valid_precision_logged is False
