"""Tests for the synthetic Criteo-format generator (deepfm.synth)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from deepfm.synth import generate

SPLITS = ("train", "valid", "test")
HEX8 = re.compile(r"^[0-9a-f]{8}$")


def _rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def gen20k(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth20k")
    return out, generate(out, rows=20_000, seed=3)


def test_same_seed_is_byte_identical(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", rows=3_000, seed=7, vocab_scale=0.01)
    b = generate(tmp_path / "b", rows=3_000, seed=7, vocab_scale=0.01)
    assert a == b
    for name in [f"{s}.tsv" for s in SPLITS] + ["oracle.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_different_seed_differs(tmp_path: Path) -> None:
    generate(tmp_path / "a", rows=3_000, seed=1, vocab_scale=0.01)
    generate(tmp_path / "b", rows=3_000, seed=2, vocab_scale=0.01)
    for name in [f"{s}.tsv" for s in SPLITS]:
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "b" / name).read_bytes(), name


def test_files_are_criteo_format(gen20k: tuple[Path, dict]) -> None:
    out, _ = gen20k
    expected = {"train": 16_000, "valid": 2_000, "test": 2_000}
    empty_int = empty_cat = negative_i2 = 0
    for split, n in expected.items():
        rows = _rows(out / f"{split}.tsv")
        assert len(rows) == n
        for r in rows:
            assert len(r) == 40
            assert r[0] in ("0", "1")
            for v in r[1:14]:
                if v == "":
                    empty_int += 1
                else:
                    int(v)  # parses as an integer
            for v in r[14:]:
                if v == "":
                    empty_cat += 1
                else:
                    assert HEX8.match(v), v
            negative_i2 += r[2].startswith("-")
    assert empty_int > 0 and empty_cat > 0  # missing values are empty fields
    assert negative_i2 > 0  # Criteo-like -1/-2 in I2
    assert not list(out.glob(".*tmp*"))  # atomic writes left no temp files


def test_no_header_and_both_labels(gen20k: tuple[Path, dict]) -> None:
    out, _ = gen20k
    first = (out / "train.tsv").read_text().split("\n", 1)[0].split("\t")
    assert first[0] in ("0", "1") and "label" not in first and "I1" not in first
    labels = {r[0] for r in _rows(out / "test.tsv")}
    assert labels == {"0", "1"}


def test_oracle_json(gen20k: tuple[Path, dict]) -> None:
    out, result = gen20k
    oracle = json.loads((out / "oracle.json").read_text())
    assert oracle == result
    assert oracle["seed"] == 3 and oracle["rows"] == 20_000
    assert isinstance(oracle["generator"], dict) and oracle["generator"]["cardinalities"]
    assert sum(oracle["splits"][s]["rows"] for s in SPLITS) == 20_000
    for split in SPLITS:
        info = oracle["splits"][split]
        assert set(info) >= {"rows", "ctr", "oracle_auc", "oracle_logloss"}
        assert 0.15 <= info["ctr"] <= 0.35
        assert 0.7 <= info["oracle_auc"] <= 0.9
        assert 0.2 <= info["oracle_logloss"] <= 0.6
    # the oracle CTR matches the labels written to the file
    labels = [int(r[0]) for r in _rows(out / "train.tsv")]
    assert sum(labels) / len(labels) == pytest.approx(oracle["splits"]["train"]["ctr"])


def test_split_fractions(tmp_path: Path) -> None:
    res = generate(tmp_path, rows=1_000, seed=0, valid_fraction=0.2, test_fraction=0.05, vocab_scale=0.01)
    assert [res["splits"][s]["rows"] for s in SPLITS] == [750, 200, 50]


@pytest.mark.parametrize("kwargs", [{"rows": 0}, {"valid_fraction": 0.6, "test_fraction": 0.5},
                                    {"test_fraction": -0.1}, {"vocab_scale": 0.0}])
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path, **kwargs)


def test_tail_adds_one_off_ids_only_in_large_fields(tmp_path: Path) -> None:
    base = generate(tmp_path / "a", rows=4_000, seed=2, test_fraction=0.0, valid_fraction=0.0)
    tail = generate(tmp_path / "b", rows=4_000, seed=2, test_fraction=0.0, valid_fraction=0.0, tail=0.5)
    assert base["generator"]["tail"] == 0.0 and tail["generator"]["tail"] == 0.5
    a, b = _rows(tmp_path / "a" / "train.tsv"), _rows(tmp_path / "b" / "train.tsv")
    for f in range(26):
        col_a, col_b = [r[14 + f] for r in a], [r[14 + f] for r in b]
        changed = sum(x != y for x, y in zip(col_a, col_b, strict=True))
        large = base["generator"]["cardinalities"][f] >= 10_000
        assert (changed > 1_000) == large, f
        if large:  # the replaced values are one-offs
            new = [y for x, y in zip(col_a, col_b, strict=True) if x != y]
            assert len(set(new)) == len(new) and not set(new) & set(col_a)
