"""deepfm.tune: the paper's network shapes, and a tiny `deepfm tune` run whose best.yaml is a usable preset."""

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("optuna")

from deepfm import pipeline  # noqa: E402
from deepfm.commands.tune import tune_command  # noqa: E402
from deepfm.errors import DeepFMError  # noqa: E402
from deepfm.schema import Field, Schema  # noqa: E402
from deepfm.tune import SHAPES, SearchSpace, hidden_sizes  # noqa: E402


def test_network_shapes_as_in_the_paper():
    # Sec. 3.3: 3 hidden layers, 600 neurons in all
    assert [hidden_sizes(s, 3, 200) for s in SHAPES] == [[200, 200, 200], [100, 200, 300], [300, 200, 100],
                                                         [150, 300, 150]]
    assert hidden_sizes("increasing", 4, 100) == [40, 80, 120, 160]
    assert hidden_sizes("decreasing", 4, 100) == [160, 120, 80, 40]
    assert hidden_sizes("diamond", 4, 100) == [67, 133, 133, 67]
    assert hidden_sizes("diamond", 5, 180) == [100, 200, 300, 200, 100]
    for shape in SHAPES:
        assert hidden_sizes(shape, 1, 400) == [400]
        for layers in range(1, 6):
            for n in (1, 7, 100, 800):
                sizes = hidden_sizes(shape, layers, n)
                assert len(sizes) == layers and min(sizes) >= 1
                assert sum(sizes) == layers * n or n < layers  # the total is kept (unless widths hit 1)
    with pytest.raises(DeepFMError, match="unknown network shape"):
        hidden_sizes("pyramid", 3, 100)


def test_capped_search_space():
    assert SearchSpace.capped().neurons == (100, 800) and SearchSpace.capped().neuron_step == 100
    small = SearchSpace.capped(max_neurons=8, max_layers=2)
    assert small.neurons == (4, 8) and small.neuron_step == 1 and small.layers == (1, 2)
    assert SearchSpace.capped(150).neurons == (100, 150) and SearchSpace.capped(150).neuron_step == 1


SCHEMA = Schema(fields=(Field("signal"), Field("noise"), Field("x", "numeric", transform="standardize"),
                        Field("tags", "multi", sep="|", max_len=3, pooling="mean")), label="click")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune")
    rng = np.random.default_rng(0)
    n = 1500
    sig, noise, x = rng.integers(0, 8, n), rng.integers(0, 8, n), rng.normal(0, 1, n)
    tags = ["|".join(rng.choice(list("abcde"), rng.integers(1, 4), replace=False)) for _ in range(n)]
    logit = np.linspace(-2, 2, 8)[sig] + 0.3 * x
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    pacsv.write_csv(pa.table({"signal": [f"s{k}" for k in sig], "noise": [f"n{k}" for k in noise], "x": x,
                              "tags": tags, "click": click}), d / "train.csv")
    SCHEMA.save(d / "schema.yaml")
    return d


def _args(d, out, *extra):
    return ["--format", "csv", "--schema", str(d / "schema.yaml"), "--train", str(d / "train.csv"),
            "--valid-fraction", "0.2", "--epochs", "1", "--max-neurons", "8", "--max-layers", "2", "--threads", "1",
            "--out", str(out), *extra]


def test_tune_three_trials_writes_a_usable_preset(data, tmp_path):
    out = tmp_path / "tune"
    res = CliRunner().invoke(tune_command, _args(data, out, "--trials", "3", "--seed", "1"))
    assert res.exit_code == 0, res.output
    assert "best: trial" in res.output
    for name in ("best.yaml", "trials.csv", "history.png", "importance.png", "study.json", "study.db"):
        assert (out / name).exists(), name
    with open(out / "trials.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and all(r["state"] == "COMPLETE" for r in rows)
    assert {r["shape"] for r in rows} <= set(SHAPES) and all(0.1 <= float(r["dropout"]) <= 0.9 for r in rows)
    model_cfg, train_cfg = pipeline.resolve_config(str(out / "best.yaml"))
    study = json.loads((out / "study.json").read_text())
    best = study["best"]
    assert model_cfg.hidden == best["hidden"] and model_cfg.dropout == best["params"]["dropout"]
    assert model_cfg.embed_dim == best["params"]["embed_dim"] and train_cfg.lr == best["params"]["lr"]
    assert max(model_cfg.hidden) <= 8 * 2 and train_cfg.epochs == 1  # capped neurons; the base's epochs
    assert best["valid_auc"] == max(float(r["valid_auc"]) for r in rows)
    assert study["trials"]["complete"] == 3
    assert "lr" in study["param_importance"] or "error" in study["param_importance"]  # 3 trials may be too few
    for png in ("history.png", "importance.png"):
        with Image.open(out / png) as im:
            im.verify()

    # --resume continues the same study up to the new total; without it the folder is refused
    res = CliRunner().invoke(tune_command, _args(data, out, "--trials", "4", "--seed", "1", "--resume"))
    assert res.exit_code == 0, res.output
    assert len((out / "trials.csv").read_text().splitlines()) == 1 + 4
    res = CliRunner().invoke(tune_command, _args(data, out, "--trials", "4", "--seed", "1"))
    assert res.exit_code == 2 and "--resume" in res.output


def test_tune_needs_a_budget(data, tmp_path):
    res = CliRunner().invoke(tune_command, _args(data, tmp_path / "t"))
    assert res.exit_code == 2 and "budget" in res.output
