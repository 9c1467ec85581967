"""The training loop: seeded shuffling, slicing batches from the store, early stopping on validation AUC
with the best weights restored, optional LR reduction on plateau, a progress bar and a JSONL log."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
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

from deepfm.data.store import Batcher
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
    patience: int = 2  # epochs without improvement of the monitored metric before stopping
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
        cfg = cls(**d)
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


def _log(msg: str) -> None:
    tqdm.write(f"[deepfm] {msg}", file=sys.stderr)


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

    def _run(self) -> None:
        try:
            for step in range(self.start, self.n):
                item = (True, self.make(step))
                while not self.stop.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self.q.put((False, e))

    def __iter__(self) -> Iterator[Any]:
        if not self.threaded:
            for step in range(self.start, self.n):
                yield self.make(step)
            return
        t = threading.Thread(target=self._run, daemon=True, name="deepfm-prefetch")
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


def sigmoid(x: np.ndarray) -> np.ndarray:
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
        raise ValueError("no training rows")
    emb_l2 = model.cfg.embedding_l2
    sparse = None
    if uses_sparse_update(model, cfg.embedding_update):
        sparse = SparseEmbeddings(model, cfg.lr)
    tables = {id(t.weight) for t in sparse.tables} if sparse else set()
    named = [(n, p) for n, p in model.named_parameters() if id(p) not in tables]
    dense = [p for n, p in named if n.startswith("dnn.")]
    other = [p for n, p in named if not n.startswith("dnn.")]
    # fused: one kernel per tensor for the whole Adam update (half the foreach time on CPU); same algorithm
    opt = torch.optim.Adam([{"params": other}, {"params": dense, "weight_decay": model.cfg.net_l2}], lr=cfg.lr,
                           fused=True)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(cfg.seed)  # the epoch order: the same on every rank
    ranks, lead = dist.world(), dist.rank() == 0
    if ranks > 1:
        torch.manual_seed(cfg.seed + 7919 * dist.rank())  # dropout masks differ per rank; the init did not
        reduce = [p for p in model.parameters() if id(p) not in tables and p.requires_grad]
    pos, best_state = Position(), None
    if resume and checkpoints is not None:
        found = checkpoints.latest(warn=_log)
        if found is None:
            _log(f"no checkpoint in {checkpoints.dir}: starting from the beginning")
        else:
            pos, best_state = checkpoints.restore(*found, model, opt, sparse, rng)
            _log(f"resuming from {found[0].name}: epoch {pos.epoch}, step {pos.step}")
    if progress and lead and next(model.parameters()).device.type == "cpu":
        _log(f"fused CPU kernels: {kernels.status()}")  # built (once per machine) on first use
    if log_path is not None and lead:  # the log holds exactly the epochs of the history (rewritten on resume)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in pos.history))
    batch_size = resolve_batch_size(cfg.batch_size, n_rows)
    rank_batch = max(1, batch_size // ranks)  # the global batch stays batch_size rows
    every = checkpoints.every if checkpoints is not None else 0

    def save() -> None:
        if checkpoints is not None and lead:
            checkpoints.save(model, opt, sparse, best_state, rng, pos)

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
        t0 = time.perf_counter()
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
        while pos.step < steps_per_epoch:
            # up to the next checkpoint: the loader thread stops there, so no dropout mask is drawn ahead
            end = steps_per_epoch if not every else min(steps_per_epoch, pos.step + every - pos.global_step % every)
            for idx, val, y, rows_inv in Prefetcher(make, end, threaded=prefetch, start=pos.step):
                if sparse:
                    sparse.begin(*rows_inv)
                with autocast(cfg.precision):
                    logit = model(idx, val).float()
                loss = loss_fn(logit, y)
                total = loss + emb_l2 * model.embedding_penalty(idx) if emb_l2 > 0 else loss
                opt.zero_grad(set_to_none=True)
                total.backward()
                if ranks > 1:
                    for p in reduce:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                    dist.allreduce_mean([p.grad for p in reduce])
                opt.step()
                if sparse:
                    sparse.step(dist.allgather_rows if ranks > 1 else None)
                pos.loss_sum += loss.item() * len(y)
                pos.seen += len(y)
                pos.step += 1
                pos.global_step += 1
                if progress and (pos.step % 20 == 0 or pos.step == steps_per_epoch):
                    bar.update(min(perm.size, pos.step * rank_batch) - bar.n)
                    bar.set_postfix(loss=f"{pos.loss_sum / pos.seen:.4f}")
            if every and pos.step < steps_per_epoch and pos.global_step % every == 0:
                save()
        bar.close()
        train_time = time.perf_counter() - t0
        rec: dict[str, Any] = {"epoch": epoch, "train_logloss": pos.loss_sum / pos.seen,
                               "train_seconds": train_time, "train_rows_per_s": pos.seen / train_time,
                               "lr": opt.param_groups[0]["lr"], "batch_size": batch_size}
        stop = False
        if valid is not None:
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
            rec.update({f"valid_{k}": v for k, v in m.items()})
            value = m["auc"] - (m["logloss"] if cfg.monitor == "auc-logloss" else 0.0)
            improved = value > pos.best + 1e-6
            if improved:
                pos.best, pos.bad_epochs = value, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                pos.bad_epochs += 1
            rec["best_epoch"] = epoch if improved else pos.history[-1]["best_epoch"]
            if pos.bad_epochs >= cfg.patience:
                if cfg.reduce_lr_on_plateau and not pos.reduced:
                    pos.reduced, pos.bad_epochs = True, 0
                    model.load_state_dict(best_state)
                    for g in opt.param_groups:
                        g["lr"] *= 0.1
                    if sparse:
                        sparse.lr *= 0.1
                else:
                    stop = True
        elif ranks > 1:
            dist.allreduce_mean([b for b in model.buffers() if b.dtype.is_floating_point])
        pos.history.append(rec)
        if log_path is not None and lead:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if on_epoch and lead:
            on_epoch(rec)
        pos.epoch, pos.step, pos.loss_sum, pos.seen, pos.done = epoch + 1, 0, 0.0, 0, stop or epoch >= cfg.epochs
        save()
    history = pos.history
    if best_state is not None:
        model.load_state_dict(best_state)
    return history
