"""Checkpoints and resume: a run interrupted at any checkpoint and resumed ends bit-identical to an
uninterrupted one; damaged checkpoints are skipped; another run's checkpoints are refused; disk-full is a
clear error; the SIGKILL test (scripts/kill_test.py) runs in the slow suite."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from deepfm import pipeline
from deepfm.cli import main
from deepfm.errors import DeepFMError
from deepfm.train import checkpoint as ck

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["model.hidden=[32,32]", "model.dropout=0.3", "train.batch_size=256", "train.epochs=3",
             "train.checkpoint_every=7", "train.seed=11", "train.patience=5"]


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def prepared(synth_small):
    return pipeline.prepare(synth_small / "train.tsv", "criteo", None, synth_small / "valid.tsv", seed=11,
                            use_cache=False)


def _train(prepared, out: Path, resume: bool = False, extra: list[str] | None = None):
    model_cfg, train_cfg = pipeline.resolve_config("default", OVERRIDES + (extra or []))
    return pipeline.train(prepared, model_cfg, train_cfg, out, "criteo", progress=False, resume=resume)


def _same_bundle(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())


def _crash_after(monkeypatch, n: int) -> list[Path]:
    """Make the n-th checkpoint save the last thing the run does (as if killed right after it)."""
    saved: list[Path] = []
    real = ck.Checkpointer.save

    def save(self, *args, **kwargs):
        saved.append(real(self, *args, **kwargs))
        if len(saved) == n:
            raise Crash()
        return saved[-1]

    monkeypatch.setattr(ck.Checkpointer, "save", save)
    return saved


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "bundle"
    _train(prepared, out)
    assert not (out / "checkpoints").exists()  # removed once the bundle is complete
    return out


@pytest.mark.parametrize("crash_at", [2, 4, 9])  # mid-epoch 1, the end of epoch 1 (step 18+), epoch 3
def test_resumed_run_is_bit_identical(prepared, reference, tmp_path, monkeypatch, crash_at):
    out = tmp_path / "bundle"
    saved = _crash_after(monkeypatch, crash_at)
    with pytest.raises(Crash):
        _train(prepared, out)
    assert not (out / "manifest.json").exists() and len(list((out / "checkpoints").iterdir())) == 2  # keep 2
    monkeypatch.undo()
    _train(prepared, out, resume=True)
    _same_bundle(reference, out)
    assert saved  # the crash really happened after a checkpoint


def test_damaged_newest_checkpoint_falls_back(prepared, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bundle"
    saved = _crash_after(monkeypatch, 5)
    with pytest.raises(Crash):
        _train(prepared, out)
    monkeypatch.undo()
    with open(saved[-1] / "state.safetensors", "r+b") as fh:  # flip bytes in the newest checkpoint
        fh.seek(200)
        fh.write(b"\xff\xff\xff\xff")
    (out / "checkpoints" / ".tmp-half-written").mkdir()  # a kill during a write leaves this: ignored
    _train(prepared, out, resume=True)
    assert "skipping damaged checkpoint" in capsys.readouterr().err
    _same_bundle(reference, out)


def test_checkpoint_of_another_run_is_refused(prepared, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    _crash_after(monkeypatch, 2)
    with pytest.raises(Crash):
        _train(prepared, out)
    monkeypatch.undo()
    with pytest.raises(DeepFMError, match="another configuration or other data"):
        _train(prepared, out, resume=True, extra=["train.lr=0.01"])
    # threads and epochs may change between attempts: that is the same run
    _train(prepared, out, resume=True, extra=["train.threads=1"])


def test_resume_without_checkpoint_starts_over_and_needs_out(prepared, reference, tmp_path, capsys):
    _train(prepared, tmp_path / "bundle", resume=True)
    assert "starting from the beginning" in capsys.readouterr().err
    _same_bundle(reference, tmp_path / "bundle")
    model_cfg, train_cfg = pipeline.resolve_config("default", OVERRIDES)
    with pytest.raises(DeepFMError, match="--out"):
        pipeline.train(prepared, model_cfg, train_cfg, None, resume=True, progress=False)


def test_disk_full_is_a_clear_error(prepared, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(DeepFMError, match="disk full while writing a checkpoint") as e:
        _train(prepared, tmp_path / "bundle")
    assert "--resume" in str(e.value)
    leftovers = list((tmp_path / "bundle" / "checkpoints").iterdir())
    assert leftovers == []  # no half-written checkpoint folder


def test_cli_resume_flag(synth_small, tmp_path):
    args = ["train", "--format", "criteo", "--train", str(synth_small / "train.tsv"), "--valid",
            str(synth_small / "valid.tsv"), "--out", str(tmp_path / "m"), "--epochs", "1", "--batch-size", "512",
            "--set", "model.hidden=[16]", "--checkpoint-every", "3", "--quiet", "--resume"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "manifest.json").exists()


@pytest.mark.slow
def test_sigkill_five_times_then_identical(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "kill_test.py"), "--work", str(tmp_path),
                        "--rows", "12000", "--kills", "5", "--epochs", "3"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "kills survived: 5; weights bit-identical: True" in r.stdout
