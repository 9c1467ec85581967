"""Small-data quality of the default preset (issue 15) and the training options behind it: batch_norm auto,
wide_start auto, validations inside an epoch. The harness that measures all data sets is scripts/quality.py
(docs/quality.md); this file keeps a future change from breaking small-data quality again."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepfm import pipeline
from deepfm.models import build_model
from deepfm.models.ctr import AUTO_BATCH_NORM_ROWS, ModelConfig, resolve_config
from deepfm.train import trainer

# The regression set: `deepfm synth` with 20k rows (seed 0; 8k train, 2k valid, 10k test rows so that the
# test AUC is not dominated by test noise). At 8k rows LR is strong there: test AUC 0.7357 ± 0.0001 over seeds
# 1-5 (oracle 0.8034). Measured on 2026-12-02 (default preset with only the named change, seeds 1-5, 1 thread),
# the paired difference DeepFM - LR in test AUC, mean ± std (ddof=1) over the seeds:
#   previous default (batch norm on, no wide start):  -0.0268 ± 0.0071
#   batch norm off, no wide start:                    -0.0094 ± 0.0017
#   current default (batch_norm auto, wide_start auto): -0.0009 ± 0.0008
# MARGIN = 3 x 0.0017, the largest seed-to-seed std of that gap among the candidate defaults, rounded up to
# 0.005: the current default (one seed, deterministic on CPU) passes with room for its spread; the previous
# default and batch-norm-off alone fail it.
ROWS, SEED = 20_000, 0
MARGIN = 0.005


@pytest.fixture(scope="module")
def lr_strong(tmp_path_factory):
    from deepfm.synth import generate

    out = tmp_path_factory.mktemp("lr_strong")
    generate(out, rows=ROWS, seed=SEED, valid_fraction=0.1, test_fraction=0.5)
    prep = pipeline.prepare(out / "train.tsv", "criteo", None, out / "valid.tsv", use_cache=False)
    test = pipeline.encode_file(out / "test.tsv", "criteo", prep.pre, use_cache=False)
    return prep, test


def _test_auc(prep, test, overrides: list[str], seed: int = 1) -> tuple[float, dict]:
    model_cfg, train_cfg = pipeline.resolve_config("default", overrides + ["train.threads=1"], seed=seed)
    _, res = pipeline.train(prep, model_cfg, train_cfg, test=test, progress=False)
    return res["metrics"]["test"]["auc"], res["training"]


def test_default_is_not_worse_than_lr_on_small_data(lr_strong):
    prep, test = lr_strong
    lr_auc, _ = _test_auc(prep, test, ["model.model=lr"])
    auc, training = _test_auc(prep, test, [])
    assert training["model"]["batch_norm"] is False  # 8k rows: below AUTO_BATCH_NORM_ROWS
    assert "wide_start" in training
    assert auc >= lr_auc - MARGIN, (auc, lr_auc)


def test_batch_norm_auto_follows_the_training_rows():
    cfg = ModelConfig(batch_norm="auto")
    assert resolve_config(cfg, AUTO_BATCH_NORM_ROWS - 1).batch_norm is False
    assert resolve_config(cfg, AUTO_BATCH_NORM_ROWS).batch_norm is True
    assert resolve_config(ModelConfig(batch_norm=True), 10).batch_norm is True
    with pytest.raises(ValueError, match="training rows"):
        build_model([], cfg)


def test_default_preset_at_large_data():
    """From 20k rows the data-size rules turn batch norm on and the wide start off; the rest is the default
    measured in docs/quality.md (embedding 16, MLP 256-128, net L2 1e-3, one LR cut before stopping)."""
    model_cfg, train_cfg = pipeline.resolve_config("default")
    assert resolve_config(model_cfg, 1_000_000).batch_norm is True
    assert train_cfg.wide_start == "auto" and train_cfg.evals_per_epoch == 1
    assert pipeline.AUTO_WIDE_START_ROWS <= 20_000
    assert (model_cfg.embed_dim, list(model_cfg.hidden), model_cfg.net_l2) == (16, [256, 128], 1e-3)
    assert train_cfg.reduce_lr_on_plateau is True


def test_evals_per_epoch_validates_inside_the_epoch(synth_small, monkeypatch):
    prep = pipeline.prepare(synth_small / "train.tsv", "criteo", None, synth_small / "valid.tsv", use_cache=False)
    calls: list[int] = []
    real = trainer.predict_logits

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "predict_logits", counting)
    ov = ["model.hidden=[16]", "train.epochs=2", "train.patience=50", "train.wide_start=false",
          "train.evals_per_epoch=3", "train.threads=1"]
    model_cfg, train_cfg = pipeline.resolve_config("default", ov)
    _, res = pipeline.train(prep, model_cfg, train_cfg, progress=False)
    history = res["training"]["history"]
    assert len(history) == 2 and len(calls) == 2 * 3  # 3 validations per epoch (the last at its end)
    assert all(h["best_epoch"] in (1, 2) for h in history)
    assert trainer.resolve_evals_per_epoch("auto", 8_000) == trainer.AUTO_EVALS
    assert trainer.resolve_evals_per_epoch("auto", 10_000_000) == 1


def test_wide_start_begins_from_the_lr_solution(synth_small):
    """The model starts from LR's first-order weights (MLP output zero), validated before the first epoch:
    if no epoch beats it, the kept weights give LR's validation metrics."""
    prep = pipeline.prepare(synth_small / "train.tsv", "criteo", None, synth_small / "valid.tsv", use_cache=False)
    ov = ["model.hidden=[16]", "train.threads=1", "train.epochs=3"]
    _, lr = pipeline.train(prep, *pipeline.resolve_config("default", ov + ["model.model=lr"]), progress=False)
    _, ws = pipeline.train(prep, *pipeline.resolve_config("default", ov + ["train.wide_start=true"]),
                           progress=False)
    assert ws["training"]["wide_start"]["lr_epochs"] == len(lr["training"]["history"])
    monitored = [h["valid_auc"] - h["valid_logloss"] for h in ws["training"]["history"]]
    lr_value = lr["metrics"]["valid"]["auc"] - lr["metrics"]["valid"]["logloss"]
    kept = ws["metrics"]["valid"]["auc"] - ws["metrics"]["valid"]["logloss"]
    assert kept >= lr_value - 1e-4  # never below the starting (LR) point on validation
    if max(monitored) <= lr_value + 1e-6:
        assert ws["training"]["best_epoch"] == 0
    json.dumps(ws["training"])  # recorded in training.json


def test_wide_lr_scale_gives_the_first_order_weights_their_own_rate(synth_small):
    prep = pipeline.prepare(synth_small / "train.tsv", "criteo", None, synth_small / "valid.tsv", use_cache=False)
    ov = ["model.hidden=[16]", "train.threads=1", "train.epochs=1", "train.wide_start=false"]
    _, a = pipeline.train(prep, *pipeline.resolve_config("default", ov), progress=False)
    _, b = pipeline.train(prep, *pipeline.resolve_config("default", ov + ["train.wide_lr_scale=10"]),
                          progress=False)
    assert np.isfinite(b["metrics"]["valid"]["auc"]) and a["metrics"]["valid"] != b["metrics"]["valid"]


def test_one_min_count_rule_for_inferred_schemas(tmp_path):
    """Issue 20.2: `schema infer` and the Python API infer min_count 10, as the criteo format, and the CLI
    says so in its output."""
    import pyarrow as pa
    from click.testing import CliRunner

    from deepfm.cli import main
    from deepfm.data import readers
    from deepfm.data.infer import DEFAULT_MIN_COUNT, infer_fields

    csv = tmp_path / "d.csv"
    csv.write_text("click,site,n\n" + "".join(f"{i % 2},s{i % 7},{i * 13 % 101}\n" for i in range(200)))
    res = CliRunner().invoke(main, ["schema", "infer", str(csv)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"# min_count {DEFAULT_MIN_COUNT}: ") and "min_count: 10" in res.output
    out = tmp_path / "s.yaml"
    res = CliRunner().invoke(main, ["schema", "infer", str(csv), "--out", str(out), "--min-count", "3"])
    assert res.exit_code == 0 and "min_count 3" in res.output
    fields = infer_fields(pa.table({"site": ["a", "b"] * 5}), set())  # what DeepFMClassifier infers
    crit = {f.min_count for f in readers.criteo_schema().fields if f.kind == "categorical"}
    assert {f.min_count for f in fields} == crit == {DEFAULT_MIN_COUNT}
