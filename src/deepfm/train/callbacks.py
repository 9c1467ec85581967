"""Trainer callbacks: code that runs at fixed points of ``Trainer.fit`` without being part of the loop
(checkpointing: ``train.checkpoint.CheckpointCallback``; a per-epoch hook: ``OnEpoch``; experiment tracking:
``TensorBoardLogger``, ``MLflowLogger``, each needing its optional package, ``pip install deepfm[tracking]``)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepfm.errors import DeepFMError

if TYPE_CHECKING:
    from deepfm.train.trainer import Trainer


class Callback:
    """Hooks, each a no-op here. ``every``: the steps between save points this callback wants (0: epoch ends
    only); the loader thread stops at each, so nothing is drawn ahead of a saved state. ``log_every``: the
    steps between ``on_step`` calls (0: never; the loop then pays nothing for it)."""

    every: int = 0
    log_every: int = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step (after every component is built): e.g. load a checkpoint."""

    def on_step(self, trainer: Trainer, loss: float) -> None:
        """Every ``log_every`` global steps, with that step's training loss; rank 0 only."""

    def on_validation(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After each validation (early stopping updated): ``metrics`` as ``train.metrics.evaluate`` returns
        them plus ``monitor`` and ``monitored``; rank 0 only."""

    def on_save_point(self, trainer: Trainer) -> None:
        """The state is complete and its weights finite (every ``every`` steps and at each epoch end); every
        rank calls it (``trainer.lead``: rank 0)."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """An epoch ended with ``record`` (its history entry); rank 0 only."""

    def on_run_end(self, metrics: dict[str, dict[str, Any]], bundle: Path | None) -> None:
        """``pipeline.train`` finished: the final metrics per part ("valid", "test") and the bundle written
        (None: no bundle)."""

    def close(self, failed: bool) -> None:
        """The run is over, however it ended (``failed``: by an exception); release what the callback holds."""


class OnEpoch(Callback):
    """Calls ``fn(record)`` at each epoch end."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.fn = fn

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.fn(record)


@contextlib.contextmanager
def closing(callbacks: Sequence[Callback]) -> Iterator[None]:
    """Close ``callbacks`` when the block ends (``failed`` when it raised, KeyboardInterrupt included)."""
    failed = True
    try:
        yield
        failed = False
    finally:
        for cb in callbacks:
            cb.close(failed)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics dict (AUC undefined on one class is NaN: left out, not logged as 0)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _missing(package: str, what: str) -> DeepFMError:
    return DeepFMError(f"{what} needs the '{package}' package, which is not installed: pip install {package} "
                       "(or pip install 'deepfm[tracking]')")


class TensorBoardLogger(Callback):
    """Scalars for TensorBoard (``torch.utils.tensorboard.SummaryWriter``) in ``log_dir``, at the global step:
    ``train/loss`` (that step's batch loss) and ``train/loss_mean`` (the epoch's running mean) every
    ``log_every`` steps; ``valid/<metric>`` (auc, logloss, monitored, ...) and ``train/lr`` at each validation;
    ``train/epoch_logloss`` and ``train/rows_per_s`` at epoch ends; ``test/<metric>`` at the end."""

    def __init__(self, log_dir: str | Path, log_every: int = 50) -> None:
        if log_every < 1:
            raise DeepFMError(f"the TensorBoard logging interval must be >= 1 step, got {log_every}")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises it when the tensorboard package is absent
            raise _missing("tensorboard", "--tensorboard (TensorBoard logging)") from None
        self._writer_class = SummaryWriter
        self.log_dir, self.log_every = Path(log_dir), log_every
        if self.log_dir.exists() and not self.log_dir.is_dir():
            raise DeepFMError(f"--tensorboard {self.log_dir}: a file, not a folder (give a folder for the event files)")
        self.writer: Any = None
        self.step = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.lead and self.writer is None:
            self.writer = self._writer_class(log_dir=str(self.log_dir))

    def _add(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def on_step(self, trainer: Trainer, loss: float) -> None:
        pos = trainer.position
        self.step = pos.global_step
        values = {"loss": loss, "loss_mean": pos.loss_sum / pos.seen} if pos.seen else {"loss": loss}
        self._add("train", _scalars(values), self.step)

    def on_validation(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.step = trainer.position.global_step
        self._add("valid", _scalars(metrics), self.step)
        self._add("train", {"lr": float(trainer.updater.lr)}, self.step)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.step = trainer.position.global_step
        self._add("train", _scalars({"epoch_logloss": record["train_logloss"],
                                     "rows_per_s": record["train_rows_per_s"]}), self.step)

    def on_run_end(self, metrics: dict[str, dict[str, Any]], bundle: Path | None) -> None:
        if "test" in metrics:
            self._add("test", _scalars(metrics["test"]), self.step)

    def close(self, failed: bool) -> None:
        if self.writer is not None:
            self.writer.close()  # flushes the event file
            self.writer = None


# MLflow: parameter values are strings of at most 6000 characters (500 in MLflow < 2.x servers); a config
# value is short, a list (the hidden layers) a few dozen characters
_MLFLOW_PARAM_CHARS = 500


class MLflowLogger(Callback):
    """Logs a run to MLflow (the tracking URI from MLFLOW_TRACKING_URI or ``tracking_uri``; ``experiment``
    by name): the resolved configuration as params (``model.*``, ``train.*``, with the batch size and
    precision that "auto" resolved to), ``valid_*`` metrics at each validation (step = global step), the
    final ``valid_*``/``test_*`` metrics at the end and the bundle folder as the tag ``deepfm.bundle``. Inside
    an active run (``mlflow.start_run()`` in the caller) it logs there and leaves the run open; otherwise it
    starts a run and ends it (FAILED when training raised)."""

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None,
                 run_name: str | None = None, extra_params: dict[str, Any] | None = None) -> None:
        try:
            import mlflow
        except ImportError:
            raise _missing("mlflow", "MLflow logging") from None
        self.mlflow = mlflow
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.extra_params = dict(extra_params or {})
        self.own_run = False
        self.started = False

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.lead or self.started:
            return
        mlflow = self.mlflow
        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        if mlflow.active_run() is None:
            if self.experiment:
                mlflow.set_experiment(self.experiment)
            mlflow.start_run(run_name=self.run_name)
            self.own_run = True
        self.started = True
        params = {f"model.{k}": v for k, v in trainer.model.cfg.to_dict().items()}
        params.update({f"train.{k}": v for k, v in trainer.cfg.to_dict().items()})
        params.update({"train.batch_size": trainer.batch_size, "train.precision": trainer.precision.chosen,
                       "train.rows": trainer.n_rows, **self.extra_params})
        mlflow.log_params({k: str(v)[:_MLFLOW_PARAM_CHARS] for k, v in params.items()})

    def on_validation(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.started:
            values = {f"valid_{k}": v for k, v in _scalars(metrics).items()}
            values["lr"] = float(trainer.updater.lr)
            self.mlflow.log_metrics(values, step=trainer.position.global_step)

    def on_run_end(self, metrics: dict[str, dict[str, Any]], bundle: Path | None) -> None:
        if not self.started:
            return
        final = {f"{part}_{k}": v for part, m in metrics.items() for k, v in _scalars(m).items()}
        if final:
            self.mlflow.log_metrics({f"final_{k}" if k.startswith("valid_") else k: v for k, v in final.items()})
        if bundle is not None:
            self.mlflow.set_tag("deepfm.bundle", str(Path(bundle).resolve()))

    def close(self, failed: bool) -> None:
        if self.own_run:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
            self.own_run = False
        self.started = False


def tracking(tensorboard_dir: str | Path | None = None, mlflow: bool | None = None,
             tensorboard_every: int = 50, extra_params: dict[str, Any] | None = None) -> list[Callback]:
    """The tracking callbacks asked for. ``mlflow``: True (an error if the package is absent), False (off), or
    None: on when MLFLOW_TRACKING_URI is set and mlflow is installed (a warning when it is not)."""
    out: list[Callback] = []
    if tensorboard_dir is not None:
        out.append(TensorBoardLogger(tensorboard_dir, tensorboard_every))
    if mlflow is None and os.environ.get("MLFLOW_TRACKING_URI"):
        try:
            out.append(MLflowLogger(extra_params=extra_params))
        except DeepFMError as e:
            logging.getLogger("deepfm.train").warning(f"MLFLOW_TRACKING_URI is set but not used: {e}")
    elif mlflow:
        out.append(MLflowLogger(extra_params=extra_params))
    return out
