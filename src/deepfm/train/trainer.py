"""The training loop: seeded shuffling, slicing batches from the store, early stopping on the monitored
validation metric (AUC, or AUC - logloss; -logloss when the validation rows have one class) with the best
weights restored, optional LR reduction on plateau, a stop at the first NaN/inf loss, a progress bar, a
JSONL log and the run's log lines (logger ``deepfm.train``; ``log_to`` writes them to train.log)."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from deepfm.config import check_options
from deepfm.data.store import Batcher
from deepfm.errors import DeepFMError
from deepfm.models import kernels
from deepfm.models.ctr import CTRModel
from deepfm.train import distributed as dist
from deepfm.train.checkpoint import Checkpointer, Position
from deepfm.train.metrics import evaluate
from deepfm.train.sparse import SparseEmbeddings


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
    precision: str = "fp32"  # "fp32", or "bf16" (autocast of the MLP; fast only on CPUs with AVX512-BF16/AMX)
    prefetch: bool | str = "auto"  # build the next batches in a background thread; "auto": when a core is free
    checkpoint_every: int = 1000  # steps between checkpoints (0: epoch ends only), when training writes a bundle
    keep_checkpoints: int = 2  # the newest K are kept until the bundle is written

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
        if cfg.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {cfg.precision!r}")
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


def monitored(m: dict[str, float], monitor: str) -> tuple[float, str]:
    """The value early stopping maximises and its name. AUC is undefined (NaN) when the validation rows
    have one class: then -logloss, which is defined (and a NaN comparison would never improve)."""
    if math.isnan(m["auc"]):
        return -m["logloss"], "-logloss"
    if monitor == "auc-logloss":
        return m["auc"] - m["logloss"], "auc-logloss"
    return m["auc"], "auc"


def _finite(model: torch.nn.Module) -> bool:
    """No NaN/inf weight or buffer. A sum propagates both and reads the memory once: 92 ms for 119M float32
    values on 2 busy cores, against 1.6 s for isfinite().all(); a sum overflowing float32 (weights near 1e38)
    counts as diverged too."""
    return all(math.isfinite(t.sum().item()) for t in model.state_dict().values() if t.dtype.is_floating_point)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def available_cores() -> int:
    """Cores this process may run on (affinity mask), not the host's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


def set_threads(threads: int) -> int:
    n = threads or available_cores()
    torch.set_num_threads(n)
    return n


def autocast(precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
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


def uses_sparse_update(model: CTRModel, mode: str) -> bool:
    table = model.v if model.v is not None else model.w
    if table is None or mode == "dense":
        return False
    return mode == "sparse" or table.weight.shape[0] >= AUTO_SPARSE_ROWS


@torch.no_grad()
def predict_logits(model: CTRModel, batcher: Batcher, rows: np.ndarray | None = None,
                   batch_size: int = 65536) -> np.ndarray:
    """Logits for ``rows`` (default: all rows), in row order; eval mode, no autograd."""
    was_training = model.training
    model.eval()
    n = batcher.rows if rows is None else len(rows)
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, batch_size):
        sel = slice(s, min(n, s + batch_size)) if rows is None else rows[s: s + batch_size]
        idx, val, _ = batcher(sel)
        out[s: s + idx.shape[0]] = model(idx, val).float().numpy()
    model.train(was_training)
    return out


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


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp overflows to inf for logits below -709: 1 / (1 + inf) = 0, exact
        return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float64)


def fit(
    model: CTRModel,
    train: Batcher,
    cfg: TrainConfig,
    train_rows: np.ndarray | None = None,
    valid: Batcher | None = None,
    valid_rows: np.ndarray | None = None,
    log_path: Path | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    checkpoints: Checkpointer | None = None,
    resume: bool = False,
    validate_first: bool = False,
) -> list[dict[str, Any]]:
    """Train ``model`` in place; returns the per-epoch history. With a validation set, keeps the weights
    of the epoch with the best monitored validation metric (``cfg.monitor``).

    checkpoints: write a checkpoint every ``checkpoints.every`` steps and at every epoch end; resume: first
    continue from the newest valid checkpoint there (a resumed run ends bit-identical on CPU)."""
    threads = set_threads(cfg.threads)
    tune_allocator()
    # a loader thread only helps with a spare core: on a full machine it preempts the compute threads
    prefetch = cfg.prefetch if isinstance(cfg.prefetch, bool) else available_cores() > threads
    # an out-of-core ShardBatcher orders each epoch itself (shard by shard); in memory: a permutation of rows
    sharded = hasattr(train, "epoch_order")
    rows = None if sharded else (np.arange(train.rows) if train_rows is None else np.asarray(train_rows))
    n_rows = train.rows if sharded else rows.size
    if n_rows == 0:
        raise DeepFMError("no training rows")
    emb_l2 = model.cfg.embedding_l2
    sparse = None
    if uses_sparse_update(model, cfg.embedding_update):
        sparse = SparseEmbeddings(model, cfg.lr)
    tables = {id(t.weight) for t in sparse.tables} if sparse else set()
    named = [(n, p) for n, p in model.named_parameters() if id(p) not in tables]
    dense = [p for n, p in named if n.startswith("dnn.")]
    # the first-order weights and the bias at wide_lr_scale x lr (their own group only when scaled)
    wide = [p for n, p in named if n in ("bias", "w.weight")] if cfg.wide_lr_scale != 1 else []
    other = [p for n, p in named if not n.startswith("dnn.") and not any(p is q for q in wide)]
    # fused: one kernel per tensor for the whole Adam update (half the foreach time on CPU); same algorithm
    groups = [{"params": other}, {"params": dense, "weight_decay": model.cfg.net_l2}]
    opt = torch.optim.Adam(groups + ([{"params": wide, "lr": cfg.lr * cfg.wide_lr_scale}] if wide else []),
                           lr=cfg.lr, fused=True)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(cfg.seed)  # the epoch order: the same on every rank
    ranks, lead = dist.world(), dist.rank() == 0
    if ranks > 1:
        torch.manual_seed(cfg.seed + 7919 * dist.rank())  # dropout masks differ per rank; the init did not
        reduce = [p for p in model.parameters() if id(p) not in tables and p.requires_grad]
    pos, best_state = Position(), None
    last_good: tuple[Path, int, int] | None = None  # the newest checkpoint written (or resumed from)
    if resume and checkpoints is not None:
        found = checkpoints.latest(warn=_log)
        if found is None:
            _log(f"no checkpoint in {checkpoints.dir}: starting from the beginning")
        else:
            pos, best_state = checkpoints.restore(*found, model, opt, sparse, rng)
            last_good = (found[0], pos.epoch, pos.step)
            _log(f"resuming from {found[0].name}: epoch {pos.epoch}, step {pos.step}")
    if progress and lead and next(model.parameters()).device.type == "cpu":
        _log(f"fused CPU kernels: {kernels.status()}")  # built (once per machine) on first use
    if log_path is not None and lead:  # the log holds exactly the epochs of the history (rewritten on resume)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in pos.history))
    batch_size = resolve_batch_size(cfg.batch_size, n_rows)
    rank_batch = max(1, batch_size // ranks)  # the global batch stays batch_size rows
    every = checkpoints.every if checkpoints is not None else 0
    evals = resolve_evals_per_epoch(cfg.evals_per_epoch, n_rows) if valid is not None else 1

    if lead:
        _log(f"training {model.cfg.model} on {n_rows:,} rows: batch {batch_size}, lr {cfg.lr:g}, up to {cfg.epochs} "
             f"epochs" + (f"; early stopping on validation {cfg.monitor}, patience {cfg.patience}"
                          if valid is not None else "; no validation set"), console=progress)
    auc_warned = False

    def diverged(what: str, epoch: int, step: int) -> DivergedError:
        """Stop at the first non-finite loss or weight: nothing after it is saved, the best weights so far
        go back into the model, and the last checkpoint (written before it) stays for inspection."""
        if best_state is not None:
            model.load_state_dict(best_state)
        kept = (f"; the last good checkpoint ({last_good[0].name}: epoch {last_good[1]}, step {last_good[2]}) "
                f"is kept in {last_good[0].parent}" if last_good is not None else "")
        lr = opt.param_groups[0]["lr"]
        return DivergedError(f"training diverged at epoch {epoch}, step {step}: {what} (learning rate {lr:g}). "
                             f"Rerun with a lower learning rate, e.g. --lr {min(lr / 10, 1e-3):g}; no bundle was "
                             f"written{kept}", epoch, step)

    def save() -> None:
        nonlocal last_good
        if not _finite(model):  # never checkpoint NaN/inf weights over the last good state
            raise diverged("a weight is NaN or infinite", pos.epoch, pos.step)
        if checkpoints is not None and lead:
            last_good = (checkpoints.save(model, opt, sparse, best_state, rng, pos), pos.epoch, pos.step)

    def validate() -> tuple[dict[str, float], bool]:
        """Score validation, keep the weights if the monitored value improved; returns (metrics, stop)."""
        nonlocal best_state, auc_warned
        if not _finite(model):
            raise diverged("a weight is NaN or infinite", pos.epoch, pos.step)
        vrows = valid_rows if valid_rows is not None else None
        if ranks > 1:  # the same batch-norm statistics everywhere; each rank scores a slice of validation
            dist.allreduce_mean([b for b in model.buffers() if b.dtype.is_floating_point])
            all_rows = np.arange(valid.rows) if vrows is None else vrows
            parts = dist.gather_array(predict_logits(model, valid, all_rows[dist.rank()::ranks],
                                                     cfg.eval_batch_size))
            logits = np.empty(all_rows.size, dtype=np.float32)
            for i, part in enumerate(parts):
                logits[i::ranks] = part
        else:
            logits = predict_logits(model, valid, vrows, cfg.eval_batch_size)
        y_valid = valid.labels() if vrows is None else valid.labels()[vrows]
        m = evaluate(np.asarray(y_valid), sigmoid(logits))
        value, name = monitored(m, cfg.monitor)
        if name != cfg.monitor and not auc_warned and lead:
            auc_warned = True
            _log(f"validation AUC is undefined: all {m['rows']:,} validation rows have label "
                 f"{int(round(m['observed_ctr']))}; early stopping monitors -logloss instead (give validation "
                 "data with both classes: --valid FILE or a larger --valid-fraction)", level=logging.WARNING)
        m["monitor"], m["monitored"] = name, value
        if value > pos.best + 1e-6:
            pos.best, pos.bad_epochs = value, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            pos.bad_epochs += 1
        if pos.bad_epochs >= cfg.patience:
            if cfg.reduce_lr_on_plateau and not pos.reduced:
                pos.reduced, pos.bad_epochs = True, 0
                model.load_state_dict(best_state)
                for g in opt.param_groups:
                    g["lr"] *= 0.1
                if sparse:
                    sparse.lr *= 0.1
                if lead:
                    _log(f"no gain for {_validations(cfg.patience)}: back to the best weights, learning rate "
                         f"divided by 10 (now {opt.param_groups[0]['lr']:g})", console=progress)
            else:
                return m, True
        return m, False

    if validate_first and valid is not None and best_state is None and pos.epoch == 1 and pos.step == 0:
        validate()  # the starting weights (a warm start) are the baseline that training must beat ("epoch 0")
    while not pos.done and pos.epoch <= cfg.epochs:
        epoch = pos.epoch
        model.train()
        if pos.step == 0:
            pos.epoch_rng = copy.deepcopy(rng.bit_generator.state)
        else:  # resumed inside the epoch: draw its permutation again from the state before it
            rng.bit_generator.state = pos.epoch_rng
        perm = train.epoch_order(rng) if sharded else rows[rng.permutation(n_rows)]
        if ranks > 1:  # this rank's disjoint part: its shards (i % world), or every world-th row
            owner = (np.searchsorted(train.starts, perm, side="right") - 1) % ranks if sharded else None
            perm = dist.share(perm, owner)
        steps_per_epoch = math.ceil(perm.size / rank_batch)
        check = math.ceil(steps_per_epoch / evals)  # validate every `check` steps (and at the epoch end)
        t0, eval_time, m, stop = time.perf_counter(), 0.0, None, False
        bar = tqdm(total=perm.size, desc=f"epoch {epoch}/{cfg.epochs}", unit="row", unit_scale=True,
                   disable=not progress or not lead, leave=False, mininterval=0.5)
        bar.update(min(perm.size, pos.step * rank_batch))

        def make(step: int, perm: np.ndarray = perm) -> tuple:
            sel = np.sort(perm[step * rank_batch: (step + 1) * rank_batch])  # sorted: mmap locality
            idx, val, y = train(sel)
            if prefetch:
                model.premake_dropout(len(sel))
            return idx, val, y, (sparse.prepare(idx) if sparse else None)

        model.clear_premade()
        while pos.step < steps_per_epoch and not stop:
            # up to the next checkpoint: the loader thread stops there, so no dropout mask is drawn ahead
            end = steps_per_epoch if not every else min(steps_per_epoch, pos.step + every - pos.global_step % every)
            if evals > 1:  # and up to the next validation inside the epoch
                end = min(end, (pos.step // check + 1) * check)
            for idx, val, y, rows_inv in Prefetcher(make, end, threaded=prefetch, start=pos.step):
                if sparse:
                    sparse.begin(*rows_inv)
                with autocast(cfg.precision):
                    logit = model(idx, val).float()
                loss = loss_fn(logit, y)
                total = loss + emb_l2 * model.embedding_penalty(idx) if emb_l2 > 0 else loss
                opt.zero_grad(set_to_none=True)
                total.backward()
                loss_value = checked = loss.item()
                if ranks > 1:
                    for p in reduce:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                    mean_loss = loss.detach().reshape(1).clone()  # in the same all-reduce: every rank sees
                    dist.allreduce_mean([p.grad for p in reduce] + [mean_loss])  # a NaN on any rank
                    checked = mean_loss.item()
                if not math.isfinite(checked):  # before the update: the weights stay those of the last step
                    raise diverged(f"the training loss is {checked}", epoch, pos.step + 1)
                opt.step()
                if sparse:
                    sparse.step(dist.allgather_rows if ranks > 1 else None)
                pos.loss_sum += loss_value * len(y)
                pos.seen += len(y)
                pos.step += 1
                pos.global_step += 1
                if progress and (pos.step % 20 == 0 or pos.step == steps_per_epoch):
                    bar.update(min(perm.size, pos.step * rank_batch) - bar.n)
                    bar.set_postfix(loss=f"{pos.loss_sum / pos.seen:.4f}")
            if evals > 1 and pos.step < steps_per_epoch and pos.step % check == 0:
                t1 = time.perf_counter()
                m, stop = validate()
                eval_time += time.perf_counter() - t1
                model.train()
                if stop:  # early stop inside the epoch: the epoch record below closes it
                    break
            if every and pos.step < steps_per_epoch and pos.global_step % every == 0:
                save()
        bar.close()
        train_time = time.perf_counter() - t0 - eval_time
        rec: dict[str, Any] = {"epoch": epoch, "train_logloss": pos.loss_sum / pos.seen,
                               "train_seconds": train_time, "train_rows_per_s": pos.seen / train_time,
                               "lr": opt.param_groups[0]["lr"], "batch_size": batch_size}
        if valid is not None:
            if not stop:
                m, stop = validate()
            rec.update({f"valid_{k}": v for k, v in m.items()})
            # the validations of this epoch (deterministic from the step, so also right after a resume); the
            # best is in this epoch when fewer of them than that failed to improve
            done_checks = pos.step // check if pos.step < steps_per_epoch else (steps_per_epoch - 1) // check + 1
            rec["best_epoch"] = (None if best_state is None else epoch
                                 if (not pos.history and not validate_first) or pos.bad_epochs < min(done_checks, evals)
                                 else pos.history[-1]["best_epoch"] if pos.history else 0)
        elif ranks > 1:
            dist.allreduce_mean([b for b in model.buffers() if b.dtype.is_floating_point])
        pos.history.append(rec)
        if log_path is not None and lead:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if lead:
            _log(epoch_line(rec, cfg.epochs, pos.best), console=progress)
            if valid is not None and (stop or epoch >= cfg.epochs):
                kept = (f"keeping epoch {rec['best_epoch']} ({rec['valid_monitor']} {pos.best:.4f})"
                        if rec["best_epoch"] is not None else "no epoch improved: keeping the last weights")
                _log(f"stopped: no gain for {_validations(cfg.patience)}; {kept}" if stop else
                     f"finished {cfg.epochs} epochs; {kept}", console=progress)
        if on_epoch and lead:
            on_epoch(rec)
        pos.epoch, pos.step, pos.loss_sum, pos.seen, pos.done = epoch + 1, 0, 0.0, 0, stop or epoch >= cfg.epochs
        save()
    history = pos.history
    if best_state is not None:
        model.load_state_dict(best_state)
    return history
