"""What a training run reads and what it must remember, as typed protocols and small stateful components.

- ``BatchSource``: what the trainer needs from the training/validation data (``data.store.Batcher``);
  ``ShardedSource`` adds the epoch order of an out-of-core source (``data.shards.ShardBatcher``), which
  orders each epoch itself, shard by shard.
- ``Stateful``: ``state_dict()`` / ``load_state_dict()``, what a checkpoint is made of (see
  ``train.checkpoint``). ``Position``, ``Shuffler`` and ``RandomState`` below are the run's own components;
  the model, the optimiser step (``train.updater.Updater``) and ``train.early_stopping.EarlyStopping``
  are the others.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from deepfm.train import distributed as dist


class BatchSource(Protocol):
    """Rows of encoded data: ``source(rows) -> (idx [B, S] int64, val [B, S] float32, y [B] float32 or
    None)``, ``rows`` in all, ``labels()`` [rows] in row order (None when unlabelled)."""

    @property
    def rows(self) -> int: ...

    def labels(self) -> np.ndarray | None: ...

    def __call__(self, rows: np.ndarray | slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...


@runtime_checkable
class ShardedSource(BatchSource, Protocol):
    """A source on disk in shards (``starts``: the first row of each): an epoch visits the shards in a random
    order and the rows of each in a random order, so that one shard at a time is read."""

    @property
    def starts(self) -> np.ndarray: ...

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray: ...


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class RandomStream(Protocol):
    """A module that draws from a random stream of its own (``models.dropout.FastDropout``): its state is part
    of a checkpoint, so that a resumed run draws the same masks."""

    def rng_state_dict(self) -> dict[str, Any] | None: ...

    def load_rng_state_dict(self, state: dict[str, Any] | None) -> None: ...


@dataclass
class Position:
    """Where a run is: the epoch in progress (1-based) and its next step, the running sums of that epoch,
    the history of the finished epochs, the steps taken in all, and whether training is over (only the final
    weights/bundle remain to be written)."""

    epoch: int = 1
    step: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    global_step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, copy.deepcopy(state[f.name]))


class Shuffler:
    """The epoch order, the same on every rank: a permutation of ``rows`` (in memory), or the source's own
    shard-by-shard order (``ShardedSource``); each rank then takes its disjoint part (``distributed.share``).
    The generator's state before the epoch's draw is kept, so that a run resumed inside an epoch draws the
    same permutation again."""

    def __init__(self, source: BatchSource, rows: np.ndarray | None, seed: int) -> None:
        # an out-of-core source orders each epoch itself (shard by shard); in memory: a permutation of rows
        self.shards: ShardedSource | None = source if isinstance(source, ShardedSource) else None
        self.rows = None if self.shards is not None else (np.arange(source.rows) if rows is None else np.asarray(rows))
        self.size = source.rows if self.rows is None else self.rows.size
        self.rng = np.random.default_rng(seed)
        self.epoch_start: dict[str, Any] | None = None

    def epoch(self, resumed: bool) -> np.ndarray:
        """This rank's rows of the epoch, in order; ``resumed``: the epoch was begun before (a resumed run)."""
        if not resumed:
            self.epoch_start = copy.deepcopy(self.rng.bit_generator.state)
        else:  # resumed inside the epoch: draw its permutation again from the state before it
            self.rng.bit_generator.state = self.epoch_start
        if self.shards is not None:
            perm = self.shards.epoch_order(self.rng)
        else:
            assert self.rows is not None
            perm = self.rows[self.rng.permutation(self.size)]
        if dist.world() > 1:  # this rank's disjoint part: its shards (i % world), or every world-th row
            owner = ((np.searchsorted(self.shards.starts, perm, side="right") - 1) % dist.world()
                     if self.shards is not None else None)
            perm = dist.share(perm, owner)
        return perm

    def state_dict(self) -> dict[str, Any]:
        return {"rng": copy.deepcopy(self.rng.bit_generator.state), "epoch_start": copy.deepcopy(self.epoch_start)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.epoch_start = copy.deepcopy(state["epoch_start"])


class RandomState:
    """torch's global generator (initialisation, the seed of each dropout stream) and the model's own random
    streams (``RandomStream`` modules, in module order); on a GPU also the CUDA generator (its dropout)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.streams = [m for m in model.modules() if isinstance(m, RandomStream)]

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "streams": [s.rng_state_dict() for s in self.streams]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on a GPU draws from its generator
            state["cuda"] = torch.cuda.get_rng_state().cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        for s, st in zip(self.streams, state["streams"], strict=True):
            s.load_rng_state_dict(st)
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"].cpu())
