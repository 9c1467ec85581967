"""Preprocessing fitted on the training split only, applied vectorised (Arrow compute + numpy).

Per field (see :mod:`deepfm.schema` for the options):
- vocabulary-backed fields (categorical, bucketized numeric, multi): index 0 = OOV (unseen or rarer than
  ``min_count``), 1 = MISSING, 2.. = vocabulary ordered by training count (desc), then value;
- hashed fields: 0 = OOV (unused), 1 = MISSING, 2 + fnv1a64(value) % hash_buckets;
- numeric fields: a float32 value after the transform, NaN when missing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepfm.data.readers import ReadResult, parallel_map
from deepfm.errors import DataError
from deepfm.schema import MISSING, N_RESERVED, OOV, Field, Schema, from_dict

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


def fnv1a64(arr: pa.Array) -> np.ndarray:
    """Stable 64-bit FNV-1a of each string (nulls hash as ""), vectorised over rows, looping over bytes."""
    arr = pc.cast(arr, pa.large_binary()).combine_chunks() if isinstance(arr, pa.ChunkedArray) else pc.cast(
        arr, pa.large_binary())
    arr = pc.fill_null(arr, b"")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset: arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(1, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(len(arr), FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(int(lengths.max(initial=0))):
            live = lengths > j
            b = data[np.minimum(starts + j, data.size - 1)].astype(np.uint64)
            h = np.where(live, (h ^ b) * FNV_PRIME, h)
    return h


def hash_collisions(distinct: pa.Array, buckets: int) -> dict[str, int]:
    """What hashing cost a field on its training values: the distinct values, the buckets they use, and the
    values that share a bucket with another (``collisions`` = distinct - buckets used)."""
    used = int(np.unique(fnv1a64(distinct) % np.uint64(buckets)).size) if len(distinct) else 0
    return {"distinct_values": len(distinct), "buckets_used": used, "collisions": len(distinct) - used}


def _numeric_transform(values: np.ndarray, f: Field, state: dict[str, Any]) -> np.ndarray:
    if f.transform == "log":  # sign(x) * log(1 + |x|), in float32 and in place
        out = np.abs(values, dtype=np.float32)
        np.log1p(out, out=out)
        return np.copysign(out, values.astype(np.float32, copy=False), out=out)
    if f.transform == "standardize":
        return (values - state["mean"]) / state["std"]
    return values


def _bucket_tokens(arr: pa.Array) -> pa.Array:
    """Criteo-winner bucketing: x > 2 -> floor(ln(x)^2), else floor(x); as string tokens, nulls kept."""
    x = arr.to_numpy(zero_copy_only=False).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.where(x > 2, np.floor(np.log(np.where(x > 2, x, 3.0)) ** 2), np.floor(x))
    mask = np.isnan(x)
    return pc.cast(pa.array(np.where(mask, 0, b).astype(np.int64), mask=mask), pa.string())


def _tokens(col: pa.Array, f: Field) -> pa.Array:
    """The strings a vocabulary-backed field indexes (bucketized numerics become tokens first)."""
    return _bucket_tokens(col) if f.kind == "numeric" else col


def _split_multi(col: pa.Array, f: Field) -> tuple[pa.Array, np.ndarray]:
    """-> (flat tokens with null for an empty list, lengths [N] >= 1). Lists are truncated to max_len."""
    lists = pc.split_pattern(pc.fill_null(col, ""), f.sep)
    lists = pc.list_slice(lists, 0, f.max_len)
    flat = pc.list_flatten(lists)
    flat = pc.if_else(pc.equal(flat, ""), pa.scalar(None, pa.string()), flat)
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    return flat, lengths  # split("") gives [""], so every row has >= 1 token (MISSING when empty)


def _lookup(tokens: pa.Array, f: Field, state: dict[str, Any]) -> np.ndarray:
    """Tokens -> int32 indices: vocab/hash, OOV for unseen, MISSING for null."""
    missing = pc.is_null(tokens).to_numpy(zero_copy_only=False)
    if f.hash_buckets is not None:
        idx = (fnv1a64(tokens) % np.uint64(f.hash_buckets)).astype(np.int64) + N_RESERVED
    else:
        pos = pc.index_in(tokens, value_set=state["_vocab_array"])
        idx = pc.fill_null(pos, OOV - N_RESERVED).to_numpy(zero_copy_only=False).astype(np.int64) + N_RESERVED
    idx[missing] = MISSING
    return idx.astype(np.int32)


def _rows(columns: list[np.ndarray], n: int, dtype: type) -> np.ndarray:
    """F columns of length n -> a C-contiguous [n, F] array."""
    if not columns:
        return np.empty((n, 0), dtype=dtype)
    return np.ascontiguousarray(np.array(columns, dtype=dtype).T)


def _vocab_order(values: pa.Array, counts: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    """Kept values ordered by training count (desc), then value -> (vocabulary as strings, the order:
    vocabulary position i holds values[order[i]])."""
    order = pc.sort_indices(pa.table({"c": -counts, "v": values}), sort_keys=[("c", "ascending"),
                                                                            ("v", "ascending")])
    return pc.cast(values.take(order), pa.string()), order.to_numpy()


def _fit_encode(tokens: pa.Array, min_count: int) -> tuple[dict[str, Any], np.ndarray]:
    """Vocabulary of one categorical column and the column encoded with it, from one dictionary encoding."""
    enc = pc.dictionary_encode(tokens)  # nulls stay null in the indices
    n_dict = len(enc.dictionary)
    codes = pc.fill_null(enc.indices, n_dict).to_numpy(zero_copy_only=False)
    counts = np.bincount(codes, minlength=n_dict + 1)[:n_dict]
    keep = np.flatnonzero(counts >= min_count)
    vocab, order = _vocab_order(enc.dictionary.take(pa.array(keep)), counts[keep])
    remap = np.full(n_dict + 1, OOV, dtype=np.int32)
    remap[keep[order]] = np.arange(len(order), dtype=np.int32) + N_RESERVED
    remap[n_dict] = MISSING
    return {"_vocab_array": vocab}, remap[codes]


@dataclass
class Encoded:
    """The columnar encoding of a table: what the store holds and the loader slices.

    cat:   int32 [N, F_cat] per-field indices (categorical and bucketized fields, schema order)
    num:   float32 [N, F_num] transformed values, NaN = missing
    multi: {field: (offsets int64 [N + 1], values int32 [total])} for multi-valued fields
    label: float32 [N] in {0, 1}, or None for unlabelled data
    """

    cat: np.ndarray
    num: np.ndarray
    multi: dict[str, tuple[np.ndarray, np.ndarray]]
    label: np.ndarray | None

    @property
    def rows(self) -> int:
        return int(self.cat.shape[0])


class Preprocessor:
    """Fit on training data (``fit``), then encode any split identically (``transform``)."""

    def __init__(self, schema: Schema, states: dict[str, dict[str, Any]] | None = None) -> None:
        self.schema = schema
        self.states = states or {}
        for st in self.states.values():
            if "vocab" in st:  # kept as an Arrow array only: a 10M-value Python list costs ~1 GB
                st["_vocab_array"] = pa.array(st.pop("vocab"), type=pa.string())

    # ------------------------------------------------------------------ fields by encoded kind
    def fields_of(self, kind: str) -> list[Field]:
        return [f for f in self.schema.fields if f.encoded_kind == kind]

    def vocab_size(self, f: Field) -> int:
        """Rows this field owns in the fused embedding table."""
        if f.encoded_kind == "num":
            return 2  # the value vector and the missing vector
        if f.hash_buckets is not None:
            return N_RESERVED + f.hash_buckets
        return N_RESERVED + len(self.states[f.name]["_vocab_array"])

    def vocab(self, name: str) -> list[str]:
        """The vocabulary of a vocabulary-backed field, index i -> table row i + N_RESERVED."""
        return self.states[name]["_vocab_array"].to_pylist()

    # ------------------------------------------------------------------ fit / transform
    def fit(self, data: ReadResult) -> Preprocessor:
        self._fit(data)
        return self

    def fit_transform(self, data: ReadResult) -> Encoded:
        """``fit(data).transform(data)`` in one pass: categorical columns are hashed once (dictionary
        encoding), counted from the codes and remapped, instead of hashed again by a vocabulary lookup."""
        codes = self._fit(data)
        return self.transform(data, codes)

    def _fit_field(self, f: Field, col: pa.Array) -> tuple[dict[str, Any], np.ndarray | None]:
        if f.encoded_kind == "num":
            if f.transform != "standardize":
                return {}, None
            x = col.to_numpy(zero_copy_only=False).astype(np.float64)
            x = x[~np.isnan(x)]
            mean = float(x.mean()) if x.size else 0.0
            std = float(x.std()) if x.size else 1.0
            return {"mean": mean, "std": std if std > 0 else 1.0}, None
        if f.hash_buckets is not None:
            tokens = _tokens(col, f) if f.encoded_kind == "cat" else _split_multi(col, f)[0]
            return hash_collisions(pc.unique(tokens.filter(pc.is_valid(tokens))), f.hash_buckets), None
        if f.encoded_kind == "cat":
            return _fit_encode(_tokens(col, f), f.min_count)
        vc = pc.value_counts(_split_multi(col, f)[0])
        values, counts = vc.field("values"), vc.field("counts").to_numpy()
        keep = (counts >= f.min_count) & ~pc.is_null(values).to_numpy(zero_copy_only=False)
        return {"_vocab_array": _vocab_order(values.filter(pa.array(keep)), counts[keep])[0]}, None

    def _fit(self, data: ReadResult) -> dict[str, np.ndarray]:
        """Fit the states; returns the encoded columns of the fields encoded on the way (see fit_transform).
        Fields are independent, so they run on a thread per core (Arrow and numpy release the GIL)."""
        if data.rows == 0:
            raise DataError("cannot fit preprocessing on zero rows", path=data.path)
        fields = list(self.schema.fields)
        done = parallel_map(lambda f: self._fit_field(f, data.table.column(f.source).combine_chunks()), fields)
        self.states = {f.name: st for f, (st, _) in zip(fields, done, strict=True)}
        return {f.name: enc for f, (_, enc) in zip(fields, done, strict=True) if enc is not None}

    def transform(self, data: ReadResult, _done: dict[str, np.ndarray] | None = None) -> Encoded:
        if not self.states and self.schema.fields:
            raise DataError("the preprocessor is not fitted: call fit() on the training data first")
        n = data.rows
        cat_fields, num_fields = self.fields_of("cat"), self.fields_of("num")
        done = _done or {}

        def cat_column(f: Field) -> np.ndarray:
            if f.name in done:
                return done[f.name]
            return _lookup(_tokens(data.table.column(f.source).combine_chunks(), f), f, self.states[f.name])

        def num_column(f: Field) -> np.ndarray:
            x = data.table.column(f.source).combine_chunks().to_numpy(zero_copy_only=False)
            return _numeric_transform(x.astype(np.float64, copy=False), f, self.states[f.name])

        # columns are built side by side, then transposed once into row-major [N, F] (rows are what the
        # loader slices); that is faster than writing each column with a stride
        cat = _rows(parallel_map(cat_column, cat_fields), n, np.int32)
        num = _rows(parallel_map(num_column, num_fields), n, np.float32)
        multi = {}
        for f in self.fields_of("multi"):
            flat, lengths = _split_multi(data.table.column(f.source).combine_chunks(), f)
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            multi[f.name] = (offsets, _lookup(flat, f, self.states[f.name]))
        return Encoded(cat=cat, num=num, multi=multi, label=data.label)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        states = {}
        for k, v in self.states.items():
            states[k] = {kk: vv for kk, vv in v.items() if not kk.startswith("_")}
            if "_vocab_array" in v:
                states[k]["vocab"] = v["_vocab_array"].to_pylist()
        return {"schema": self.schema.to_dict(), "states": states}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        return cls(from_dict(d["schema"], source="preprocessor"), d["states"])

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
