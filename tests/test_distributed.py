"""Data-parallel training over real processes (torchrun, gloo on this CPU): 2 processes end with the same
validation AUC as 1 process and write one valid bundle; a rank that fails takes the job down."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepfm.serve.predictor import Predictor

ARGS = ["--epochs", "2", "--batch-size", "256", "--set", "model.hidden=[32]", "--set", "model.dropout=0",
        "--set", "model.batch_norm=false", "--quiet", "--seed", "5"]


def train(synth_small: Path, out: Path, nproc: int, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deepfm", "train", "--format", "criteo", "--train", str(synth_small / "train.tsv"),
           "--valid", str(synth_small / "valid.tsv"), "--out", str(out), "--nproc", str(nproc), *ARGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_processes_match_one(synth_small, tmp_path):
    one = train(synth_small, tmp_path / "one", 1, "--no-cache")
    two = train(synth_small, tmp_path / "two", 2, "--no-cache")
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    auc1 = json.loads((tmp_path / "one" / "metrics.json").read_text())["valid"]["auc"]
    auc2 = json.loads((tmp_path / "two" / "metrics.json").read_text())["valid"]["auc"]
    assert abs(auc1 - auc2) <= 0.002, (auc1, auc2)
    assert two.stdout.count("bundle written") == 1  # rank 0 alone writes and reports
    p = Predictor(tmp_path / "two").predict_file(synth_small / "test.tsv").probabilities
    assert p.shape == (600,) and np.isfinite(p).all()


@pytest.mark.slow
def test_streaming_sparse_ranks_own_disjoint_shards_and_a_lost_shard_stops_the_job(synth_small, tmp_path):
    cache = tmp_path / "cache"
    extra = ["--streaming", "--shard-rows", "600", "--embedding-update", "sparse", "--cache-dir", str(cache)]
    ok = train(synth_small, tmp_path / "s", 2, *extra)
    assert ok.returncode == 0, ok.stderr[-2000:]
    auc = json.loads((tmp_path / "s" / "metrics.json").read_text())["valid"]["auc"]
    assert auc > 0.6
    # a shard that rank 1 owns disappears: it fails naming the shard, and the whole job exits (no hang)
    shard = next(cache.glob("*/data/train/shard-00001"))
    shutil.rmtree(shard)
    bad = train(synth_small, tmp_path / "bad", 2, *extra, timeout=240)
    assert bad.returncode != 0
    assert "shard-00001" in bad.stderr
    assert not (tmp_path / "bad" / "manifest.json").exists()
