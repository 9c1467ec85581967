"""Out-of-core data: preprocessing fitted in one streaming pass, an encoded store written as shards, and a
batcher that trains from shards with memory bounded by a few of them.

    pass 1  read the file in blocks; count every vocabulary field's values (Arrow value_counts per block,
            merged when the partial counts grow), keep running moments for standardised numerics;
            hashed fields need nothing. Memory: the distinct values, not the rows.
    pass 2  read again; encode each block with the fitted preprocessing; append rows to the current train
            or valid shard; write a shard (atomically, like every store) each ``shard_rows`` rows.
    train   each epoch visits the shards in a seeded random order and the rows of each shard in a seeded
            random permutation (``ShardSet.epoch_order``); ``ShardBatcher`` loads the shards a batch needs
            and keeps the last two in memory.

The validation split is a seeded hash of the row's position in the file (the in-memory path draws an exact
permutation instead): a block can be assigned without seeing the others.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from deepfm import outputs
from deepfm.data import readers
from deepfm.data.preprocess import Encoded, Preprocessor, _bucket_tokens, _split_multi, _vocab_order, hash_collisions
from deepfm.data.store import Batcher, FieldSpec, open_store, save_store
from deepfm.errors import DataError
from deepfm.schema import Schema

SHARDS_VERSION = 1


def valid_mask(first_row: int, n: int, fraction: float, seed: int) -> np.ndarray:
    """bool [n]: which of the file's rows ``first_row .. first_row + n`` go to validation (splitmix64 of
    the row number and the seed, so any block is assigned on its own, identically in both passes)."""
    if fraction <= 0:
        return np.zeros(n, dtype=bool)
    x = np.arange(first_row, first_row + n, dtype=np.uint64) + np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53) < fraction


class _Counts:
    """Running value counts of one field: per-block value_counts, merged once the pending ones outgrow
    the merged table (so each value is re-aggregated O(log) times, not once per block)."""

    def __init__(self) -> None:
        self.merged: pa.Table | None = None
        self.pending: list[pa.Table] = []
        self.pending_rows = 0

    def add(self, tokens: pa.Array) -> None:
        vc = pc.value_counts(tokens.filter(pc.is_valid(tokens)))
        t = pa.table({"v": vc.field("values"), "c": vc.field("counts")})
        self.pending.append(t)
        self.pending_rows += t.num_rows
        if self.pending_rows > max(1 << 20, 2 * (self.merged.num_rows if self.merged is not None else 0)):
            self._merge()

    def _merge(self) -> None:
        parts = ([self.merged] if self.merged is not None else []) + self.pending
        if parts:
            t = pa.concat_tables(parts).group_by("v").aggregate([("c", "sum")])
            self.merged = t.rename_columns(["v", "c"])
        self.pending, self.pending_rows = [], 0

    def vocab(self, min_count: int) -> pa.Array:
        self._merge()
        if self.merged is None or self.merged.num_rows == 0:
            return pa.array([], type=pa.string())
        counts = self.merged.column("c").to_numpy()
        keep = counts >= min_count
        values = self.merged.column("v").combine_chunks().filter(pa.array(keep))
        return _vocab_order(values, counts[keep])[0]


class _Moments:
    """Count, mean and M2 merged block by block (Chan et al.), for ``standardize``."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: np.ndarray) -> None:
        x = x[~np.isnan(x)]
        if x.size == 0:
            return
        n_b, mean_b = x.size, float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n

    def state(self) -> dict[str, float]:
        std = (self.m2 / self.n) ** 0.5 if self.n else 1.0
        return {"mean": self.mean if self.n else 0.0, "std": std if std > 0 else 1.0}


def fit_streaming(blocks: Callable[[], Iterator[readers.ReadResult]], schema: Schema, valid_fraction: float = 0.0,
                  seed: int = 0) -> tuple[Preprocessor, dict[str, Any]]:
    """Fit preprocessing over the training rows of ``blocks()`` in one pass; returns it and the counts
    (rows, skipped rows, train/valid rows)."""
    counts: dict[str, _Counts] = {}
    moments: dict[str, _Moments] = {}
    for f in schema.fields:
        if f.encoded_kind != "num":  # hashed fields too: their distinct values give the collision count
            counts[f.name] = _Counts()
        elif f.encoded_kind == "num" and f.transform == "standardize":
            moments[f.name] = _Moments()
    done, n_valid, skipped, has_label = 0, 0, 0, True
    for block in blocks():
        mask = valid_mask(done, block.rows, valid_fraction, seed)
        done += block.rows
        n_valid += int(mask.sum())
        skipped = block.skipped.count
        has_label = has_label and block.label is not None
        table = block.table.filter(pa.array(~mask)) if mask.any() else block.table
        for f in schema.fields:
            col = table.column(f.source).combine_chunks()
            if f.name in counts:
                tokens = (_bucket_tokens(col) if f.kind == "numeric" else
                          _split_multi(col, f)[0] if f.encoded_kind == "multi" else col)
                counts[f.name].add(tokens)
            elif f.name in moments:
                moments[f.name].add(col.to_numpy(zero_copy_only=False).astype(np.float64))
    if done - n_valid == 0:
        raise DataError("no training rows to fit preprocessing on")
    if not has_label:
        raise DataError("training data has no label column")
    states: dict[str, dict[str, Any]] = {f.name: {} for f in schema.fields}
    for name, c in counts.items():
        f = schema.field(name)
        if f.hash_buckets is not None:
            states[name] = hash_collisions(c.vocab(1), f.hash_buckets)
        else:
            states[name] = {"_vocab_array": c.vocab(f.min_count)}
    for name, m in moments.items():
        states[name] = m.state()
    pre = Preprocessor(schema)
    pre.states = states
    return pre, {"rows": done, "skipped_rows": skipped, "train_rows": done - n_valid, "valid_rows": n_valid}


# ---------------------------------------------------------------------------------------------- shards
def _concat(parts: list[Encoded]) -> Encoded:
    if len(parts) == 1:
        return parts[0]
    multi = {}
    for name in parts[0].multi:
        offs, vals, base = [np.zeros(1, dtype=np.int64)], [], 0
        for p in parts:
            off, val = p.multi[name]
            offs.append(off[1:] + base)
            vals.append(val)
            base += int(off[-1])
        multi[name] = (np.concatenate(offs), np.concatenate(vals))
    label = None if parts[0].label is None else np.concatenate([p.label for p in parts])
    return Encoded(np.concatenate([p.cat for p in parts]), np.concatenate([p.num for p in parts]), multi, label)


def _take(enc: Encoded, rows: np.ndarray) -> Encoded:
    multi = {}
    for name, (off, val) in enc.multi.items():
        lengths = (off[1:] - off[:-1])[rows]
        new_off = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=new_off[1:])
        starts = np.repeat(off[:-1][rows], lengths)
        within = np.arange(int(new_off[-1])) - np.repeat(new_off[:-1], lengths)
        multi[name] = (new_off, val[starts + within])
    return Encoded(enc.cat[rows], enc.num[rows], multi, None if enc.label is None else enc.label[rows])


class _ShardWriter:
    def __init__(self, directory: Path, shard_rows: int) -> None:
        self.dir, self.shard_rows = directory, shard_rows
        self.parts: list[Encoded] = []
        self.buffered = 0
        self.sizes: list[int] = []

    def add(self, enc: Encoded) -> None:
        if enc.rows == 0:
            return
        self.parts.append(enc)
        self.buffered += enc.rows
        while self.buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, n: int) -> None:
        enc = _concat(self.parts)
        head = _take(enc, np.arange(n)) if n < enc.rows else enc
        save_store(head, self.dir / f"shard-{len(self.sizes):05d}")
        self.sizes.append(n)
        self.parts = [_take(enc, np.arange(n, enc.rows))] if n < enc.rows else []
        self.buffered = enc.rows - n

    def close(self) -> list[int]:
        if self.buffered:
            self._flush(self.buffered)
        return self.sizes


def write_shards(blocks: Iterator[readers.ReadResult], pre: Preprocessor, out: Path, valid_fraction: float = 0.0,
                 seed: int = 0, shard_rows: int = 1_000_000) -> dict[str, Any]:
    """Encode every block and write ``out/train`` (and ``out/valid``) shards; returns the manifest."""
    tmp = outputs.temp_dir(out)
    try:
        writers = {"train": _ShardWriter(tmp / "train", shard_rows)}
        if valid_fraction > 0:
            writers["valid"] = _ShardWriter(tmp / "valid", shard_rows)
        done = 0
        for block in blocks:
            mask = valid_mask(done, block.rows, valid_fraction, seed)
            done += block.rows
            enc = pre.transform(block)
            if mask.any():
                writers["valid"].add(_take(enc, np.flatnonzero(mask)))
                writers["train"].add(_take(enc, np.flatnonzero(~mask)))
            else:
                writers["train"].add(enc)
        manifest = {"version": SHARDS_VERSION, "rows": done,
                    **{split: w.close() for split, w in writers.items()}}
        (tmp / "shards.json").write_text(json.dumps(manifest))
        outputs.publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


@dataclass
class ShardSet:
    """The shards of one split: folders ``shard-NNNNN`` (each a store, see data.store) and their sizes."""

    directory: Path
    sizes: list[int]

    @classmethod
    def open(cls, root: Path, split: str) -> ShardSet | None:
        try:
            manifest = json.loads((root / "shards.json").read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read the shard manifest: {e}", path=str(root / "shards.json")) from None
        sizes = manifest.get(split)
        if not sizes:
            return None
        return cls(root / split, list(sizes))

    @property
    def rows(self) -> int:
        return int(sum(self.sizes))

    @property
    def starts(self) -> np.ndarray:
        return np.r_[0, np.cumsum(self.sizes)[:-1]].astype(np.int64)

    def load(self, i: int) -> Encoded:
        """Shard ``i`` read into memory (not mapped: its pages leave the process when it is dropped)."""
        path = self.directory / f"shard-{i:05d}"
        try:
            enc = open_store(path)
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"missing or corrupt shard: {e}", path=str(path),
                            hint="re-run preprocessing (delete the shard folder or the cache entry)") from None
        if enc.rows != self.sizes[i]:
            raise DataError(f"shard has {enc.rows} rows, the manifest says {self.sizes[i]}", path=str(path),
                            hint="re-run preprocessing")
        return Encoded(np.array(enc.cat), np.array(enc.num),
                       {k: (np.array(o), np.array(v)) for k, (o, v) in enc.multi.items()},
                       None if enc.label is None else np.array(enc.label))

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        """Global row ids for one epoch: shards in random order, each shard's rows permuted."""
        starts = self.starts
        order = rng.permutation(len(self.sizes))
        return np.concatenate([starts[i] + rng.permutation(self.sizes[i]) for i in order])

    def labels(self) -> np.ndarray:
        return np.concatenate([np.load(self.directory / f"shard-{i:05d}" / "label.npy")
                               for i in range(len(self.sizes))]).astype(np.float32)


class ShardBatcher:
    """``Batcher`` over a :class:`ShardSet`: rows are global ids (sorted within a batch); a batch reads the
    shards it touches, and the two most recently used shards stay in memory."""

    def __init__(self, shards: ShardSet, fields: list[FieldSpec], cache: int = 2) -> None:
        self.shards, self.fields, self.cache = shards, fields, cache
        self.loaded: OrderedDict[int, Batcher] = OrderedDict()
        self.starts = shards.starts
        self._labels: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return self.shards.rows

    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = self.shards.labels()
        return self._labels

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        return self.shards.epoch_order(rng)

    def _shard(self, i: int) -> Batcher:
        b = self.loaded.pop(i, None)
        if b is None:
            b = Batcher(self.shards.load(i), self.fields)
            while len(self.loaded) >= self.cache:
                self.loaded.popitem(last=False)
        self.loaded[i] = b
        return b

    def __call__(self, rows: np.ndarray | slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.rows))
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        cuts = np.flatnonzero(np.diff(shard)) + 1
        parts = [self._shard(int(shard[s]))(rows[s:e] - self.starts[shard[s]])
                 for s, e in zip(np.r_[0, cuts], np.r_[cuts, rows.size], strict=True)]
        if len(parts) == 1:
            return parts[0]
        y = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), y

