"""End to end on synthetic data through the CLI: train -> bundle -> evaluate / predict / info."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from deepfm.cli import main
from deepfm.errors import BundleError
from deepfm.serve import bundle as B
from deepfm.serve.predictor import Predictor

FAST = ["--epochs", "2", "--batch-size", "128", "--quiet", "--set", "model.hidden=[32,32]"]


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r


@pytest.fixture(scope="module")
def trained(synth_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "bundle"
    r = run("train", "--format", "criteo", "--train", synth_small / "train.tsv", "--valid", synth_small / "valid.tsv",
            "--test", synth_small / "test.tsv", "--out", out, "--seed", 3, *FAST)
    assert r.exit_code == 0, r.output
    return out


def test_bundle_layout_is_safetensors_and_json_only(trained):
    names = sorted(p.name for p in trained.iterdir())
    assert names == ["manifest.json", "metrics.json", "metrics.jsonl", "model.json", "model.safetensors",
                     "preprocessor.json", "train.log", "training.json"]
    assert "epoch 2/" in (trained / "train.log").read_text()  # the run's log (text), checksummed
    for n in names:
        if n.endswith(".json"):
            json.loads((trained / n).read_text())
    assert "v.weight" in load_file(str(trained / "model.safetensors"))
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "valid_auc" in json.loads(lines[0])


def test_evaluate_json_matches_training_test_metrics(trained, synth_small):
    r = run("evaluate", trained, synth_small / "test.tsv", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert {"auc", "logloss", "rows"} <= set(m) and m["rows"] == 600
    saved = json.loads((trained / "metrics.json").read_text())["test"]
    assert m["auc"] == pytest.approx(saved["auc"], abs=1e-9)
    assert m["logloss"] == pytest.approx(saved["logloss"], abs=1e-7)
    assert m["auc"] > 0.6


def test_reloaded_bundle_gives_identical_predictions(trained, synth_small, tmp_path):
    p1 = Predictor(trained).predict_file(synth_small / "test.tsv").probabilities
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    p2 = Predictor(copy).predict_file(synth_small / "test.tsv").probabilities
    np.testing.assert_array_equal(p1, p2)


def test_predict_writes_parquet_and_csv_with_id(trained, synth_small, tmp_path):
    r = run("predict", trained, synth_small / "test.tsv", "--out", tmp_path / "p.parquet")
    assert r.exit_code == 0, r.output
    t = pq.read_table(tmp_path / "p.parquet")
    assert t.num_rows == 600 and t.column_names == ["probability"]
    p = Predictor(trained).predict_file(synth_small / "test.tsv").probabilities
    np.testing.assert_allclose(t.column("probability").to_numpy(), p)
    r = run("predict", trained, synth_small / "test.tsv", "--out", tmp_path / "p.csv", "--id-column", "C1")
    assert r.exit_code == 0, r.output
    head = (tmp_path / "p.csv").read_text().splitlines()[:2]
    assert head[0] == '"C1","probability"' and len(head[1].split(",")) == 2


def test_info(trained):
    r = run("info", trained)
    assert r.exit_code == 0 and "deepfm" in r.output and "C26" in r.output
    j = json.loads(run("info", trained, "--json").output)
    assert j["manifest"]["format_version"] == B.FORMAT_VERSION and j["parameters"] > 0


def test_version_mismatch_and_corruption_are_clear(trained, tmp_path):
    bad = tmp_path / "b"
    shutil.copytree(trained, bad)
    man = json.loads((bad / "manifest.json").read_text())
    man["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match="format version 99"):
        B.load(bad)
    r = run("evaluate", bad, tmp_path / "x")  # click checks the data path first
    assert r.exit_code != 0
    corrupt = tmp_path / "c"
    shutil.copytree(trained, corrupt)
    data = bytearray((corrupt / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (corrupt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch for model.safetensors"):
        B.load(corrupt)
    with pytest.raises(BundleError, match="not a deepfm bundle"):
        B.load(tmp_path)


def test_cli_error_is_one_line_not_a_traceback(synth_small, tmp_path):
    bad = tmp_path / "bad.tsv"
    lines = (synth_small / "train.tsv").read_text().splitlines()[:50]
    lines[9] = lines[9].replace("\t", "\tzz", 1)  # non-numeric I1 on line 10
    bad.write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(main, ["train", "--format", "criteo", "--train", str(bad), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2
    assert "line 10" in r.output and "'I1'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["train", "--format", "criteo", "--train", str(bad), "--out", str(tmp_path / "m"),
                                  "--on-bad-rows", "skip", *FAST])
    assert r.exit_code == 0 and "skipped 1 bad row" in r.output and "line 10" in r.output


def test_same_seed_same_weights_different_seed_different(synth_small, tmp_path):
    args = ["train", "--format", "criteo", "--train", synth_small / "train.tsv", "--no-cache", "--threads", 1, *FAST]
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert run(*args, "--seed", seed, "--out", tmp_path / name).exit_code == 0
    wa, wb, wc = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_encoded_store_cache_is_reused(synth_small, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPFM_CACHE", str(tmp_path / "cache"))
    args = ["train", "--format", "criteo", "--train", synth_small / "train.tsv", *FAST, "--epochs", 1]
    r1 = CliRunner().invoke(main, [str(a) for a in args] + ["--out", str(tmp_path / "a")])
    r2 = CliRunner().invoke(main, [str(a) for a in args] + ["--out", str(tmp_path / "b")])
    assert "using cached" not in r1.output and "using cached" in r2.output
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_help_has_examples():
    for cmd in ("train", "evaluate", "predict", "info", "synth", "demo"):
        r = run(cmd, "--help")
        assert r.exit_code == 0 and "Example" in r.output


def test_sparse_embedding_update_trains_a_bundle_as_good_as_dense(synth_small, tmp_path):
    aucs = {}
    for mode in ("dense", "sparse"):
        r = run("train", "--format", "criteo", "--train", synth_small / "train.tsv", "--valid",
                synth_small / "valid.tsv", "--out", tmp_path / mode, "--embedding-update", mode, "--seed", 3, *FAST)
        assert r.exit_code == 0, r.output
        info = json.loads((tmp_path / mode / "training.json").read_text())
        assert info["train"]["embedding_update"] == mode
        aucs[mode] = json.loads(run("evaluate", tmp_path / mode, synth_small / "test.tsv", "--json").output)["auc"]
    assert aucs["sparse"] > aucs["dense"] - 0.02, aucs
