"""Training checkpoints: the state of every component of a run, to continue it exactly where it stopped.

    OUT/checkpoints/step-000001200/
        state.safetensors   every tensor of the state (model, best weights, optimiser moments, torch RNG)
        state.json          format + version, sha256 of state.safetensors, the run's fingerprint, and the rest
                            of each component's state, a tensor standing as {"__tensor__": its name}

The state is ``Trainer.state_dict()``: one ``state_dict()`` per component (``model``, ``optimizer``,
``early_stopping``, ``shuffle``, ``rng``, ``position``; see ``train.state``), written by
``CheckpointCallback`` at the trainer's save points and loaded back into each component's
``load_state_dict()`` on resume. A checkpoint is written into a temporary folder, fsynced, then renamed into
place, and only the newest ``keep`` are kept, so a kill at any moment leaves the previous checkpoint intact.
Loading checks the version, the checksum and the fingerprint (the model/training config and the data the run
was started with); a damaged newest checkpoint falls back to the one before, and one written by another
checkpoint format is refused with a clear "start over". On CPU with the same threads, a resumed run ends
bit-identical to an uninterrupted one (``scripts/kill_test.py`` checks it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from deepfm import outputs
from deepfm.errors import DeepFMError
from deepfm.train.callbacks import Callback
from deepfm.utils import digest

if TYPE_CHECKING:
    from deepfm.train.trainer import Trainer

FORMAT = "deepfm-checkpoint"
# 2: one entry per component state_dict (v1: a fixed layout of model/best/opt/sparse/RNG entries)
FORMAT_VERSION = 2


def disk_error(e: BaseException, what: str, where: Path) -> DeepFMError:
    """A clear error for a failed artifact write (disk full above all; safetensors raises its own
    SafetensorError, not OSError, for the same failures)."""
    if outputs.is_disk_full(e):
        return DeepFMError(f"disk full while writing {what} to {where}; free space (or point --out elsewhere) "
                           "and rerun with --resume: the last complete checkpoint is intact")
    return DeepFMError(f"could not write {what} to {where}: {e}")


class Checkpointer:
    """Writes and finds the checkpoints of one run under ``directory``."""

    def __init__(self, directory: str | Path, fingerprint: str, every: int = 0, keep: int = 2) -> None:
        self.dir = Path(directory)
        self.fingerprint, self.every, self.keep = fingerprint, every, max(1, keep)

    # ------------------------------------------------------------------ write
    def save(self, state: dict[str, Any], global_step: int, done: bool = False) -> Path:
        """Write ``state`` (component name -> its state_dict) as ``step-<global_step>`` (``-done``: training
        is over, only the bundle remains); returns the folder."""
        tensors: dict[str, torch.Tensor] = {}
        tree = {k: _split(v, k, tensors) for k, v in state.items()}
        shared = _shared(tensors)
        tensors = {k: v.detach().contiguous().clone() if v.data_ptr() in shared else v.detach().contiguous()
                   for k, v in tensors.items()}
        tensors = {k: v.cpu() for k, v in tensors.items()}  # device-free (a GPU run's state); no copy on CPU
        reserved = {"format", "format_version", "fingerprint", "sha256", "meta_sha256"} & set(tree)
        if reserved:
            raise ValueError(f"checkpoint component names {sorted(reserved)} are reserved")
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint, **tree}
        name = f"step-{global_step:09d}" + ("-done" if done else "")
        final = self.dir / name
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with outputs.locked(self.dir):  # one writer per checkpoints folder
                self._write(tensors, meta, final)
                for old in self.list()[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except outputs.WRITE_ERRORS as e:
            raise disk_error(e, "a checkpoint", self.dir) from None
        return final

    def _write(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], final: Path) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.dir))
        try:
            outputs.follow_umask(tmp, is_dir=True)  # mkdtemp makes 0700
            save_file(tensors, str(tmp / "state.safetensors"))
            outputs.follow_umask(tmp / "state.safetensors", is_dir=False)  # safetensors creates its files 0600
            with open(tmp / "state.safetensors", "rb+") as fh:
                os.fsync(fh.fileno())
            meta["sha256"] = _sha256(tmp / "state.safetensors")
            meta["meta_sha256"] = _meta_sha256(meta)  # state.json checks itself: a damaged one is skipped
            with open(tmp / "state.json", "w") as fh:
                json.dump(meta, fh)
                fh.flush()
                os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            outputs.fsync_dir(self.dir)
        except BaseException:  # also SIGTERM (outputs.Terminated) and Ctrl-C: no .tmp-* folder is left
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # ------------------------------------------------------------------ find / read
    def list(self) -> list[Path]:
        """Checkpoint folders, oldest first (temporary and foreign folders ignored)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith("step-"))

    def latest(self, warn: Any = None) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that verifies, with its state.json; None when there is none. A checkpoint
        of another run (other config or data) is an error: resuming it would silently train something else."""
        for path in reversed(self.list()):
            try:
                meta = json.loads((path / "state.json").read_text())
                if not isinstance(meta, dict):
                    raise ValueError("state.json is not an object")
                # written since state.json carries its own checksum; older checkpoints lack it
                if "meta_sha256" in meta and _meta_sha256(meta) != meta["meta_sha256"]:
                    raise ValueError("state.json checksum mismatch")
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format {meta.get('format')}")
                if _sha256(path / "state.safetensors") != meta.get("sha256"):
                    raise ValueError("checksum mismatch")
                if not isinstance(meta.get("fingerprint"), str):
                    raise ValueError("state.json has no fingerprint")
            except (OSError, ValueError) as e:
                if warn:
                    warn(f"skipping damaged checkpoint {path.name}: {e}")
                continue
            if meta.get("format_version") != FORMAT_VERSION:
                raise DeepFMError(f"{path}: incompatible checkpoint (format v{meta.get('format_version')}, written by "
                                  f"another deepfm version; this one reads v{FORMAT_VERSION}): it cannot be resumed. "
                                  f"Start over: delete {self.dir} (or drop --resume)")
            if meta["fingerprint"] != self.fingerprint:
                raise DeepFMError(f"{path}: this checkpoint belongs to a run with another configuration or other "
                                  "data; rerun the original command, or delete "
                                  f"{self.dir} (or drop --resume) to start over")
            return path, meta
        return None

    def load(self, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """The state (component name -> state_dict) of the checkpoint ``latest`` found, tensors included."""
        tensors = load_file(str(path / "state.safetensors"))
        skip = {"format", "format_version", "fingerprint", "sha256", "meta_sha256"}
        return {k: _join(v, tensors) for k, v in meta.items() if k not in skip}


class CheckpointCallback(Callback):
    """Checkpointing as a trainer callback: on resume, the newest valid checkpoint goes back into every
    component (``Trainer.load_state_dict``); at each save point (every ``checkpointer.every`` steps and at
    every epoch end) rank 0 writes ``Trainer.state_dict()``."""

    def __init__(self, checkpointer: Checkpointer, resume: bool = False) -> None:
        self.checkpointer, self.resume = checkpointer, resume
        self.every = checkpointer.every
        self.last_good: tuple[Path, int, int] | None = None  # the newest checkpoint written or resumed from

    def on_fit_start(self, trainer: Trainer) -> None:
        if not self.resume:
            return
        found = self.checkpointer.latest(warn=trainer.log)
        if found is None:
            trainer.log(f"no checkpoint in {self.checkpointer.dir}: starting from the beginning")
            return
        try:
            trainer.load_state_dict(self.checkpointer.load(*found))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # same version and fingerprint: unexpected
            raise DeepFMError(f"{found[0]}: incompatible checkpoint ({type(e).__name__}: {e}); start over: delete "
                              f"{self.checkpointer.dir} (or drop --resume)") from None
        pos = trainer.position
        self.last_good = (found[0], pos.epoch, pos.step)
        trainer.log(f"resuming from {found[0].name}: epoch {pos.epoch}, step {pos.step}")

    def on_save_point(self, trainer: Trainer) -> None:
        if trainer.lead:
            pos = trainer.position
            path = self.checkpointer.save(trainer.state_dict(), pos.global_step, pos.done)
            self.last_good = (path, pos.epoch, pos.step)


def _split(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A state as JSON, each tensor moved into ``tensors`` under its dotted path and replaced by
    {"__tensor__": path}; dicts with non-string keys (an optimiser's parameter numbers) as {"__items__":
    [[key, value], ...]}, tuples as lists."""
    if torch.is_tensor(obj):
        if name in tensors:
            raise ValueError(f"two checkpoint tensors named {name!r}")
        tensors[name] = obj
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not ({"__tensor__", "__items__"} & set(obj)):
            return {k: _split(v, f"{name}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, _split(v, f"{name}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_split(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"checkpoint state {name!r}: {type(obj).__name__} is not a tensor or JSON value")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_split`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: _join(v, tensors) for k, v in obj["__items__"]}
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def _shared(tensors: dict[str, torch.Tensor]) -> set[int]:
    """Data pointers used by more than one entry (safetensors refuses shared storage)."""
    seen: dict[int, int] = {}
    for v in tensors.values():
        seen[v.data_ptr()] = seen.get(v.data_ptr(), 0) + 1
    return {p for p, n in seen.items() if n > 1}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _meta_sha256(meta: dict[str, Any]) -> str:
    """sha256 of state.json's content without its own checksum (canonical JSON: key order does not matter)."""
    return digest({k: v for k, v in meta.items() if k != "meta_sha256"})


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-able parts (configs, data identity)."""
    return digest(list(parts), 16)
