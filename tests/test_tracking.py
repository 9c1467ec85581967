"""TensorBoard/MLflow tracking callbacks, through fake modules so the packages need not be installed."""
from __future__ import annotations

import sys
import types

import pytest
from click.testing import CliRunner

from deepfm.cli import main


class FakeWriter:
    instances: list = []

    def __init__(self, log_dir=None, **kw) -> None:
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, step=None) -> None:
        self.scalars.append((tag, float(value), step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _fake_mlflow(calls: list) -> types.ModuleType:
    m = types.ModuleType("mlflow")
    state = {"run": None}
    m.set_tracking_uri = lambda uri: calls.append(("uri", uri))
    m.set_experiment = lambda name: calls.append(("experiment", name))
    m.active_run = lambda: state["run"]
    m.start_run = lambda run_name=None, **kw: (state.update(run=object()), calls.append(("start", run_name)))
    m.end_run = lambda status="FINISHED": (calls.append(("end", status)), state.update(run=None))
    m.log_params = lambda params: calls.append(("params", dict(params)))
    m.log_metrics = lambda metrics, step=None: calls.append(("metrics", dict(metrics), step))
    m.set_tag = lambda k, v: calls.append(("tag", k, v))
    return m


def _train(data, out, *extra) -> object:
    return CliRunner().invoke(main, ["train", "--format", "criteo", "--train", str(data / "train.tsv"),
                                     "--valid-fraction", "0.2", "--out", str(out), "--epochs", "2", "--quiet",
                                     "--no-cache", *extra])


def test_tensorboard_and_mlflow_receive_losses_and_metrics(synth_small, tmp_path, monkeypatch) -> None:
    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    calls: list = []
    monkeypatch.setitem(sys.modules, "mlflow", _fake_mlflow(calls))
    FakeWriter.instances.clear()
    r = _train(synth_small, tmp_path / "m", "--tensorboard", str(tmp_path / "tb"), "--tensorboard-every", "2",
               "--mlflow")
    assert r.exit_code == 0, r.output
    (w,) = FakeWriter.instances
    tags = {t for t, _, _ in w.scalars}
    assert w.closed and {"train/loss", "valid/auc", "valid/logloss"} <= tags
    steps = [s for t, _, s in w.scalars if t == "train/loss"]
    assert steps == sorted(steps) and len(steps) >= 2
    aucs = [v for t, v, _ in w.scalars if t == "valid/auc"]
    assert all(0.5 < a <= 1.0 for a in aucs)
    kinds = [c[0] for c in calls]
    assert kinds[0] in ("uri", "experiment", "start") and ("end", "FINISHED") in calls
    params = next(c[1] for c in calls if c[0] == "params")
    assert params  # the resolved configuration
    assert any(c[0] == "metrics" and any(k.startswith("valid_") for k in c[1]) for c in calls)
    assert any(c[0] == "tag" and c[1] == "deepfm.bundle" and c[2].endswith("m") for c in calls)


def test_missing_tensorboard_is_a_one_line_error(synth_small, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    r = _train(synth_small, tmp_path / "m", "--tensorboard", str(tmp_path / "tb"))
    assert r.exit_code != 0 and "pip install tensorboard" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "m").exists()


def test_real_summary_writer_writes_an_event_file(synth_small, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    r = _train(synth_small, tmp_path / "m", "--tensorboard", str(tmp_path / "tb"))
    assert r.exit_code == 0, r.output
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
