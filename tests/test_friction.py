"""A new user's small surprises (issue 20.6): text labels, the wrong delimiter, ..."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from deepfm import schema as schema_mod
from deepfm.cli import main
from deepfm.data import readers
from deepfm.errors import DataError, SchemaError
from tests.conftest import write


def _csv(tmp_path, label=("yes", "no"), delim=",", n=400):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    rows = [delim.join(["click", "site", "price"])]
    for _ in range(n):
        site = "abcd"[rng.integers(4)]
        lab = label[0] if (site in "ab") ^ (rng.random() < 0.2) else label[1]
        rows.append(delim.join([lab, site, f"{rng.random() * 10:.3f}"]))
    return write(tmp_path / "d.csv", "\n".join(rows) + "\n")


SCHEMA = "label: click\nfields:\n  - {name: site}\n  - {name: price, kind: numeric}\n"


def test_text_labels_suggest_a_label_map_not_skipping(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = _csv(tmp_path)
    s = schema_mod.load(write(tmp_path / "s.yaml", SCHEMA))
    with pytest.raises(DataError) as e:
        readers.read(data, "csv", schema=s)
    msg = str(e.value)
    assert "line 2" in msg and "'click'" in msg and "label_map" in msg and "--on-bad-rows skip" not in msg


def test_label_map_reads_text_labels_even_unquoted_yaml_booleans(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = _csv(tmp_path)
    s = schema_mod.load(write(tmp_path / "s.yaml", SCHEMA + "label_map: {yes: 1, no: 0}\n"))
    r = readers.read(data, "csv", schema=s)
    raw = [line.split(",")[0] for line in data.read_text().splitlines()[1:]]
    assert np.array_equal(r.label, (np.asarray(raw) == "yes").astype(np.float32))
    assert schema_mod.from_dict(s.to_dict()).label_map == s.label_map  # survives preprocessor.json
    out = tmp_path / "m"
    res = CliRunner().invoke(main, ["train", "--format", "csv", "--schema", str(tmp_path / "s.yaml"), "--train",
                                    str(data), "--out", str(out), "--epochs", "1", "--quiet"])
    assert res.exit_code == 0, res.output


def test_a_label_outside_the_map_names_its_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = _csv(tmp_path, label=("yes", "maybe"))
    s = schema_mod.load(write(tmp_path / "s.yaml", SCHEMA + "label_map: {'yes': 1, 'no': 0}\n"))
    with pytest.raises(DataError, match=r"line \d+, field 'click': label 'maybe' is not in the schema's label_map"):
        readers.read(data, "csv", schema=s)


@pytest.mark.parametrize("bad", ["label_map: [yes]", "label_map: {yes: 2}", "label_map: {yes: 1}"])
def test_bad_label_maps_are_schema_errors(tmp_path, bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SchemaError, match="label_map"):
        schema_mod.load(write(tmp_path / "s.yaml", SCHEMA + bad + "\n"))


def test_wrong_delimiter_says_the_file_has_one_column(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = _csv(tmp_path, label=("1", "0"))
    s = schema_mod.load(write(tmp_path / "s.yaml", SCHEMA))
    with pytest.raises(DataError, match="the file has one column .*delimiter") as e:
        readers.read(data, "tsv", schema=s)
    assert "--format csv" in str(e.value)


def test_compare_report_small_items() -> None:
    from deepfm.compare import result_cells
    from deepfm.models.ctr import ModelConfig
    from deepfm.report import _epochs_cell, _model_options

    one = {"runs": 1, "relaimpr": None, "auc_mean": 0.7, "auc_std": 0.0, "logloss_mean": 0.5, "logloss_std": 0.0}
    assert "±" not in "".join(result_cells(one)) and "(1 seed)" in result_cells(one)[0]
    assert "± 0.0100" in result_cells({**one, "runs": 3, "auc_std": 0.01})[0]
    lr, fm = _model_options(ModelConfig(model="lr").to_dict()), _model_options(ModelConfig(model="fm").to_dict())
    assert "hidden" not in lr and "dropout" not in lr and "embed_dim" not in lr
    assert "hidden" not in fm and "embed_dim" in fm
    assert "hidden" in _model_options(ModelConfig(model="deepfm").to_dict())
    assert "still improving" in _epochs_cell({"best_epoch": 5, "epochs": 5}, 5)
    assert "still improving" not in _epochs_cell({"best_epoch": 3, "epochs": 5}, 5)
    assert "still improving" not in _epochs_cell({"best_epoch": 3, "epochs": 3}, 20)  # stopped early at 3


def test_api_bundles_and_api_errors_speak_api(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pandas as pd

    from deepfm.estimator import DeepFMClassifier

    rng = np.random.default_rng(0)
    X = pd.DataFrame({"site": rng.choice(list("abcd"), 300), "price": rng.random(300)})
    y = (X.site.isin(["a", "b"]) ^ (rng.random(300) < 0.2)).astype(int)
    clf = DeepFMClassifier(epochs=1).fit(X, y)
    with pytest.raises(DataError) as e:
        clf.predict_proba(X[["site"]])
    assert "--format" not in str(e.value) and "fitted on" in str(e.value)
    res = CliRunner().invoke(main, ["info", str(clf.save(tmp_path / "m"))])
    assert res.exit_code == 0 and "data format None" not in res.output and "Python API" in res.output


def test_predict_bar_has_a_total_and_no_empty_bar_before_an_error(tmp_path, synth_small) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "m"
    res = CliRunner().invoke(main, ["train", "--format", "criteo", "--train", str(synth_small / "train.tsv"),
                                    "--out", str(out), "--epochs", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    bad = write(tmp_path / "bad.tsv", "zz\tq\n")
    res = CliRunner().invoke(main, ["predict", str(out), str(bad), "--out", str(tmp_path / "s.csv")])
    assert res.exit_code == 2 and "scoring" not in res.output, res.output
    res = CliRunner().invoke(main, ["predict", str(out), str(synth_small / "test.tsv"), "--out",
                                    str(tmp_path / "s.csv"), "--block-mb", "0.05"])
    assert res.exit_code == 0, res.output
    assert "100%" in res.output and "B/s" in res.output and "rows]" in res.output  # a total, an ETA, rows
