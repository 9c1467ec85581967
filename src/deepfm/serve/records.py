"""Online encoding: a few JSON-style records (``{field: raw value}``) -> the model's ``(idx, val)``.

The batch path (readers -> Preprocessor.transform -> Batcher) spends ~40 Arrow calls per request whatever
its size: ~15 ms for one row. A server request holds 1-100 rows, so this encoder applies the same fitted
states with plain dictionary lookups instead (~20 us per row). It must agree with the batch path value
for value; ``tests/test_serve.py`` checks it on random records with unseen, missing and malformed values.

Accepted values per field kind (what JSON gives; anything else is a :class:`RecordError`):
- categorical / multi: a string, an integer (as its decimal text), or null/"" = missing. A multi field
  also takes a list of strings. Booleans and floats are rejected: write the token as it appears in the logs.
- numeric: a number, a numeric string (as in text logs: exactly what the batch readers accept, see
  ``data.numbers``; no Unicode digits or spaces), or null/"" = missing; NaN/inf are rejected.
A key that a record omits is a missing value, whatever the other records hold (sparse features).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from deepfm.data.numbers import parse_number
from deepfm.data.preprocess import FNV_OFFSET, FNV_PRIME, Preprocessor, _numeric_transform
from deepfm.errors import DeepFMError
from deepfm.schema import MISSING, N_RESERVED, OOV, Field

_MASK64 = (1 << 64) - 1
# -_MAX <= x <= _MAX: a finite float, or an int that converts to one (for a larger int, such as the JSON literal
# 1e400 written out in digits, math.isfinite and float() raise OverflowError)
_MAX = sys.float_info.max


class RecordError(DeepFMError):
    """A record that cannot be encoded; ``row`` (0-based) and ``field`` say where."""

    def __init__(self, row: int | None, field: str, message: str) -> None:
        self.row, self.field, self.message = row, field, message
        where = f"row {row}, field {field!r}" if row is not None else f"field {field!r}"
        super().__init__(f"{where}: {message}")


def fnv1a64_str(s: str) -> int:
    """FNV-1a 64 of the UTF-8 bytes (the same hash as ``preprocess.fnv1a64``; a lone surrogate, which JSON
    allows and Arrow text never holds, is hashed as its surrogatepass bytes)."""
    h, prime = int(FNV_OFFSET), int(FNV_PRIME)
    for b in s.encode("utf-8", "surrogatepass"):
        h = ((h ^ b) * prime) & _MASK64
    return h


def _token(v: Any, row: int, name: str) -> str | None:
    """A categorical value as its token; None = missing."""
    if v is None:
        return None
    if isinstance(v, str):
        if "\x00" in v:
            raise RecordError(row, name, "contains a NUL byte")
        return v or None
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise RecordError(row, name, f"expected a string (or an integer) token, got {type(v).__name__} {v!r:.40}")


def _number(v: Any, row: int, name: str) -> float:
    """A numeric value as float; NaN = missing."""
    if v is None:
        return math.nan
    if isinstance(v, bool):
        raise RecordError(row, name, f"expected a number, got a boolean {v!r}")
    if isinstance(v, (int, float)):
        if not -_MAX <= v <= _MAX:  # NaN, inf, or an integer beyond float range
            raise RecordError(row, name, f"non-finite or out-of-range value {v!r:.40}")
        x = float(v)
    elif isinstance(v, str):
        x = parse_number(v)  # the batch readers' rule (data.numbers): the same values online and in files
        if x is None:
            raise RecordError(row, name, f"not a number: {v[:40]!r}")
        if math.isnan(x):
            return x
    else:
        raise RecordError(row, name, f"expected a number, got {type(v).__name__}")
    if not math.isfinite(x):
        raise RecordError(row, name, f"non-finite value {x!r}")
    return x


class RecordEncoder:
    """``encode(records) -> (idx [B, S] int64, val [B, S] float32)``, slots in ``data.store.Batcher``'s
    order: categorical and bucketized fields, then numeric fields, then ``max_len`` slots per multi field."""

    def __init__(self, pre: Preprocessor) -> None:
        self.pre = pre
        self.cat = pre.fields_of("cat")
        self.num = pre.fields_of("num")
        self.multi = pre.fields_of("multi")
        self.sources = sorted({f.source for f in pre.schema.fields})
        self.slots = len(self.cat) + len(self.num) + sum(f.max_len for f in self.multi)
        self._vocab: dict[str, dict[str, int]] = {}
        # numeric fields grouped by transform (log and none are elementwise: one call for all such fields)
        groups: dict[str, list[int]] = {}
        self._num_groups: list[tuple[list[int], Field]] = []
        for j, f in enumerate(self.num):
            if f.transform in ("log", "none"):
                groups.setdefault(f.transform, []).append(j)
            else:
                self._num_groups.append(([j], f))
        self._num_groups += [(cols, self.num[cols[0]]) for cols in groups.values()]
        self._row_plan: tuple[list, list] | None = None

    def vocab(self, f: Field) -> dict[str, int]:
        """token -> index, built on first use (a field's vocabulary is kept as an Arrow array otherwise)."""
        d = self._vocab.get(f.name)
        if d is None:
            values = self.pre.states[f.name]["_vocab_array"].to_pylist()
            d = self._vocab[f.name] = {v: i + N_RESERVED for i, v in enumerate(values)}
        return d

    def warm(self) -> RecordEncoder:
        """Build every vocabulary lookup now (a server does this before taking traffic)."""
        for f in self.cat + self.multi:
            if f.hash_buckets is None:
                self.vocab(f)
        return self

    def _index(self, f: Field, token: str | None) -> int:
        if token is None:
            return MISSING
        if f.hash_buckets is not None:
            return N_RESERVED + fnv1a64_str(token) % f.hash_buckets
        return self.vocab(f).get(token, OOV)

    def _bucket(self, x: float) -> str | None:
        """preprocess._bucket_tokens for one value."""
        if math.isnan(x):
            return None
        return str(int(np.floor(np.log(x) ** 2) if x > 2 else math.floor(x)))  # np.log: as the batch path

    def _cat_index(self, f: Field, v: Any, r: int) -> int:
        """One categorical (or bucketized) value -> its index, with the checks."""
        if f.kind == "numeric":
            return self._index(f, self._bucket(_number(v, r, f.name)))
        return self._index(f, _token(v, r, f.name))

    def _plan(self) -> tuple[list, list]:
        """Per field, what the row loop needs without attribute lookups: (source, vocab or None, field)."""
        if self._row_plan is None:
            cat = [(f.source, self.vocab(f) if f.hash_buckets is None and f.kind != "numeric" else None, f)
                   for f in self.cat]
            self._row_plan = (cat, [(f.source, f) for f in self.num])
        return self._row_plan

    def encode(self, records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        n = len(records)
        for r, rec in enumerate(records):
            if type(rec) is not dict:
                raise RecordError(r, "", f"a row must be an object of field: value, got {type(rec).__name__}")
        cat_plan, num_plan = self._plan()
        c, k = len(self.cat), len(self.num)
        # row by row with the common cases inline (a string token in a vocabulary, a JSON number): a request
        # holds 1-100 rows, where per-field numpy or Arrow calls would cost more than the values themselves
        ids: list[int] = []  # per row: the categorical indices, then each numeric field's missing flag
        xs: list[float] = []
        for r, rec in enumerate(records):
            get = rec.get
            for src, d, f in cat_plan:
                v = get(src)
                if d is not None and type(v) is str and v and "\x00" not in v:
                    ids.append(d.get(v, OOV))
                else:
                    ids.append(self._cat_index(f, v, r))
            for src, f in num_plan:
                v = get(src)
                t = type(v)
                x = float(v) if (t is float or t is int) and -_MAX <= v <= _MAX else _number(v, r, f.name)
                xs.append(x)
                ids.append(1 if x != x else 0)  # NaN = missing: the field's missing vector (index 1)
        idx = np.array(ids, dtype=np.int64).reshape(n, c + k)
        val = np.ones((n, c + k), dtype=np.float32)
        if k:
            x = np.array(xs, dtype=np.float64).reshape(n, k)
            t = val[:, c:]
            with np.errstate(over="ignore"):  # beyond float32 once transformed: a RecordError below
                if len(self._num_groups) == 1:  # one transform for all numeric fields (e.g. Criteo's 13 logs)
                    cols, f = self._num_groups[0]
                    t[:] = _numeric_transform(x, f, self.pre.states[f.name])
                else:
                    for cols, f in self._num_groups:
                        t[:, cols] = _numeric_transform(x[:, cols], f, self.pre.states[f.name])
            if np.isinf(t).any():  # e.g. 1e300: the model would score NaN
                r, j = (int(i) for i in np.argwhere(np.isinf(t))[0])
                f = self.num[j]
                raise RecordError(r, f.name, f"{x[r, j]:.6g} is out of range: beyond float32 after the "
                                  f"{f.transform} transform")
            np.copyto(t, np.float32(1.0), where=np.isnan(t))
        if not self.multi:
            return idx, val
        idx = np.concatenate([idx, np.empty((n, self.slots - c - k), dtype=np.int64)], axis=1)
        val = np.concatenate([val, np.empty((n, self.slots - c - k), dtype=np.float32)], axis=1)
        s = c + k
        for f in self.multi:
            for r, rec in enumerate(records):
                toks = self._multi_tokens(rec.get(f.source), r, f)
                ids = [self._index(f, t) for t in toks]
                w = np.float32(1.0 / len(ids)) if f.pooling == "mean" else np.float32(1.0)
                idx[r, s: s + f.max_len] = ids + [MISSING] * (f.max_len - len(ids))
                val[r, s: s + f.max_len] = [w] * len(ids) + [0.0] * (f.max_len - len(ids))
            s += f.max_len
        return idx, val

    @staticmethod
    def _multi_tokens(v: Any, r: int, f: Field) -> list[str | None]:
        """preprocess._split_multi for one value: split, truncate, '' -> missing, at least one token."""
        if isinstance(v, list):
            toks = [_token(t, r, f.name) if t is not None else None for t in v][: f.max_len]
            if any(t is not None and f.sep in t for t in toks):
                raise RecordError(r, f.name, f"a list item contains the separator {f.sep!r}")
            return toks or [None]
        t = _token(v, r, f.name)
        return [p or None for p in (t or "").split(f.sep)][: f.max_len]
