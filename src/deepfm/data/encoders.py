"""One encoder per field kind, with the batch path and the one-row path side by side.

Every encoder turns a field's raw values into the model's input slots ``(idx, val)`` two ways:

- the column path (training, ``deepfm predict``, ``evaluate``): an Arrow column at a time, vectorised with
  Arrow compute and numpy (no per-row Python): ``fit(col)``, ``transform(col)`` (the compact form the store
  holds) and ``encode_column(col) -> (idx [N, slots] int64, val [N, slots] float32)``;
- the value path (the server, ``Predictor.predict_records``): Python values, a request's 1-100 rows, where
  Arrow's per-call cost (~15 ms for one row) would dominate: ``encode_values(values)`` and
  ``encode_value(v)``, with the same ``(idx, val)``.

The two sit next to each other so that they read as one rule; ``tests/test_encoders.py`` checks that
``encode_value(v) == encode_column([v])`` for every kind on hostile values. What both share is written
once: the numeric transforms and the bucketing are numpy functions of float64 arrays (a request's values
go through the very same calls), and the FNV-1a hash is one definition over bytes.

Values are what the readers produce (and what ``serve.records`` turns JSON into): a string or None (missing)
for categorical and multi fields (a multi field's value path also takes a list of tokens), a float for
numeric ones (None or NaN = missing). Empty strings are normalised to missing by the readers and by
``serve.records``, not here.

Indices, per vocabulary-backed field (categorical, bucketized numeric, multi): 0 = OOV (unseen, or rarer
than ``min_count``), 1 = MISSING, 2.. = vocabulary ordered by training count (desc), then value. Hashed
fields: 1 = MISSING, 2 + fnv1a64(token) % hash_buckets. Numeric fields: slot index 0 with the transformed
value, or 1 (the field's missing vector) with value 1.

States (``state``, ``to_dict``/``from_dict``) are the per-field entries of ``preprocessor.json``: ``{"vocab":
[...]}`` (kept in memory as the Arrow array ``_vocab_array``: a 10M-value Python list costs ~1 GB),
``{"mean", "std"}`` for standardize, the hash collision counts for hashed fields, ``{}`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepfm.schema import MISSING, N_RESERVED, OOV, Field

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)
_MASK64 = (1 << 64) - 1
_INT64_MIN = -(2.0 ** 63)  # exactly representable: the smallest bucket id (numpy's cast gives it too)

Slots = tuple[np.ndarray, np.ndarray]  # (idx [N, slots] int64, val [N, slots] float32)


# ---------------------------------------------------------------------------------------------- hashing
def fnv1a64(arr: pa.Array) -> np.ndarray:
    """Column path: stable 64-bit FNV-1a of each string's UTF-8 bytes (nulls hash as ""), vectorised over
    rows, looping over byte positions."""
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


def fnv1a64_str(s: str) -> int:
    """Value path: the same hash of one string (a lone surrogate, which JSON allows and Arrow text never
    holds, is hashed as its surrogatepass bytes)."""
    h, prime = int(FNV_OFFSET), int(FNV_PRIME)
    for b in s.encode("utf-8", "surrogatepass"):
        h = ((h ^ b) * prime) & _MASK64
    return h


def hash_collisions(distinct: pa.Array, buckets: int) -> dict[str, int]:
    """What hashing cost a field on its training values: the distinct values, the buckets they use, and the
    values that share a bucket with another (``collisions`` = distinct - buckets used)."""
    used = int(np.unique(fnv1a64(distinct) % np.uint64(buckets)).size) if len(distinct) else 0
    return {"distinct_values": len(distinct), "buckets_used": used, "collisions": len(distinct) - used}


# ---------------------------------------------------------------------------------------------- numbers
def numeric_transform(values: np.ndarray, transform: str, state: dict[str, Any]) -> np.ndarray:
    """Both paths: a numeric field's float64 values (any shape; NaN = missing, kept NaN) after its transform."""
    if transform == "log":  # sign(x) * log(1 + |x|), in float32 and in place
        out = np.abs(values, dtype=np.float32)
        np.log1p(out, out=out)
        return np.copysign(out, values.astype(np.float32, copy=False), out=out)
    if transform == "standardize":
        return (values - state["mean"]) / state["std"]
    return values


def bucket_ids(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both paths: Criteo-winner bucketing of float64 values: x > 2 -> floor(ln(x)^2), else floor(x)
    (clipped at -2^63, as an int64 holds it) -> (int64 bucket ids, 0 where missing; the missing mask)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.where(x > 2, np.floor(np.log(np.where(x > 2, x, 3.0)) ** 2), np.floor(x))
    mask = np.isnan(x)
    return np.where(mask, 0, np.maximum(b, _INT64_MIN)).astype(np.int64), mask


def bucket_tokens(col: pa.Array) -> pa.Array:
    """Column path: a numeric column -> its bucket ids as string tokens, nulls kept."""
    b, mask = bucket_ids(_float64(col))
    return pc.cast(pa.array(b, mask=mask), pa.string())


def _float64(col: pa.Array) -> np.ndarray:
    return col.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _floats(values: Sequence[Any]) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


# ---------------------------------------------------------------------------------------------- slots
def num_slots(t: np.ndarray) -> Slots:
    """Transformed values [N] or [N, k] (float32; NaN = missing) -> their slots: (0, x), or (1, 1.0) for the
    field's missing vector."""
    missing = np.isnan(t)
    return missing.astype(np.int64), np.where(missing, np.float32(1.0), t).astype(np.float32)


def multi_slots(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray, max_len: int, pooling: str) -> Slots:
    """A multi field's stored lists (``offsets`` [N + 1], ``values``) at ``rows`` -> ``max_len`` slots each:
    the tokens, then MISSING with value 0 as padding; mean pooling puts 1/len in the values so that summing
    the slots pools the field."""
    start, length = offsets[rows], offsets[rows + 1] - offsets[rows]
    pos = np.arange(max_len)
    live = pos[None, :] < length[:, None]
    gather = np.where(live, start[:, None] + pos[None, :], 0)
    idx = np.where(live, values[gather] if values.size else 0, MISSING).astype(np.int64)
    w = live / length[:, None] if pooling == "mean" else live.astype(np.float64)
    return idx, w.astype(np.float32)


# ---------------------------------------------------------------------------------------------- indices
def vocab_order(values: pa.Array, counts: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    """Kept values ordered by training count (desc), then value -> (vocabulary as strings, the order:
    vocabulary position i holds values[order[i]])."""
    order = pc.sort_indices(pa.table({"c": -counts, "v": values}), sort_keys=[("c", "ascending"),
                                                                            ("v", "ascending")])
    return pc.cast(values.take(order), pa.string()), order.to_numpy()


class Vocabulary:
    """Token -> 2 + its position in the training vocabulary; OOV when unseen, MISSING for None/null."""

    def __init__(self, array: pa.Array) -> None:
        self.array = array
        self._map: dict[str | None, int] | None = None

    @property
    def size(self) -> int:
        return N_RESERVED + len(self.array)

    @staticmethod
    def fit(tokens: pa.Array, min_count: int) -> dict[str, Any]:
        vc = pc.value_counts(tokens)
        values, counts = vc.field("values"), vc.field("counts").to_numpy()
        keep = (counts >= min_count) & ~pc.is_null(values).to_numpy(zero_copy_only=False)
        return {"_vocab_array": vocab_order(values.filter(pa.array(keep)), counts[keep])[0]}

    @staticmethod
    def fit_encode(tokens: pa.Array, min_count: int) -> tuple[dict[str, Any], np.ndarray]:
        """The vocabulary and the tokens encoded with it, from one dictionary encoding (the tokens are
        hashed once, instead of again by a lookup)."""
        enc = pc.dictionary_encode(tokens)  # nulls stay null in the indices
        n_dict = len(enc.dictionary)
        codes = pc.fill_null(enc.indices, n_dict).to_numpy(zero_copy_only=False)
        counts = np.bincount(codes, minlength=n_dict + 1)[:n_dict]
        keep = np.flatnonzero(counts >= min_count)
        vocab, order = vocab_order(enc.dictionary.take(pa.array(keep)), counts[keep])
        remap = np.full(n_dict + 1, OOV, dtype=np.int32)
        remap[keep[order]] = np.arange(len(order), dtype=np.int32) + N_RESERVED
        remap[n_dict] = MISSING
        return {"_vocab_array": vocab}, remap[codes]

    def column(self, tokens: pa.Array) -> np.ndarray:
        """Column path: string tokens -> int32 indices."""
        missing = pc.is_null(tokens).to_numpy(zero_copy_only=False)
        pos = pc.index_in(tokens, value_set=self.array)
        idx = pc.fill_null(pos, OOV - N_RESERVED).to_numpy(zero_copy_only=False).astype(np.int64) + N_RESERVED
        idx[missing] = MISSING
        return idx.astype(np.int32)

    @property
    def lookup(self) -> dict[str | None, int]:
        """token -> index (None -> MISSING), built on first use: a vocabulary is an Arrow array otherwise."""
        if self._map is None:
            d: dict[str | None, int] = {v: i + N_RESERVED for i, v in enumerate(self.array.to_pylist())}
            d[None] = MISSING
            self._map = d
        return self._map

    def values(self, tokens: Sequence[str | None]) -> list[int]:
        """Value path: tokens -> indices."""
        get = self.lookup.get
        return [get(t, OOV) for t in tokens]


class Hashing:
    """Token -> 2 + fnv1a64(token) % buckets; MISSING for None/null (OOV is unused)."""

    def __init__(self, buckets: int) -> None:
        self.buckets = buckets

    @property
    def size(self) -> int:
        return N_RESERVED + self.buckets

    def fit(self, tokens: pa.Array) -> dict[str, Any]:
        return hash_collisions(pc.unique(tokens.filter(pc.is_valid(tokens))), self.buckets)

    def column(self, tokens: pa.Array) -> np.ndarray:
        missing = pc.is_null(tokens).to_numpy(zero_copy_only=False)
        idx = (fnv1a64(tokens) % np.uint64(self.buckets)).astype(np.int64) + N_RESERVED
        idx[missing] = MISSING
        return idx.astype(np.int32)

    def values(self, tokens: Sequence[str | None]) -> list[int]:
        b = self.buckets
        return [MISSING if t is None else N_RESERVED + fnv1a64_str(t) % b for t in tokens]


# ---------------------------------------------------------------------------------------------- encoders
def state_to_dict(state: dict[str, Any]) -> dict[str, Any]:
    """A fitted state -> its preprocessor.json entry (the vocabulary as a list of strings)."""
    out = {k: v for k, v in state.items() if not k.startswith("_")}
    if "_vocab_array" in state:
        out["vocab"] = state["_vocab_array"].to_pylist()
    return out


def state_from_dict(d: dict[str, Any]) -> dict[str, Any]:
    """A preprocessor.json entry -> the in-memory state, in place: the vocabulary list is replaced by an
    Arrow array (so that the list, ~100 bytes a value, can be freed as soon as it is converted)."""
    if "vocab" in d:
        d["_vocab_array"] = pa.array(d.pop("vocab"), type=pa.string())
    return d


class Encoder:
    """One field's encoding: fitted on the training column, then applied to columns or to single values.

    ``kind`` is how the field is stored and embedded (``cat``, ``num`` or ``multi``: see ``deepfm.layout``);
    ``slots`` the model input slots it fills; ``size`` its rows in the fused embedding table. ``state`` is
    None until fitted (or given, e.g. from ``preprocessor.json``).
    """

    kind: ClassVar[str]

    def __init__(self, field: Field, state: dict[str, Any] | None = None) -> None:
        self.field = field
        self.state = state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.field.name!r})"

    @property
    def slots(self) -> int:
        return 1

    @property
    def size(self) -> int:
        raise NotImplementedError

    # column path
    def fit(self, col: pa.Array) -> Encoder:
        self.fit_transform(col)
        return self

    def fit_transform(self, col: pa.Array) -> Any:
        """Fit on the training column and return it transformed (cheaper than fit then transform where the
        fit computes the encoding on the way)."""
        raise NotImplementedError

    def transform(self, col: pa.Array) -> Any:
        """The column in the store's compact form (see ``preprocess.Encoded``)."""
        raise NotImplementedError

    def encode_column(self, col: pa.Array) -> Slots:
        """Column path: an Arrow column -> ``(idx [N, slots] int64, val [N, slots] float32)``."""
        raise NotImplementedError

    # value path
    def encode_values(self, values: Sequence[Any]) -> Slots:
        """Value path: a few Python values (one per row) -> ``(idx [n, slots] int64, val [n, slots] float32)``."""
        raise NotImplementedError

    def encode_value(self, v: Any) -> Slots:
        """Value path: one value -> ``(idx [slots] int64, val [slots] float32)``."""
        idx, val = self.encode_values([v])
        return idx[0], val[0]

    # persistence: the field's entry in preprocessor.json
    def to_dict(self) -> dict[str, Any]:
        return state_to_dict(self.state or {})

    @staticmethod
    def from_dict(field: Field, d: dict[str, Any]) -> Encoder:
        return encoder_for(field, state_from_dict(dict(d)))


class NumericEncoder(Encoder):
    """A numeric field (transform none, log or standardize): one slot holding the transformed value, or the
    field's missing vector. Store form: float [N], NaN = missing."""

    kind = "num"

    @property
    def size(self) -> int:
        return 2  # the value vector and the missing vector

    def fit(self, col: pa.Array) -> NumericEncoder:
        st: dict[str, Any] = {}
        if self.field.transform == "standardize":  # the only fitted transform
            x = _float64(col)
            x = x[~np.isnan(x)]
            std = float(x.std()) if x.size else 1.0
            st = {"mean": float(x.mean()) if x.size else 0.0, "std": std if std > 0 else 1.0}
        self.state = st
        return self

    def fit_transform(self, col: pa.Array) -> np.ndarray:
        return self.fit(col).transform(col)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Both paths: float64 values (NaN = missing) -> transformed (float32 once stored)."""
        return numeric_transform(x, self.field.transform, self.state or {})

    def transform(self, col: pa.Array) -> np.ndarray:
        return self.apply(_float64(col))

    def encode_column(self, col: pa.Array) -> Slots:
        idx, val = num_slots(self.transform(col).astype(np.float32))
        return idx[:, None], val[:, None]

    def encode_values(self, values: Sequence[float | None]) -> Slots:
        idx, val = num_slots(self.apply(_floats(values)).astype(np.float32))
        return idx[:, None], val[:, None]


class CategoricalEncoder(Encoder):
    """A categorical field with a vocabulary: one slot, value 1. Store form: int32 [N]."""

    kind = "cat"

    def __init__(self, field: Field, state: dict[str, Any] | None = None) -> None:
        super().__init__(field, state)
        self._index: Vocabulary | Hashing | None = None

    @property
    def index(self) -> Vocabulary | Hashing:
        """How tokens become indices (vocabulary here, hashing in :class:`HashedEncoder`)."""
        if self._index is None:
            if self.state is None:
                raise ValueError(f"field {self.field.name!r}: the encoder is not fitted")
            self._index = Vocabulary(self.state["_vocab_array"])
        return self._index

    @property
    def size(self) -> int:
        return self.index.size

    @property
    def vocab(self) -> pa.Array:
        return self.state["_vocab_array"] if self.state else pa.array([], pa.string())

    # the tokens a column or a value indexes (bucketized numerics override these)
    def column_tokens(self, col: pa.Array) -> pa.Array:
        return col

    def value_tokens(self, values: Sequence[Any]) -> Sequence[str | None]:
        return values

    def _fit_tokens(self, tokens: pa.Array) -> np.ndarray | None:
        self._index = None
        st, codes = Vocabulary.fit_encode(tokens, self.field.min_count)
        self.state = st
        return codes

    def fit_transform(self, col: pa.Array) -> np.ndarray:
        codes = self._fit_tokens(self.column_tokens(col))
        return codes if codes is not None else self.transform(col)

    def fit(self, col: pa.Array) -> CategoricalEncoder:
        self._fit_tokens(self.column_tokens(col))
        return self

    def transform(self, col: pa.Array) -> np.ndarray:
        return self.index.column(self.column_tokens(col))

    def encode_column(self, col: pa.Array) -> Slots:
        idx = self.transform(col).astype(np.int64)[:, None]
        return idx, np.ones(idx.shape, np.float32)

    def index_values(self, values: Sequence[Any]) -> list[int]:
        """Value path, as a list (what ``serve.records`` gathers across fields)."""
        return self.index.values(self.value_tokens(values))

    def encode_values(self, values: Sequence[Any]) -> Slots:
        idx = np.array(self.index_values(values), dtype=np.int64).reshape(-1, 1)
        return idx, np.ones(idx.shape, np.float32)


class HashedEncoder(CategoricalEncoder):
    """A categorical field with ``hash_buckets``: no vocabulary; the state holds the collision counts."""

    @property
    def index(self) -> Hashing:
        if self._index is None:
            self._index = Hashing(self.field.hash_buckets)
        return self._index

    @property
    def vocab(self) -> pa.Array:
        raise ValueError(f"field {self.field.name!r} is hashed: it has no vocabulary")

    def _fit_tokens(self, tokens: pa.Array) -> None:
        self.state = self.index.fit(tokens)
        return None


class BucketEncoder(CategoricalEncoder):
    """A numeric field with ``transform: bucketize``: each number becomes its bucket id's decimal text, which
    then has a vocabulary like a categorical token."""

    def column_tokens(self, col: pa.Array) -> pa.Array:
        return bucket_tokens(col)

    def value_tokens(self, values: Sequence[float | None]) -> list[str | None]:
        b, mask = bucket_ids(_floats(values))
        return [None if m else str(v) for v, m in zip(b.tolist(), mask.tolist(), strict=True)]


class MultiEncoder(CategoricalEncoder):
    """A multi-valued field: a string of tokens split on ``sep`` (or, on the value path, a list of tokens),
    truncated to ``max_len``, empty tokens missing, at least one token per row; ``max_len`` slots (padding
    MISSING with value 0), each valued 1/len (mean pooling) or 1 (sum). Indexed by a vocabulary, or by
    hashing with ``hash_buckets``. Store form: (offsets int64 [N + 1], values int32 [total])."""

    kind = "multi"

    @property
    def index(self) -> Vocabulary | Hashing:
        if self._index is None and self.field.hash_buckets is not None:
            self._index = Hashing(self.field.hash_buckets)
        return super().index

    @property
    def slots(self) -> int:
        return self.field.max_len

    def split(self, col: pa.Array) -> tuple[pa.Array, np.ndarray]:
        """Column path: -> (flat tokens with null for an empty one, lengths [N] >= 1)."""
        f = self.field
        lists = pc.list_slice(pc.split_pattern(pc.fill_null(col, ""), f.sep), 0, f.max_len)
        flat = pc.list_flatten(lists)
        flat = pc.if_else(pc.equal(flat, ""), pa.scalar(None, pa.string()), flat)
        lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        return flat, lengths  # split("") gives [""], so every row has >= 1 token (MISSING when empty)

    def split_value(self, v: str | list[str | None] | None) -> list[str | None]:
        """Value path: the same for one value; a list is taken as already split."""
        f = self.field
        if isinstance(v, list):
            return [t or None for t in v[: f.max_len]] or [None]
        return [p or None for p in (v or "").split(f.sep)[: f.max_len]]

    def column_tokens(self, col: pa.Array) -> pa.Array:
        return self.split(col)[0]

    def _fit_tokens(self, tokens: pa.Array) -> None:
        self._index = None
        if self.field.hash_buckets is not None:
            self.state = self.index.fit(tokens)
        else:
            self.state = Vocabulary.fit(tokens, self.field.min_count)
        return None

    def transform(self, col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        flat, lengths = self.split(col)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return offsets, self.index.column(flat)

    def encode_column(self, col: pa.Array) -> Slots:
        offsets, values = self.transform(col)
        return multi_slots(offsets, values, np.arange(len(col)), self.field.max_len, self.field.pooling)

    def encode_values(self, values: Sequence[str | list[str | None] | None]) -> Slots:
        f, index = self.field, self.index
        idx = np.full((len(values), f.max_len), MISSING, dtype=np.int64)
        val = np.zeros((len(values), f.max_len), dtype=np.float32)
        for r, v in enumerate(values):
            ids = index.values(self.split_value(v))
            idx[r, : len(ids)] = ids
            val[r, : len(ids)] = np.float32(1.0 / len(ids)) if f.pooling == "mean" else np.float32(1.0)
        return idx, val


def encoder_for(field: Field, state: dict[str, Any] | None = None) -> Encoder:
    """The encoder of a field's kind."""
    if field.kind == "multi":
        return MultiEncoder(field, state)
    if field.kind == "numeric":
        return BucketEncoder(field, state) if field.transform == "bucketize" else NumericEncoder(field, state)
    return CategoricalEncoder(field, state) if field.hash_buckets is None else HashedEncoder(field, state)
