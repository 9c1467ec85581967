"""Training checkpoints: everything ``fit`` needs to continue a run exactly where it stopped.

    OUT/checkpoints/step-000001200/
        state.safetensors   model, best-epoch weights, optimiser moments, torch RNG (tensors only)
        state.json          format + version, sha256 of state.safetensors, the run's fingerprint, the
                            position (epoch, next step), numpy RNG states, loss sums, early-stopping state

A checkpoint is written into a temporary folder, fsynced, then renamed into place, and only the newest
``keep`` are kept, so a kill at any moment leaves the previous checkpoint intact. Loading checks the
version, the checksum and the fingerprint (the model/training config and the data the run was started
with); a damaged newest checkpoint falls back to the one before. On CPU with the same threads, a resumed
run ends bit-identical to an uninterrupted one (``scripts/kill_test.py`` checks it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from deepfm import outputs
from deepfm.errors import DeepFMError
from deepfm.models.ctr import CTRModel
from deepfm.models.layers import FastDropout

FORMAT = "deepfm-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Position:
    """Where a run is: epoch in progress (1-based) and its next step; the numpy RNG state before that
    epoch's shuffle (so the permutation is drawn again identically); the running sums of the epoch."""

    epoch: int = 1
    step: int = 0
    epoch_rng: dict[str, Any] | None = None
    loss_sum: float = 0.0
    seen: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float = float("-inf")
    bad_epochs: int = 0
    reduced: bool = False
    done: bool = False  # early stopping decided: only the final weights/bundle remain to be written
    global_step: int = 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    def save(self, model: CTRModel, opt: torch.optim.Optimizer, sparse: Any, best_state: dict | None,
             rng: np.random.Generator, pos: Position) -> Path:
        tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
        if best_state is not None:
            tensors.update({f"best.{k}": v for k, v in best_state.items()})
        opt_state = opt.state_dict()
        for i, st in opt_state["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        if sparse is not None:
            for j, (m, v) in enumerate(zip(sparse.opt.exp_avg, sparse.opt.exp_avg_sq, strict=True)):
                tensors[f"sparse.{j}.exp_avg"], tensors[f"sparse.{j}.exp_avg_sq"] = m, v
        tensors["torch_rng"] = torch.get_rng_state()
        shared = _shared(tensors)
        tensors = {k: v.detach().contiguous().clone() if v.data_ptr() in shared else v.detach().contiguous()
                   for k, v in tensors.items()}
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
            "position": asdict(pos), "rng": rng.bit_generator.state,
            "dropout_rngs": [m.rng.bit_generator.state if m.rng is not None else None
                             for m in model.modules() if isinstance(m, FastDropout)],
            "param_groups": opt_state["param_groups"], "opt_state_keys": {str(i): sorted(st)
                                                                          for i, st in opt_state["state"].items()},
            "sparse": {"steps": sparse.opt.steps, "lr": sparse.opt.lr} if sparse is not None else None,
            "best_state": best_state is not None,
        }
        name = f"step-{pos.global_step:09d}" + ("-done" if pos.done else "")
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
            _fsync_dir(self.dir)
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
                if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
                    raise ValueError(f"format {meta.get('format')} v{meta.get('format_version')}")
                # written since state.json carries its own checksum; older checkpoints lack it
                if "meta_sha256" in meta and _meta_sha256(meta) != meta["meta_sha256"]:
                    raise ValueError("state.json checksum mismatch")
                if _sha256(path / "state.safetensors") != meta.get("sha256"):
                    raise ValueError("checksum mismatch")
                if not isinstance(meta.get("fingerprint"), str):
                    raise ValueError("state.json has no fingerprint")
            except (OSError, ValueError) as e:
                if warn:
                    warn(f"skipping damaged checkpoint {path.name}: {e}")
                continue
            if meta["fingerprint"] != self.fingerprint:
                raise DeepFMError(f"{path}: this checkpoint belongs to a run with another configuration or other "
                                  "data; rerun the original command, or delete "
                                  f"{self.dir} (or drop --resume) to start over")
            return path, meta
        return None

    def restore(self, path: Path, meta: dict[str, Any], model: CTRModel, opt: torch.optim.Optimizer, sparse: Any,
                rng: np.random.Generator) -> tuple[Position, dict | None]:
        """Load a checkpoint into the live objects; returns the position and the best-epoch weights."""
        t = load_file(str(path / "state.safetensors"))
        model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")}, strict=True)
        best = {k[5:]: v for k, v in t.items() if k.startswith("best.")} if meta["best_state"] else None
        state = {int(i): {k: t[f"opt.{i}.{k}"] for k in keys} for i, keys in meta["opt_state_keys"].items()}
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        if sparse is not None:
            for j in range(len(sparse.opt.exp_avg)):
                sparse.opt.exp_avg[j].copy_(t[f"sparse.{j}.exp_avg"])
                sparse.opt.exp_avg_sq[j].copy_(t[f"sparse.{j}.exp_avg_sq"])
            sparse.opt.steps, sparse.opt.lr = meta["sparse"]["steps"], meta["sparse"]["lr"]
        torch.set_rng_state(t["torch_rng"])
        rng.bit_generator.state = meta["rng"]
        drops = [m for m in model.modules() if isinstance(m, FastDropout)]
        for m, st in zip(drops, meta["dropout_rngs"], strict=True):
            m.pending.clear()
            if st is None:
                m.rng = None
            else:
                m.rng = np.random.default_rng()
                m.rng.bit_generator.state = st
        return Position(**meta["position"]), best


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
    rest = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-able parts (configs, data identity)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
