"""Trainer callbacks: code that runs at fixed points of ``Trainer.fit`` without being part of the loop
(checkpointing: ``train.checkpoint.CheckpointCallback``; a per-epoch hook: ``OnEpoch``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepfm.train.trainer import Trainer


class Callback:
    """Hooks, each a no-op here. ``every``: the steps between save points this callback wants (0: epoch ends
    only); the loader thread stops at each, so nothing is drawn ahead of a saved state."""

    every: int = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step (after every component is built): e.g. load a checkpoint."""

    def on_save_point(self, trainer: Trainer) -> None:
        """The state is complete and its weights finite (every ``every`` steps and at each epoch end); every
        rank calls it (``trainer.lead``: rank 0)."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """An epoch ended with ``record`` (its history entry); rank 0 only."""


class OnEpoch(Callback):
    """Calls ``fn(record)`` at each epoch end."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.fn = fn

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.fn(record)
