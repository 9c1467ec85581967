"""Warm start (--init-from): day 1, then day 2 with new values. The vocabulary grows and keeps its indices,
the day-1 rows keep their embeddings at init, the day-2 bundle scores better and records its lineage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from deepfm import pipeline
from deepfm.cli import main
from deepfm.data import readers
from deepfm.data.preprocess import Preprocessor
from deepfm.models import build_model
from deepfm.schema import OOV
from deepfm.serve.bundle import load
from deepfm.serve.predictor import Predictor

FAST = ["--epochs", "2", "--batch-size", "256", "--min-count", "2", "--set", "model.hidden=[32]", "--quiet",
        "--no-cache"]


@pytest.fixture(scope="module")
def days(synth_small, tmp_path_factory):
    d = tmp_path_factory.mktemp("days")
    lines = (synth_small / "train.tsv").read_text().splitlines(keepends=True)
    half = len(lines) // 2
    (d / "day1.tsv").write_text("".join(lines[:half]))
    (d / "day2.tsv").write_text("".join(lines[half:]))
    r = CliRunner().invoke(main, ["train", "--format", "criteo", "--train", str(d / "day1.tsv"), "--valid",
                                  str(synth_small / "valid.tsv"), "--out", str(d / "b1"), *FAST])
    assert r.exit_code == 0, r.output
    return d


def test_grow_keeps_indices_and_appends_new_values(days):
    parent = load(days / "b1").preprocessor
    fresh = Preprocessor(parent.schema).fit(readers.read(days / "day2.tsv", "criteo", parent.schema))
    grown = pipeline.grow(parent, fresh)
    for f in parent.schema.fields:
        if f.encoded_kind != "cat":
            continue
        old, new = parent.vocab(f.name), grown.vocab(f.name)
        assert new[: len(old)] == old  # existing values keep their index
        assert set(new[len(old):]) == set(fresh.vocab(f.name)) - set(old)
    assert any(len(grown.vocab(f.name)) > len(parent.vocab(f.name)) for f in parent.schema.fields
               if f.encoded_kind == "cat")
    # a value in neither vocabulary stays OOV
    table = readers.read(days / "day2.tsv", "criteo", parent.schema).table.slice(0, 1)
    table = table.set_column(table.schema.get_field_index("C1"), "C1", [["never-seen"]])
    enc = grown.transform(readers.from_arrow(table, parent.schema))
    assert enc.cat[0, 0] == OOV


def test_warm_start_copies_day1_rows_and_initialises_new_ones(days):
    b1 = load(days / "b1")
    fresh = Preprocessor(b1.preprocessor.schema).fit(readers.read(days / "day2.tsv", "criteo",
                                                                  b1.preprocessor.schema))
    grown = pipeline.grow(b1.preprocessor, fresh)
    from deepfm.data.store import layout

    torch.manual_seed(0)
    model = build_model(layout(grown), b1.model.cfg)
    counts = pipeline.warm_start(model, b1.model)
    assert counts["rows_new"] > 0
    src, dst = b1.model.v, model.v
    s0 = d0 = 0
    for n_src, n_dst in zip(src.sizes, dst.sizes, strict=True):
        assert torch.equal(dst.weight[d0: d0 + n_src], src.weight[s0: s0 + n_src])
        if n_dst > n_src:  # new rows: fresh (small random), not copies
            assert dst.weight[d0 + n_src: d0 + n_dst].abs().max() < 1e-3
        s0, d0 = s0 + n_src, d0 + n_dst
    for k, v in b1.model.state_dict().items():
        if not k.startswith(("w.", "v.")):
            assert torch.equal(model.state_dict()[k], v), k


def test_day2_bundle_scores_better_and_records_lineage(days, synth_small):
    r = CliRunner().invoke(main, ["train", "--train", str(days / "day2.tsv"), "--valid", str(synth_small / "valid.tsv"),
                                  "--out", str(days / "b2"), "--init-from", str(days / "b1"), *FAST])
    assert r.exit_code == 0, r.output
    training = json.loads((days / "b2" / "training.json").read_text())
    assert training["lineage"]["parent"] == str(days / "b1") and training["lineage"]["rows_new"] > 0
    assert training["lineage"]["parent_data"]["path"].endswith("day1.tsv")
    test = synth_small / "test.tsv"
    from deepfm.train.metrics import evaluate

    aucs = {}
    for b in ("b1", "b2"):
        res = Predictor(days / b).predict_file(test)  # loads and serves like any bundle
        aucs[b] = evaluate(res.label, res.probabilities)["auc"]
    assert aucs["b2"] > aucs["b1"], aucs
    assert np.isfinite(list(aucs.values())).all()
