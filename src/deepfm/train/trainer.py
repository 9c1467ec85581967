"""The training loop: seeded shuffling, slicing batches from the store, early stopping on the monitored
validation metric (AUC, or AUC - logloss; -logloss when the validation rows have one class) with the best
weights restored, optional LR reduction on plateau, a stop at the first NaN/inf loss, a progress bar, a
JSONL log and the run's log lines (logger ``deepfm.train``; ``log_to`` writes them to train.log)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from deepfm.accel import accelerate, kernels, plain, precision
from deepfm.config import check_options
from deepfm.device import is_cuda, model_device, pin, resolve_device, to_device
from deepfm.errors import DataError, DeepFMError
from deepfm.models.ctr import CTRModel
from deepfm.train import distributed as dist
from deepfm.train.callbacks import Callback, OnEpoch
from deepfm.train.checkpoint import CheckpointCallback, Checkpointer
from deepfm.train.early_stopping import EarlyStopping, monitored  # noqa: F401 (re-exported)
from deepfm.train.metrics import auc, evaluate
from deepfm.train.state import BatchSource, Position, RandomState, Shuffler, Stateful
from deepfm.train.updater import Updater
from deepfm.utils import available_cores, set_threads, sigmoid  # noqa: F401 (re-exported)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int | str = 4096  # or "auto": ~100 steps per epoch, a power of 2 in [128, 4096]
    lr: float = 1e-3
    patience: int = 2  # validations without improvement of the monitored metric before stopping
    # validations per epoch (an int >= 1, or "auto": AUTO_EVALS on small data, see evals_per_epoch); the best
    # weights are kept at that granularity. On 8k rows the DNN overfits within one epoch.
    evals_per_epoch: int | str = 1
    # learning-rate multiplier of the first-order weights and the bias (dense updates): with few steps per
    # epoch and early stopping after 2-4 epochs, the wide part is far from converged at lr 1e-3
    wide_lr_scale: float = 1.0
    # train LR first and start the model from its first-order weights, its MLP output at zero, so that the
    # MLP and FM terms are kept only where they beat LR on validation; "auto": below AUTO_WIDE_START_ROWS
    # training rows (pipeline.train), for the models with a first-order part and FM or MLP terms
    wide_start: bool | str = False
    monitor: str = "auc"  # "auc", or "auc-logloss" (validation AUC minus logloss, as BARS/FuxiCTR)
    reduce_lr_on_plateau: bool = False  # divide the LR by 10 once AUC stalls, before stopping
    seed: int = 2017
    threads: int = 0  # intra-op threads; 0 = the cores this process may run on
    eval_batch_size: int = 65536
    # "dense": Adam over whole tables; "sparse": lazy Adam on the touched rows; "auto": sparse from
    # AUTO_SPARSE_ROWS table rows up, where dense Adam's per-step cost over the table dominates
    embedding_update: str = "dense"
    # "fp32", "bf16" (autocast of the MLP; fast only on CPUs with AVX512-BF16/AMX), or "auto": bf16 where
    # this CPU runs the model's GEMMs clearly faster in it (measured once, cached: deepfm.accel.precision)
    precision: str = "fp32"
    prefetch: bool | str = "auto"  # build the next batches in a background thread; "auto": when a core is free
    checkpoint_every: int = 1000  # steps between checkpoints (0: epoch ends only), when training writes a bundle
    keep_checkpoints: int = 2  # the newest K are kept until the bundle is written
    # per-row sample weights read from this input column (None: unweighted); the pipeline reads the column, the
    # loss is the weighted BCE over the training rows' mean weight, validation metrics are weighted
    weight_column: str | None = None
    # negative downsampling (pipeline.train): every positive and this fraction of the training split's negatives are
    # trained on; validation probabilities are corrected to sigmoid(logit + ln q), as the bundle's (deepfm.calibration)
    negative_rate: float = 1.0
    # calibration fitted on the validation predictions after training (none, platt, isotonic; deepfm.calibration)
    calibrate: str = "none"
    # where the model, optimiser state and batches live: "auto" (CUDA when available), "cpu", "cuda", "cuda:N"
    # (deepfm.device); a runtime key: the same run on another device computes the same thing
    device: str = "auto"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise ValueError(f"unknown training option(s) {sorted(bad)}; allowed: {sorted(known)}")
        cfg = cls(**check_options("train", d))  # types and ranges (positive epochs, finite lr, ...)
        if cfg.monitor not in ("auc", "auc-logloss"):
            raise ValueError(f"monitor must be 'auc' or 'auc-logloss', got {cfg.monitor!r}")
        if cfg.embedding_update not in ("dense", "sparse", "auto"):
            raise ValueError(f"embedding_update must be 'dense', 'sparse' or 'auto', got {cfg.embedding_update!r}")
        if cfg.prefetch not in (True, False, "auto"):
            raise ValueError(f"prefetch must be true, false or 'auto', got {cfg.prefetch!r}")
        if cfg.checkpoint_every < 0 or cfg.keep_checkpoints < 1:
            raise ValueError("checkpoint_every must be >= 0 and keep_checkpoints >= 1")
        if cfg.precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {cfg.precision!r}")
        if cfg.evals_per_epoch != "auto" and (not isinstance(cfg.evals_per_epoch, int) or cfg.evals_per_epoch < 1):
            raise ValueError(f"evals_per_epoch must be a positive integer or 'auto', got {cfg.evals_per_epoch!r}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_batch_size(batch_size: int | str, rows: int) -> int:
    """``auto`` keeps small data sets from getting only a handful of steps per epoch."""
    if batch_size == "auto":
        return int(min(4096, max(128, 2 ** round(math.log2(max(rows / 100, 1))))))
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    return batch_size


# evals_per_epoch "auto": this many validations per epoch up to AUTO_EVALS_ROWS training rows, one above
# (where an epoch is long enough and a validation pass would cost throughput); docs/quality.md measures it
AUTO_EVALS, AUTO_EVALS_ROWS = 4, 200_000


def resolve_evals_per_epoch(evals: int | str, rows: int) -> int:
    if evals == "auto":
        return AUTO_EVALS if rows <= AUTO_EVALS_ROWS else 1
    return int(evals)


# One logger for training: the console handler below prints through tqdm (a line never breaks a progress
# bar) on the stderr of the moment; ``log_to`` adds a run's train.log. Records with console=False (epoch
# lines under --quiet) go to the file only.
log = logging.getLogger("deepfm.train")


class _Console(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(record, "console", True):
            return
        try:
            tqdm.write(f"[deepfm] {record.getMessage()}", file=sys.stderr)
        except Exception:
            self.handleError(record)


if not any(isinstance(h, _Console) for h in log.handlers):
    log.addHandler(_Console())
    log.setLevel(logging.INFO)
    log.propagate = False  # the handler above prints; a configured root logger would print it again


def _log(msg: str, console: bool = True, level: int = logging.INFO) -> None:
    log.log(level, msg, extra={"console": console or level >= logging.WARNING})


@contextlib.contextmanager
def log_to(path: Path | None, append: bool = False) -> Iterator[None]:
    """Also write the training log lines (console or not) to ``path``, with a time stamp; a
    DeepFMError that ends the run is its last line. ``append``: a resumed run continues the file."""
    if path is None:
        yield
        return
    handler = logging.FileHandler(path, mode="a" if append else "w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    log.addHandler(handler)
    try:
        yield
    except DeepFMError as e:
        log.error(f"error: {e}", extra={"console": False})
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


class DivergedError(DeepFMError):
    """The training loss (or a weight) became NaN or infinite: the run stops at that step."""

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch, self.step = epoch, step


def _finite(model: torch.nn.Module) -> bool:
    """No NaN/inf weight or buffer. A sum propagates both and reads the memory once: 92 ms for 119M float32
    values on 2 busy cores, against 1.6 s for isfinite().all(); a sum overflowing float32 (weights near 1e38)
    counts as diverged too."""
    return all(math.isfinite(t.sum().item()) for t in model.state_dict().values() if t.dtype.is_floating_point)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def tune_allocator() -> None:
    """Keep freed large buffers in the heap (glibc) instead of returning them to the OS: every training
    step allocates the same ~6 MB activations, and re-faulting fresh pages costs 5-8% of a CPU step.
    Set DEEPFM_NO_MALLOPT=1 to leave the allocator alone."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or os.environ.get("DEEPFM_NO_MALLOPT") or not sys.platform.startswith("linux"):
        return
    _ALLOCATOR_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve large blocks from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
    except (OSError, AttributeError):  # not glibc
        pass


_ALLOCATOR_TUNED = False


def autocast(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast of the forward on ``device`` (its type: "cpu" or "cuda"), fp32 master weights."""
    if precision == "bf16":
        return torch.autocast(device if isinstance(device, str) else device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Prefetcher:
    """Runs ``make(step)`` for steps start..n-1 in a background thread, ``depth`` batches ahead. The work is
    numpy slicing (which releases the GIL), so it overlaps the model's compute instead of adding to it."""

    def __init__(self, make: Callable[[int], Any], n: int, depth: int = 3, threaded: bool = True,
                 start: int = 0) -> None:
        self.make, self.n, self.threaded, self.start = make, n, threaded, start
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self._main = threading.main_thread()

    def _live(self) -> bool:
        """The consumer may still take batches: not stopped, and the interpreter is not exiting (the main
        thread counts as stopped once exit begins, and exit joins this non-daemon thread: a daemon thread
        still inside numpy/torch while the interpreter finalizes can abort the process, exit 134)."""
        return not self.stop.is_set() and self._main.is_alive()

    def _put(self, item: tuple) -> bool:
        while self._live():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for step in range(self.start, self.n):
                if not self._live() or not self._put((True, self.make(step))):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put((False, e))

    def __iter__(self) -> Iterator[Any]:
        if not self.threaded:
            for step in range(self.start, self.n):
                yield self.make(step)
            return
        t = threading.Thread(target=self._run, daemon=False, name="deepfm-prefetch")
        t.start()
        try:
            for _ in range(self.start, self.n):
                ok, item = self.q.get()
                if not ok:
                    raise item
                yield item
        finally:
            self.stop.set()
            t.join()


AUTO_SPARSE_ROWS = 1_000_000
# bf16 validation scoring (Trainer._valid_logits) only where it agrees with fp32 on the first rows
PARITY_ROWS, PARITY_MAX_DP, PARITY_MAX_AUC = 10_000, 2e-3, 5e-4


def uses_sparse_update(model: CTRModel, mode: str) -> bool:
    """``embedding_update``: "dense", "sparse", or "auto" (sparse from AUTO_SPARSE_ROWS table rows up, where
    dense Adam's per-step cost over the table dominates)."""
    table = model.v if model.v is not None else model.w
    if table is None or mode == "dense":
        return False
    return mode == "sparse" or table.weight.shape[0] >= AUTO_SPARSE_ROWS


@torch.no_grad()
def predict_logits(model: CTRModel, batcher: BatchSource, rows: np.ndarray | None = None,
                   batch_size: int = 65536) -> np.ndarray:
    """Logits for ``rows`` (default: all rows), in row order; eval mode, no autograd. On the model's device:
    each batch is copied there and its logits back."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    n = batcher.rows if rows is None else len(rows)
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, batch_size):
        sel = slice(s, min(n, s + batch_size)) if rows is None else rows[s: s + batch_size]
        idx, val, _ = batcher(sel)
        if device.type == "cpu":
            out[s: s + idx.shape[0]] = model(idx, val).float().numpy()
        else:
            idx, val = to_device((idx, val), device)
            out[s: s + idx.shape[0]] = model(idx, val).float().cpu().numpy()
    model.train(was_training)
    return out


def _sample_weights(source: BatchSource, rows: np.ndarray | None) -> tuple[np.ndarray | None, float]:
    """A source's sample weights (None: unweighted) and 1 / their mean over the training rows, the loss
    scale that keeps a weighted loss on the unweighted one's scale (so the learning rate means the same)."""
    weights = getattr(source, "weights", lambda: None)()
    if weights is None:
        return None, 1.0
    mean = float(np.mean(weights if rows is None else weights[rows], dtype=np.float64))
    if not mean > 0:
        raise DataError("every training row has sample weight zero: nothing to learn from")
    return weights, 1.0 / mean


def epoch_line(rec: dict[str, Any], epochs: int, best: float) -> str:
    """The per-epoch console/train.log line: training loss and speed, validation metrics, the monitored
    value and whether it is the best so far."""
    msg = (f"epoch {rec['epoch']}/{epochs}: train logloss {rec['train_logloss']:.4f} "
           f"({rec['train_rows_per_s']:,.0f} rows/s)")
    if "valid_auc" in rec:
        msg += (f", valid AUC {rec['valid_auc']:.4f} logloss {rec['valid_logloss']:.4f}; "
                f"{rec['valid_monitor']} {rec['valid_monitored']:.4f}")
        if rec["best_epoch"] == rec["epoch"] and rec["valid_monitored"] == best:
            msg += " (best so far)"
        elif rec["best_epoch"] is not None:
            msg += f" (best {best:.4f}, epoch {rec['best_epoch']})"
    return msg


def _validations(n: int) -> str:
    return f"{n} validation" + ("s" if n != 1 else "")


class Trainer:
    """Trains a model on a ``BatchSource``: ``fit`` runs epochs of ``train_epoch`` (seeded shuffling, batches
    built ahead in a loader thread, validation ``evals_per_epoch`` times per epoch) until the epoch cap or
    ``early_stopping`` stops it, then restores the best validated weights.

    Components, each with ``state_dict()``/``load_state_dict()`` (``state_dict`` here is all of them, what a
    checkpoint holds): ``model``; ``updater`` (the optimisation step: dense or lazy-sparse Adam, one process
    or data-parallel; ``train.updater``); ``early_stopping`` (``train.early_stopping``); ``shuffler`` (the
    epoch order) and ``random`` (torch and dropout streams), ``position`` (epoch, step, history; all three
    ``train.state``). ``callbacks`` run at the start, at save points and at epoch ends (checkpointing:
    ``train.checkpoint.CheckpointCallback``)."""

    def __init__(self, model: CTRModel, cfg: TrainConfig, train: BatchSource, train_rows: np.ndarray | None = None,
                 valid: BatchSource | None = None, valid_rows: np.ndarray | None = None, *,
                 log_path: Path | None = None, progress: bool = True, callbacks: Sequence[Callback] = ()) -> None:
        self.model, self.cfg, self.train_source, self.valid, self.valid_rows = model, cfg, train, valid, valid_rows
        self.log_path, self.progress, self.callbacks = log_path, progress, list(callbacks)
        self.threads = set_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu":
            accelerate(model)  # the fused CPU kernels, in place: same parameters, same numbers (deepfm.accel)
        else:  # the eager blocks (the C kernels are CPU-only), parameters and buffers on the device
            plain(model).to(self.device)
        tune_allocator()
        # a loader thread only helps with a spare core: on a full machine it preempts the compute threads (on a
        # GPU the cores are free: the loader builds and pins the next batches while the device computes)
        self.prefetch = (cfg.prefetch if isinstance(cfg.prefetch, bool)
                         else self.device.type != "cpu" or available_cores() > self.threads)
        self.shuffler = Shuffler(train, train_rows, cfg.seed)  # the epoch order: the same on every rank
        self.n_rows = self.shuffler.size
        if self.n_rows == 0:
            raise DeepFMError("no training rows")
        self.updater = Updater(model, cfg.lr, uses_sparse_update(model, cfg.embedding_update), cfg.wide_lr_scale)
        self.early_stopping = EarlyStopping(cfg.monitor, cfg.patience, cfg.reduce_lr_on_plateau)
        self.loss_fn = torch.nn.BCEWithLogitsLoss()
        self.train_weights, self.weight_scale = _sample_weights(train, train_rows)
        self.ranks, self.lead = dist.world(), dist.rank() == 0
        if self.ranks > 1:
            torch.manual_seed(cfg.seed + 7919 * dist.rank())  # dropout masks differ per rank; the init did not
        self.random = RandomState(model)
        self.position = Position()
        self.batch_size = resolve_batch_size(cfg.batch_size, self.n_rows)
        self.rank_batch = max(1, self.batch_size // self.ranks)  # the global batch stays batch_size rows
        self.precision = precision.decide(cfg.precision, model, self.rank_batch, self.device.type)  # "auto" resolved
        self.every = next((cb.every for cb in self.callbacks if cb.every), 0)  # steps between save points
        self.step_callbacks = [cb for cb in self.callbacks if cb.log_every] if self.lead else []
        self.evals = resolve_evals_per_epoch(cfg.evals_per_epoch, self.n_rows) if valid is not None else 1
        self.validate_first = False
        self._auc_warned = False
        self._valid_precision_logged: bool | None = None

    # ------------------------------------------------------------------ state
    def components(self) -> dict[str, Stateful]:
        return {"model": self.model, "optimizer": self.updater, "early_stopping": self.early_stopping,
                "shuffle": self.shuffler, "rng": self.random, "position": self.position}

    def state_dict(self) -> dict[str, Any]:
        return {name: c.state_dict() for name, c in self.components().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.components()) - set(state)
        if missing:
            raise KeyError(f"no state for {sorted(missing)}")
        for name, c in self.components().items():
            c.load_state_dict(state[name])
        self.model.clear_premade()

    @staticmethod
    def log(msg: str, console: bool = True, level: int = logging.INFO) -> None:
        _log(msg, console, level)

    # ------------------------------------------------------------------ the loop
    def fit(self, validate_first: bool = False) -> list[dict[str, Any]]:
        """Train from the current position to the end; returns the per-epoch history. ``validate_first``: the
        starting weights (a warm start) are validated first, the baseline that training must beat."""
        cfg, pos, model = self.cfg, self.position, self.model
        self.validate_first = validate_first
        for cb in self.callbacks:
            cb.on_fit_start(self)
        if self.progress and self.lead and self.device.type == "cpu":
            _log(f"fused CPU kernels: {kernels.status()}")  # built (once per machine) on first use
        elif self.lead and self.device.type != "cpu":
            name = torch.cuda.get_device_name(self.device) if is_cuda(self.device) else str(self.device)
            _log(f"device {self.device} ({name}): eager model, batches copied from pinned memory",
                 console=self.progress)
        if self.lead and cfg.precision == "auto":
            _log(precision.describe(self.precision), console=self.progress)
        if self.log_path is not None and self.lead:  # the log holds exactly the epochs of the history
            self.log_path.write_text("".join(json.dumps(r) + "\n" for r in pos.history))
        if self.lead:
            _log(f"training {model.cfg.model} on {self.n_rows:,} rows: batch {self.batch_size}, lr {cfg.lr:g}, up to "
                 f"{cfg.epochs} epochs" + (f"; early stopping on validation {cfg.monitor}, patience {cfg.patience}"
                                           if self.valid is not None else "; no validation set"),
                 console=self.progress)
        es = self.early_stopping
        if validate_first and self.valid is not None and es.best_weights is None and pos.epoch == 1 and pos.step == 0:
            self.validate()  # "epoch 0"
        while not pos.done and pos.epoch <= cfg.epochs:
            rec, stop = self.train_epoch()
            self._end_epoch(rec, stop)
        if es.best_weights is not None:
            model.load_state_dict(es.best_weights)
        return pos.history

    def train_epoch(self) -> tuple[dict[str, Any], bool]:
        """The rest of the epoch in progress (all of it, unless resumed inside it), with its validations;
        returns its history record and whether early stopping decided to stop."""
        cfg, pos, model = self.cfg, self.position, self.model
        epoch = pos.epoch
        model.train()
        perm = self.shuffler.epoch(resumed=pos.step > 0)
        steps_per_epoch = math.ceil(perm.size / self.rank_batch)
        check = math.ceil(steps_per_epoch / self.evals)  # validate every `check` steps (and at the epoch end)
        t0, eval_time, m, stop = time.perf_counter(), 0.0, None, False
        bar = tqdm(total=perm.size, desc=f"epoch {epoch}/{cfg.epochs}", unit="row", unit_scale=True,
                   disable=not self.progress or not self.lead, leave=False, mininterval=0.5)
        bar.update(min(perm.size, pos.step * self.rank_batch))
        model.clear_premade()
        while pos.step < steps_per_epoch and not stop:
            # up to the next save point: the loader thread stops there, so no dropout mask is drawn ahead
            end = (steps_per_epoch if not self.every
                   else min(steps_per_epoch, pos.step + self.every - pos.global_step % self.every))
            if self.evals > 1:  # and up to the next validation inside the epoch
                end = min(end, (pos.step // check + 1) * check)
            self._steps(perm, end, steps_per_epoch, bar)
            if self.evals > 1 and pos.step < steps_per_epoch and pos.step % check == 0:
                t1 = time.perf_counter()
                m, stop = self.validate()
                eval_time += time.perf_counter() - t1
                model.train()
                if stop:  # early stop inside the epoch: the epoch record below closes it
                    break
            if self.every and pos.step < steps_per_epoch and pos.global_step % self.every == 0:
                self._save_point()
        bar.close()
        train_time = time.perf_counter() - t0 - eval_time
        rec: dict[str, Any] = {"epoch": epoch, "train_logloss": pos.loss_sum / pos.seen,
                               "train_seconds": train_time, "train_rows_per_s": pos.seen / train_time,
                               "lr": self.updater.lr, "batch_size": self.batch_size}
        if self.valid is not None:
            if not stop:
                m, stop = self.validate()
            assert m is not None
            rec.update({f"valid_{k}": v for k, v in m.items()})
            # the validations of this epoch (deterministic from the step, so also right after a resume); the
            # best is in this epoch when fewer of them than that failed to improve
            done_checks = pos.step // check if pos.step < steps_per_epoch else (steps_per_epoch - 1) // check + 1
            es, first = self.early_stopping, not pos.history and not self.validate_first
            rec["best_epoch"] = (None if es.best_weights is None else epoch
                                 if first or es.bad < min(done_checks, self.evals)
                                 else pos.history[-1]["best_epoch"] if pos.history else 0)
        elif self.ranks > 1:
            dist.allreduce_mean([b for b in model.buffers() if b.dtype.is_floating_point])
        return rec, stop

    def _steps(self, perm: np.ndarray, end: int, steps_per_epoch: int, bar: Any) -> None:
        """Training steps pos.step .. end - 1 of the epoch ordered by ``perm``."""
        pos, model, upd, rank_batch = self.position, self.model, self.updater, self.rank_batch
        emb_l2 = model.cfg.embedding_l2
        device = self.device
        on_cpu = device.type == "cpu"

        def make(step: int) -> tuple:
            sel = np.sort(perm[step * rank_batch: (step + 1) * rank_batch])  # sorted: mmap locality
            idx, val, y = self.train_source(sel)
            w = (None if self.train_weights is None
                 else torch.from_numpy(np.asarray(self.train_weights[sel], dtype=np.float32)))
            if not on_cpu:  # the one pinned host buffer per batch, made here, off the training thread
                return (*pin((idx, val, y, w)), None)
            if self.prefetch:
                model.premake_dropout(len(sel))  # CPU masks (numpy); on a GPU dropout draws on the device
            return idx, val, y, w, upd.prepare(idx)

        for idx, val, y, w, prepared in Prefetcher(make, end, threaded=self.prefetch, start=pos.step):
            if not on_cpu:  # asynchronous copies; the touched rows of the sparse update found on the device
                idx, val, y, w = to_device((idx, val, y, w), device)
                prepared = upd.prepare(idx)
            upd.begin(prepared)
            with autocast(self.precision.chosen, device):
                logit = model(idx, val).float()
            if w is None:
                loss = self.loss_fn(logit, y)
            else:  # sum(w * bce) / (batch size * mean training weight): unweighted scale, zero-weight batches 0
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y, weight=w) * self.weight_scale
            total = loss + emb_l2 * model.embedding_penalty(idx) if emb_l2 > 0 else loss
            loss_value, checked = upd.backward(total, loss)
            if not math.isfinite(checked):  # before the update: the weights stay those of the last step
                raise self._diverged(f"the training loss is {checked}", pos.epoch, pos.step + 1)
            upd.step()
            pos.loss_sum += loss_value * len(y)
            pos.seen += len(y)
            pos.step += 1
            pos.global_step += 1
            for cb in self.step_callbacks:
                if pos.global_step % cb.log_every == 0:
                    cb.on_step(self, loss_value)
            if self.progress and (pos.step % 20 == 0 or pos.step == steps_per_epoch):
                bar.update(min(perm.size, pos.step * rank_batch) - bar.n)
                bar.set_postfix(loss=f"{pos.loss_sum / pos.seen:.4f}")

    def validate(self) -> tuple[dict[str, float], bool]:
        """Score validation and update early stopping (the best weights kept, the learning rate cut on a
        plateau); returns (metrics with the monitored value, stop)."""
        model, cfg, valid, pos = self.model, self.cfg, self.valid, self.position
        assert valid is not None
        if not _finite(model):
            raise self._diverged("a weight is NaN or infinite", pos.epoch, pos.step)
        vrows = self.valid_rows
        if self.ranks > 1:  # the same batch-norm statistics everywhere; each rank scores a slice of validation
            dist.allreduce_mean([b for b in model.buffers() if b.dtype.is_floating_point])
            all_rows = np.arange(valid.rows) if vrows is None else vrows
            parts = dist.gather_array(predict_logits(model, valid, all_rows[dist.rank()::self.ranks],
                                                     cfg.eval_batch_size))
            logits = np.empty(all_rows.size, dtype=np.float32)
            for i, part in enumerate(parts):
                logits[i::self.ranks] = part
        else:
            logits = self._valid_logits(vrows)
        labels = valid.labels()
        assert labels is not None
        weights = getattr(valid, "weights", lambda: None)()  # weighted validation: weighted early stopping
        if weights is not None:
            weights = np.asarray(weights if vrows is None else weights[vrows])
        if cfg.negative_rate != 1:  # a downsampled run is validated on corrected probabilities (deepfm.calibration)
            logits = logits.astype(np.float64) + math.log(cfg.negative_rate)
        m = evaluate(np.asarray(labels if vrows is None else labels[vrows]), sigmoid(logits), weights)
        d = self.early_stopping.update(m, model)
        if d.name != cfg.monitor and not self._auc_warned and self.lead:
            self._auc_warned = True
            _log(f"validation AUC is undefined: all {m['rows']:,} validation rows have label "
                 f"{int(round(m['observed_ctr']))}; early stopping monitors -logloss instead (give validation "
                 "data with both classes: --valid FILE or a larger --valid-fraction)", level=logging.WARNING)
        m["monitor"], m["monitored"] = d.name, d.value  # type: ignore[assignment]
        if d.action == "reduce_lr":
            assert self.early_stopping.best_weights is not None
            model.load_state_dict(self.early_stopping.best_weights)
            self.updater.scale_lr(0.1)
            if self.lead:
                _log(f"no gain for {_validations(cfg.patience)}: back to the best weights, learning rate "
                     f"divided by 10 (now {self.updater.lr:g})", console=self.progress)
        if self.lead:
            for cb in self.callbacks:
                cb.on_validation(self, m)
        return m, d.stop

    def _valid_logits(self, rows: np.ndarray | None) -> np.ndarray:
        """Validation logits; in bf16 (about 3x faster on a CPU with AMX) when training runs in bf16 and the
        first PARITY_ROWS validation rows, scored both ways, agree within the parity targets (max |dp|
        <= PARITY_MAX_DP, AUC difference <= PARITY_MAX_AUC), else in fp32. The final metrics
        (pipeline.score) stay fp32."""
        model, valid, bs = self.model, self.valid, self.cfg.eval_batch_size
        assert valid is not None
        if self.precision.chosen != "bf16":
            return predict_logits(model, valid, rows, bs)
        n = valid.rows if rows is None else len(rows)
        head = np.arange(min(n, PARITY_ROWS)) if rows is None else rows[:PARITY_ROWS]
        ref = sigmoid(predict_logits(model, valid, head, bs))
        with autocast("bf16", self.device):
            logits = predict_logits(model, valid, rows, bs)
        p = sigmoid(logits[: len(head)])
        dp = float(np.abs(p - ref).max()) if len(head) else 0.0
        labels = valid.labels()
        y = np.asarray(labels)[head] if labels is not None else None
        d_auc = abs(auc(y, p) - auc(y, ref)) if y is not None and 0 < y.sum() < len(y) else 0.0
        ok = dp <= PARITY_MAX_DP and d_auc <= PARITY_MAX_AUC
        if self.lead and self._valid_precision_logged != ok:
            self._valid_precision_logged = ok
            _log(f"validation scored in {'bf16' if ok else 'fp32'}: on {len(head):,} rows bf16 against fp32 max "
                 f"|dp| {dp:.2g}, AUC difference {d_auc:.2g} (limits {PARITY_MAX_DP:g}, {PARITY_MAX_AUC:g})",
                 console=self.progress)
        return logits if ok else predict_logits(model, valid, rows, bs)

    def _end_epoch(self, rec: dict[str, Any], stop: bool) -> None:
        cfg, pos = self.cfg, self.position
        epoch = rec["epoch"]
        pos.history.append(rec)
        if self.log_path is not None and self.lead:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if self.lead:
            best = self.early_stopping.best
            _log(epoch_line(rec, cfg.epochs, best), console=self.progress)
            if self.valid is not None and (stop or epoch >= cfg.epochs):
                kept = (f"keeping epoch {rec['best_epoch']} ({rec['valid_monitor']} {best:.4f})"
                        if rec["best_epoch"] is not None else "no epoch improved: keeping the last weights")
                _log(f"stopped: no gain for {_validations(cfg.patience)}; {kept}" if stop else
                     f"finished {cfg.epochs} epochs; {kept}", console=self.progress)
            for cb in self.callbacks:
                cb.on_epoch_end(self, rec)
        pos.epoch, pos.step, pos.loss_sum, pos.seen, pos.done = epoch + 1, 0, 0.0, 0, stop or epoch >= cfg.epochs
        self._save_point()

    def _save_point(self) -> None:
        """Never a NaN/inf weight over the last good state: the check comes first."""
        if not _finite(self.model):
            raise self._diverged("a weight is NaN or infinite", self.position.epoch, self.position.step)
        for cb in self.callbacks:
            cb.on_save_point(self)

    def _diverged(self, what: str, epoch: int, step: int) -> DivergedError:
        """Stop at the first non-finite loss or weight: nothing after it is saved, the best weights so far
        go back into the model, and the last checkpoint (written before it) stays for inspection."""
        if self.early_stopping.best_weights is not None:
            self.model.load_state_dict(self.early_stopping.best_weights)
        last_good = next((cb.last_good for cb in self.callbacks
                          if isinstance(cb, CheckpointCallback) and cb.last_good is not None), None)
        kept = (f"; the last good checkpoint ({last_good[0].name}: epoch {last_good[1]}, step {last_good[2]}) "
                f"is kept in {last_good[0].parent}" if last_good is not None else "")
        lr = self.updater.lr
        return DivergedError(f"training diverged at epoch {epoch}, step {step}: {what} (learning rate {lr:g}). "
                             f"Rerun with a lower learning rate, e.g. --lr {min(lr / 10, 1e-3):g}; no bundle was "
                             f"written{kept}", epoch, step)


def fit(
    model: CTRModel,
    train: BatchSource,
    cfg: TrainConfig,
    train_rows: np.ndarray | None = None,
    valid: BatchSource | None = None,
    valid_rows: np.ndarray | None = None,
    log_path: Path | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    checkpoints: Checkpointer | None = None,
    resume: bool = False,
    validate_first: bool = False,
    callbacks: Sequence[Callback] = (),
) -> list[dict[str, Any]]:
    """Train ``model`` in place (a ``Trainer``); returns the per-epoch history. With a validation set, keeps
    the weights of the validation with the best monitored metric (``cfg.monitor``).

    checkpoints: write a checkpoint every ``checkpoints.every`` steps and at every epoch end; resume: first
    continue from the newest valid checkpoint there (a resumed run ends bit-identical on CPU). ``callbacks``:
    more hooks (``train.callbacks``), run after the checkpoint's."""
    hooks: list[Callback] = []
    if checkpoints is not None:
        hooks.append(CheckpointCallback(checkpoints, resume))
    if on_epoch is not None:
        hooks.append(OnEpoch(on_epoch))
    trainer = Trainer(model, cfg, train, train_rows, valid, valid_rows, log_path=log_path, progress=progress,
                      callbacks=[*hooks, *callbacks])
    return trainer.fit(validate_first=validate_first)
