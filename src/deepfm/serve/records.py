"""Online encoding: a few JSON-style records (``{field: raw value}``) -> the model's ``(idx, val)``.

The batch path (readers -> Preprocessor.transform -> Batcher) spends ~40 Arrow calls per request whatever
its size: ~15 ms for one row. A server request holds 1-100 rows, so this module checks the JSON values and
hands them to the value path of the same encoders (``data.encoders``: dictionary lookups and a few numpy
calls, ~20 us per row). ``tests/test_encoders.py`` checks each encoder's value path against its column path,
``tests/test_serve.py`` this module against the batch path on random records.

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

from deepfm.data.encoders import (  # noqa: F401 (fnv1a64_str: re-exported, it lived here)
    CategoricalEncoder,
    MultiEncoder,
    NumericEncoder,
    Vocabulary,
    fnv1a64_str,
    num_slots,
)
from deepfm.data.numbers import parse_number
from deepfm.data.preprocess import Preprocessor
from deepfm.errors import DeepFMError
from deepfm.schema import OOV, Field

# -_MAX <= x <= _MAX: a finite float, or an int that converts to one (for a larger int, such as the JSON literal
# 1e400 written out in digits, math.isfinite and float() raise OverflowError)
_MAX = sys.float_info.max


class RecordError(DeepFMError):
    """A record that cannot be encoded; ``row`` (0-based) and ``field`` say where."""

    def __init__(self, row: int | None, field: str, message: str) -> None:
        self.row, self.field, self.message = row, field, message
        where = f"row {row}, field {field!r}" if row is not None else f"field {field!r}"
        super().__init__(f"{where}: {message}")


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


def _multi(v: Any, row: int, f: Field) -> str | list[str | None] | None:
    """A multi field's value: a token string (split by the encoder), or a list of tokens."""
    if isinstance(v, list):
        toks = [_token(t, row, f.name) if t is not None else None for t in v]
        if any(t is not None and f.sep in t for t in toks[: f.max_len]):
            raise RecordError(row, f.name, f"a list item contains the separator {f.sep!r}")
        return toks
    return _token(v, row, f.name)


class RecordEncoder:
    """``encode(records) -> (idx [B, S] int64, val [B, S] float32)``: JSON values checked here (a bad one is a
    :class:`RecordError` naming its row and field), then encoded by the fields' encoders' value path
    (``data.encoders``, the ones the batch path uses), in the layout's slot order: categorical and
    bucketized fields, then numeric fields, then ``max_len`` slots per multi field.

    A request holds 1-100 rows: vocabulary lookups inline row by row, one numpy call per numeric transform
    for all fields that share it, and multi fields a column at a time through their encoder."""

    def __init__(self, pre: Preprocessor) -> None:
        self.pre = pre
        self.encoders = pre.encoders()
        self.cat = [e for e in self.encoders if isinstance(e, CategoricalEncoder) and e.kind == "cat"]
        self.num = [e for e in self.encoders if isinstance(e, NumericEncoder)]
        self.multi = [e for e in self.encoders if isinstance(e, MultiEncoder)]
        self.sources = sorted({f.source for f in pre.schema.fields})
        self.slots = sum(e.slots for e in self.encoders)
        # numeric fields grouped by transform (log and none are elementwise and unfitted: one call for all)
        groups: dict[str, list[int]] = {}
        self._num_groups: list[tuple[list[int], NumericEncoder]] = []
        for j, e in enumerate(self.num):
            if e.field.transform in ("log", "none"):
                groups.setdefault(e.field.transform, []).append(j)
            else:
                self._num_groups.append(([j], e))
        self._num_groups += [(cols, self.num[cols[0]]) for cols in groups.values()]
        self._row_plan: tuple[list, list] | None = None

    def warm(self) -> RecordEncoder:
        """Build every vocabulary lookup now (a server does this before taking traffic)."""
        for e in self.cat + self.multi:
            if isinstance(e.index, Vocabulary):
                e.index.lookup  # noqa: B018 (built on first use)
        return self

    def _plan(self) -> tuple[list, list]:
        """Per field, what the row loop needs without attribute lookups: (source, the vocabulary's
        ``dict.get`` or None, encoder) and (source, name)."""
        if self._row_plan is None:
            cat = [(e.field.source, e.index.lookup.get if isinstance(e.index, Vocabulary)
                    and e.field.kind != "numeric" else None, e) for e in self.cat]
            self._row_plan = (cat, [(e.field.source, e.field.name) for e in self.num])
        return self._row_plan

    def encode(self, records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        for r, rec in enumerate(records):
            if type(rec) is not dict:
                raise RecordError(r, "", f"a row must be an object of field: value, got {type(rec).__name__}")
        try:
            return self._encode(records)
        except RecordError:
            self._first_error(records)  # the one a row-by-row reading meets first
            raise

    def _first_error(self, records: list[dict[str, Any]]) -> None:
        """Raise the first bad value row by row (categorical and numeric fields), then field by field (multi
        fields), the order in which the checks ran before they went field by field."""
        for r, rec in enumerate(records):
            for e in self.cat + self.num:
                f = e.field
                v = rec.get(f.source)
                _number(v, r, f.name) if f.kind == "numeric" else _token(v, r, f.name)
        for e in self.multi:
            for r, rec in enumerate(records):
                _multi(rec.get(e.field.source), r, e.field)

    def _encode(self, records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        n = len(records)
        c, k = len(self.cat), len(self.num)
        idx = np.empty((n, self.slots), dtype=np.int64)
        val = np.ones((n, self.slots), dtype=np.float32)
        # row by row with the common cases inline (a string token in the encoder's vocabulary, a JSON
        # number): for a one-row request, per-field calls would cost more than the values themselves
        cat_plan, num_plan = self._plan()
        ids: list[int] = []  # per row: the categorical indices
        xs: list[float] = []  # per row: the numeric values
        for r, rec in enumerate(records):
            get = rec.get
            for src, d, e in cat_plan:
                v = get(src)
                if d is not None and type(v) is str and v and "\x00" not in v:
                    ids.append(d(v, OOV))
                else:
                    f = e.field
                    ids += e.index_values([_number(v, r, f.name) if f.kind == "numeric" else _token(v, r, f.name)])
            for src, name in num_plan:
                v = get(src)
                t = type(v)
                xs.append(float(v) if (t is float or t is int) and -_MAX <= v <= _MAX else _number(v, r, name))
        if c:
            idx[:, :c] = np.array(ids, dtype=np.int64).reshape(n, c)
        if k:
            x = np.array(xs, dtype=np.float64).reshape(n, k)
            t = np.empty((n, k), dtype=np.float32)
            with np.errstate(over="ignore"):  # beyond float32 once transformed: a RecordError below
                if len(self._num_groups) == 1:  # one transform for all numeric fields (e.g. Criteo's 13 logs)
                    t[:] = self._num_groups[0][1].apply(x)
                else:
                    for cols, e in self._num_groups:
                        t[:, cols] = e.apply(x[:, cols])
            if np.isinf(t).any():  # e.g. 1e300: the model would score NaN
                r, j = (int(i) for i in np.argwhere(np.isinf(t))[0])
                f = self.num[j].field
                raise RecordError(r, f.name, f"{x[r, j]:.6g} is out of range: beyond float32 after the "
                                  f"{f.transform} transform")
            idx[:, c: c + k], val[:, c: c + k] = num_slots(t)
        s = c + k
        for e in self.multi:
            f = e.field
            values = [_multi(rec.get(f.source), r, f) for r, rec in enumerate(records)]
            idx[:, s: s + f.max_len], val[:, s: s + f.max_len] = e.encode_values(values)
            s += f.max_len
        return idx, val
