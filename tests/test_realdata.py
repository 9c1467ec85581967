"""End to end on each real sample in ../shared/data (skipped when absent): train, then evaluate through
the CLI. Marked slow: `pytest -m slow` (CI runs both groups)."""

import json

import pytest
from click.testing import CliRunner

from deepfm.cli import main
from deepfm.data.split import split_lines

from .conftest import shared

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

SETS = {  # name: (format, train, test, minimal test AUC that shows learning)
    "criteo": ("criteo", "criteo_kaggle_head10k/train", "criteo_kaggle_head10k/test", 0.68),
    "avazu": ("avazu", "avazu_head10k/train", "avazu_head10k/test", 0.64),
    "ipinyou": ("libfm", "ipinyou_2997_fnn_sample/train.fm.txt", "ipinyou_2997_fnn_sample/test.fm.txt", 0.5),
    "movielens": ("movielens", "movielens_100k/ml-100k.inter", None, 0.75),
    "frappe": ("libfm", "frappe_nfm/frappe.validation.libfm", None, 0.90),
}


def _paths(name, tmp_path):
    fmt, train, test, floor = SETS[name]
    src = shared(train)
    if test is None:  # one file: a seeded 80/20 split
        parts = split_lines(src, tmp_path / "split", {"train": 0.8, "test": 0.2}, seed=7,
                            header=fmt == "movielens", suffix=src.suffix)
        return fmt, parts["train"], parts["test"], floor
    return fmt, src, shared(test), floor


def _train_eval(fmt, train, test, out, *extra):
    r = CliRunner().invoke(main, ["train", "--format", fmt, "--train", str(train), "--out", str(out), "--quiet",
                                  "--seed", "1", *extra])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["evaluate", str(out), str(test), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


@pytest.mark.parametrize("name", ["criteo", "avazu", "ipinyou", "movielens"])
def test_train_then_evaluate(name, tmp_path):
    fmt, train, test, floor = _paths(name, tmp_path)
    m = _train_eval(fmt, train, test, tmp_path / "m", "--epochs", "4")
    assert m["rows"] > 0 and 0 < m["logloss"] < 1
    assert m["auc"] > floor, m


def test_frappe_deepfm_beats_lr(tmp_path):
    fmt, train, test, floor = _paths("frappe", tmp_path)
    deep = _train_eval(fmt, train, test, tmp_path / "deepfm")
    lr = _train_eval(fmt, train, test, tmp_path / "lr", "--model", "lr")
    assert deep["auc"] > floor
    assert deep["auc"] > lr["auc"], (deep, lr)
