"""The evaluation data sets: the real samples in ../shared/data (never committed) and the synthetic set.

Each entry is (name, format, train, valid or None, test). Sets that ship as one file are split here
with a fixed seed (deepfm.data.split); when there is no valid file, training holds out a seeded 10%.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from deepfm import pipeline
from deepfm.data.split import split_lines

SHARED = Path(os.environ.get("DEEPFM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SPLIT_SEED = 2017


def datasets(work: Path, synth_rows: int = 200_000, only: list[str] | None = None) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    out = []

    def want(name: str) -> bool:
        return only is None or name in only

    d = SHARED / "criteo_kaggle_head10k"
    if d.exists() and want("criteo"):
        out.append(dict(name="criteo", fmt="criteo", train=d / "train", valid=None, test=d / "test",
                        note="Criteo Kaggle head 10k: rows 1-8000 train, 8001-10000 test (time order)"))
    d = SHARED / "avazu_head10k"
    if d.exists() and want("avazu"):
        out.append(dict(name="avazu", fmt="avazu", train=d / "train", valid=None, test=d / "test",
                        note="Avazu head 10k: 8,999 train, next 1,000 test"))
    d = SHARED / "frappe_nfm"
    if d.exists() and want("frappe"):
        parts = split_lines(d / "frappe.validation.libfm", work / "frappe", {"train": 0.8, "test": 0.2},
                            seed=SPLIT_SEED, suffix=".libfm")
        out.append(dict(name="frappe", fmt="libfm", train=parts["train"], valid=None, test=parts["test"],
                        note="Frappe (NFM) validation file split 80/20 (seed 2017)"))
    d = SHARED / "ipinyou_2997_fnn_sample"
    if d.exists() and want("ipinyou"):
        out.append(dict(name="ipinyou", fmt="libfm", train=d / "train.fm.txt", valid=None,
                        test=d / "test.fm.txt", note="iPinYou 2997 (FNN sample): 26,773 train, 21,150 test "
                                                    "(50 test clicks: AUC noise about +-0.04)"))
    d = SHARED / "movielens_100k"
    if d.exists() and want("movielens"):
        parts = split_lines(d / "ml-100k.inter", work / "movielens", {"train": 0.8, "test": 0.2},
                            seed=SPLIT_SEED, header=True)
        out.append(dict(name="movielens", fmt="movielens", train=parts["train"], valid=None,
                        test=parts["test"], note="MovieLens 100K (RecBole files), ratings split 80/20 "
                                                 "(seed 2017), rating 3 dropped"))
    if want("synth"):
        from deepfm.synth import generate

        s = work / f"synth{synth_rows}"
        if not (s / "oracle.json").exists() or json.loads((s / "oracle.json").read_text())["rows"] != synth_rows:
            generate(s, rows=synth_rows, seed=0)
        oracle = json.loads((s / "oracle.json").read_text())["splits"]["test"]
        out.append(dict(name="synth", fmt="criteo", train=s / "train.tsv", valid=s / "valid.tsv",
                        test=s / "test.tsv", oracle=oracle,
                        note=f"`deepfm synth --rows {synth_rows} --seed 0` (80/10/10)"))
    return out


def train_eval(ds: dict, preset: str, overrides: list[str], seed: int) -> dict:
    """Train on ds (seeded), return the test metrics plus the number of epochs run."""
    model_cfg, train_cfg = pipeline.resolve_config(preset, overrides, seed=seed)
    prep = pipeline.prepare(ds["train"], ds["fmt"], None, ds["valid"], seed=seed)
    test = pipeline.encode_file(ds["test"], ds["fmt"], prep.pre)
    _, res = pipeline.train(prep, model_cfg, train_cfg, test=test, progress=False)
    return res["metrics"]["test"] | {"epochs": len(res["training"]["history"])}
