"""Training safety (issue 14 items 12-13, issue 20 items 4 and 6): a one-class validation set and a run that
diverges to NaN end cleanly (a warning and a fallback monitor; exit 2 naming the step, the last good
checkpoint kept); bad options, presets and config values are one `error:` line with exit 2; the epoch,
best-so-far and early-stopping lines reach the console and the bundle's checksummed train.log."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from deepfm import errors, pipeline
from deepfm.cli import main
from deepfm.errors import DeepFMError
from deepfm.serve.bundle import load
from deepfm.train import checkpoint as ck
from deepfm.train.trainer import TrainConfig, sigmoid

FAST = ["--set", "model.hidden=[16]", "--set", "model.batch_norm=false", "--batch-size", "512"]


def _train(args: list[str]):
    return CliRunner().invoke(main, ["train", "--format", "criteo", *args], catch_exceptions=True)


def _no_traceback(r) -> None:
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output


@pytest.fixture(scope="module")
def one_class_valid(synth_small, tmp_path_factory) -> Path:
    """synth_small's validation file with every label set to 0."""
    out = tmp_path_factory.mktemp("oneclass") / "valid0.tsv"
    lines = (synth_small / "valid.tsv").read_text().splitlines()
    out.write_text("".join("0" + line[line.index("\t"):] + "\n" for line in lines))
    return out


# ----------------------------------------------------------------------------------------- 14.12 one class
def test_one_class_validation_trains_and_saves_a_bundle_with_a_warning(synth_small, one_class_valid, tmp_path):
    out = tmp_path / "m"
    r = _train(["--train", str(synth_small / "train.tsv"), "--valid", str(one_class_valid), "--out", str(out),
                "--epochs", "2", "--quiet", *FAST])
    _no_traceback(r)
    assert r.exit_code == 0, r.output
    assert "validation AUC is undefined" in r.output and "monitors -logloss instead" in r.output
    assert "valid: AUC undefined (one class)" in r.output  # the summary line, not "AUC nan"
    b = load(out)  # verifies every checksum, train.log's included
    history = b.training["history"]
    assert [h["valid_monitor"] for h in history] == ["-logloss", "-logloss"]
    assert b.training["best_epoch"] in (1, 2)
    assert all(math.isfinite(h["valid_monitored"]) for h in history)
    log = (out / "train.log").read_text()
    assert "WARNING validation AUC is undefined" in log and "keeping epoch" in log


# ----------------------------------------------------------------------------------------- 14.12 NaN
def test_diverging_run_exits_2_naming_the_step_and_resume_does_not_crash(synth_small, tmp_path):
    out = tmp_path / "m"
    args = ["--train", str(synth_small / "train.tsv"), "--valid", str(synth_small / "valid.tsv"), "--out",
            str(out), "--epochs", "2", "--lr", "1e30", "--quiet", *FAST]
    for extra in ([], ["--resume"]):  # the resumed run diverges at the same step, with the same message
        r = _train(args + extra)
        _no_traceback(r)
        assert r.exit_code == 2, r.output
        line = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert len(line) == 1 and "training diverged at epoch 1, step" in line[0], r.output
        assert "lower learning rate" in line[0] and "no bundle was written" in line[0]
        assert not (out / "manifest.json").exists()
    assert "training diverged" in (tmp_path / "m.train.log").read_text()  # the run's log says why


BCE = torch.nn.BCEWithLogitsLoss


class NanAt:
    """A BCE loss that turns NaN at its n-th call (as a diverging run does)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls, self.real = n, 0, BCE()

    def __call__(self, logit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.real(logit, y)
        return loss * float("nan") if self.calls >= self.n else loss


def test_nan_loss_keeps_the_last_good_checkpoint(synth_small, tmp_path, monkeypatch):
    from deepfm.train.trainer import DivergedError

    prepared = pipeline.prepare(synth_small / "train.tsv", "criteo", None, synth_small / "valid.tsv", seed=3,
                                use_cache=False)
    model_cfg, train_cfg = pipeline.resolve_config("paper", [  # paper: one fit (no LR warm start)
        "model.hidden=[16]", "train.batch_size=256", "train.epochs=2", "train.checkpoint_every=4"])
    monkeypatch.setattr(torch.nn, "BCEWithLogitsLoss", lambda: NanAt(10))
    out = tmp_path / "m"
    with pytest.raises(DivergedError) as e:
        pipeline.train(prepared, model_cfg, train_cfg, out, "criteo", progress=False)
    assert (e.value.epoch, e.value.step) == (1, 10)
    assert "step-000000008" in str(e.value) and "the training loss is nan" in str(e.value)
    found = ck.Checkpointer(out / "checkpoints", "").list()
    assert found and found[-1].name == "step-000000008"  # nothing written at or after the NaN step
    with pytest.raises(DivergedError):  # resume: from step 8, and it diverges again (no IndexError)
        pipeline.train(prepared, model_cfg, train_cfg, out, "criteo", progress=False, resume=True)
    assert not (out / "manifest.json").exists()


def test_a_nan_weight_is_never_checkpointed(synth_small, tmp_path, monkeypatch):
    """A weight that turns NaN while the batch losses stay finite (a row no batch uses) is caught before the
    next checkpoint: the newest checkpoint is the last finite one."""
    from safetensors.torch import load_file

    from deepfm.train.trainer import DivergedError

    prepared = pipeline.prepare(synth_small / "train.tsv", "criteo", None, synth_small / "valid.tsv", seed=3,
                                use_cache=False)
    model_cfg, train_cfg = pipeline.resolve_config("paper", [
        "model.hidden=[16]", "train.batch_size=256", "train.epochs=2", "train.checkpoint_every=4"])
    real, calls = torch.optim.Adam.step, []

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 6:
            with torch.no_grad():
                self.param_groups[0]["params"][-1].view(-1)[-1] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    out = tmp_path / "m"
    with pytest.raises(DivergedError, match="NaN|nan"):
        pipeline.train(prepared, model_cfg, train_cfg, out, "criteo", progress=False)
    found = ck.Checkpointer(out / "checkpoints", "").list()
    assert [p.name for p in found][-1] == "step-000000004"
    state = load_file(str(found[-1] / "state.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in state.values() if t.dtype.is_floating_point)


# ----------------------------------------------------------------------------------------- 20.4 reporting
def test_epoch_lines_best_so_far_early_stop_and_train_log(synth_small, tmp_path):
    out = tmp_path / "m"
    # a learning rate too small to move the monitored value: no gain after epoch 1, early stop at epoch 2
    r = _train(["--train", str(synth_small / "train.tsv"), "--valid", str(synth_small / "valid.tsv"), "--out",
                str(out), "--epochs", "5", "--lr", "1e-12", "--preset", "paper", "--set", "train.monitor=auc-logloss",
                "--set", "train.patience=1", *FAST])
    assert r.exit_code == 0, r.output
    assert "epoch 1/5:" in r.output and "auc-logloss" in r.output and "(best so far)" in r.output
    assert "stopped: no gain for 1 validation; keeping epoch 1 (auc-logloss " in r.output, r.output
    b = load(out)
    assert "train.log" in b.manifest["files"]
    log = (out / "train.log").read_text()
    assert "epoch 1/5:" in log and "epoch 2/5:" in log and "stopped: no gain for 1 validation" in log
    (out / "train.log").write_text(log + "tampered\n")
    with pytest.raises(errors.BundleError, match="train.log"):
        load(out)


def test_train_help_names_the_default_monitor():
    r = CliRunner().invoke(main, ["train", "--help"])
    text = " ".join(r.output.split())
    assert "early stopping on validation AUC)" not in text
    assert "AUC - logloss" in text


# ----------------------------------------------------------------------------------------- 14.13 options
def _preset(tmp: Path, name: str, text: str) -> str:
    p = tmp / name
    p.write_text(text)
    return str(p)


BAD_TRAIN_OPTIONS = {  # case: (arguments, what the error line must name)
    "lr-nan": (["--lr", "nan"], "--lr"), "lr-negative": (["--lr", "-0.1"], "--lr"), "lr-inf": (["--lr", "inf"], "--lr"),
    "batch-size-0": (["--batch-size", "0"], "--batch-size"), "batch-size-text": (["--batch-size", "x"], "--batch-size"),
    "threads-negative": (["--threads", "-1"], "--threads"), "epochs-negative": (["--epochs", "-3"], "--epochs"),
    "epochs-0": (["--epochs", "0"], "--epochs"), "seed-negative": (["--seed", "-1"], "--seed"),
    "min-count-0": (["--min-count", "0"], "--min-count"),
    "set-broken-yaml": (["--set", "model.hidden=[1,2"], "invalid YAML"),
    "set-banana": (["--set", "model.hidden=banana"], "model.hidden"),
    "set-embed-dim-0": (["--set", "model.embed_dim=0"], "model.embed_dim"),
    "set-lr-nan": (["--set", "train.lr=.nan"], "train.lr"),
    "set-epochs-0": (["--set", "train.epochs=0"], "train.epochs"),
    "set-patience-text": (["--set", "train.patience=two"], "train.patience"),
    "set-dropout-1": (["--set", "model.dropout=1.0"], "model.dropout"),
    "set-bool-epochs": (["--set", "train.epochs=true"], "train.epochs"),
    "preset-broken-yaml": (["--preset", "@broken.yaml"], "invalid YAML at line 2"),
    "preset-section-list": (["--preset", "@list.yaml"], "'model' must be a mapping"),
    "preset-alias": (["--preset", "@alias.yaml"], "aliases"),
    "preset-missing": (["--preset", "@missing.yaml"], "not found"),
    "preset-bad-value": (["--preset", "@value.yaml"], "train.batch_size"),
}
PRESETS = {"broken.yaml": "train: [1\n", "list.yaml": "model: [1, 2]\n",
           "alias.yaml": "model:\n  hidden: &a [1]\ntrain: {}\nx: *a\n",
           "value.yaml": "train:\n  batch_size: -5\n"}


@pytest.mark.parametrize("args, names", list(BAD_TRAIN_OPTIONS.values()), ids=list(BAD_TRAIN_OPTIONS))
def test_bad_train_option_is_one_error_line(args, names, tmp_path):
    for name, text in PRESETS.items():
        _preset(tmp_path, name, text)
    args = [str(tmp_path / a[1:]) if a.startswith("@") else a for a in args]
    data = tmp_path / "train.tsv"
    data.write_text("1\t1\n")  # never read: every case is refused before the data
    r = _train(["--train", str(data), "--out", str(tmp_path / "m"), "--quiet", *args])
    _no_traceback(r)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], r.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("args", [["--block-mb", "100000"], ["--block-mb", "nan"], ["--block-mb", "0"],
                                  ["--threads", "-1"]], ids=["block-mb-huge", "block-mb-nan", "block-mb-0",
                                                             "threads-negative"])
def test_bad_predict_option_is_one_error_line(args, tmp_path):
    data = tmp_path / "x.tsv"
    data.write_text("1\t1\n")
    r = CliRunner().invoke(main, ["predict", str(tmp_path), str(data), "--out", str(tmp_path / "p.csv"), *args])
    _no_traceback(r)
    assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, \
        r.output
    assert args[0] in r.output  # refused for the option, before the bundle is even opened


@pytest.mark.parametrize("overrides, direct", [
    (["model.embed_dim=0"], {}), (["model.hidden=[0]"], {}), (["train.lr=-1"], {}), ([], {"epochs": 0}),
    ([], {"lr": float("nan")}), ([], {"batch_size": 0}), ([], {"threads": -2}), (["train.eval_batch_size=0"], {}),
])
def test_api_config_values_are_validated(overrides, direct):
    with pytest.raises(DeepFMError, match="invalid configuration"):
        pipeline.resolve_config("default", overrides, **direct)


def test_float_strings_from_yaml_are_taken_as_floats():
    _, train_cfg = pipeline.resolve_config("default", ["train.lr=1e-4"])  # YAML 1.1 reads 1e-4 as a string
    assert train_cfg.lr == 1e-4 and isinstance(train_cfg.lr, float)
    with pytest.raises(ValueError, match="train.epochs must be an integer >= 1"):
        TrainConfig.from_dict({"epochs": -3})


def _error_classes() -> list[type]:
    return [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, DeepFMError)]


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_every_library_error_is_one_line_exit_2(cls):
    """Even from a command that does not wrap its body itself (the group maps it)."""

    @click.command("raise-it")
    def raise_it() -> None:
        raise cls("the message")

    main.add_command(raise_it)
    try:
        r = CliRunner().invoke(main, ["raise-it"])
    finally:
        main.commands.pop("raise-it")
    assert r.exit_code == 2 and r.output == "error: the message\n", r.output


def test_sigmoid_of_very_negative_logits_is_0_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sigmoid(np.array([-1e4, 0.0, 1e4], dtype=np.float32)).tolist() == [0.0, 0.5, 1.0]


def test_history_record_is_json_with_the_monitor(synth_small, tmp_path):
    """The history names what was monitored (one-class fallback or the configured monitor)."""
    prepared = pipeline.prepare(synth_small / "train.tsv", "criteo", None, synth_small / "valid.tsv", seed=3,
                                use_cache=False)
    model_cfg, train_cfg = pipeline.resolve_config("paper", ["model.hidden=[16]", "train.batch_size=512",
                                                             "train.epochs=1", "train.monitor=auc-logloss"])
    _, result = pipeline.train(prepared, model_cfg, train_cfg, progress=False)
    rec = result["training"]["history"][0]
    assert rec["valid_monitor"] == "auc-logloss" and rec["best_epoch"] == 1
    assert rec["valid_monitored"] == pytest.approx(rec["valid_auc"] - rec["valid_logloss"])
    json.dumps(rec)
