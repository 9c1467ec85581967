"""Side columns: input columns that are not features but travel with the rows, read like the label.

- ``weight`` (``--weight-column``): per-row sample weights, finite and >= 0, for the loss and the metrics;
- ``group`` (``--group-column``, e.g. a user id): the key of grouped AUC (GAUC); an empty key is no group;
- ``time`` (``--split time:COLUMN``): what a time-ordered split orders by (``data.split.time_split``).

They are read through the readers by a schema with one extra field per side column (numeric for the weight,
text for the others), so that a bad value (not a number, NaN, inf) is reported by file, line and column like a
feature's, and skipped with the row under ``--on-bad-rows skip``. A negative or empty weight is always an
error (dropping a weighted row would change the objective), reported by data row: the row's 1-based position
among the rows read, which is its line less the header when no row was skipped. A side column may also be a
feature (a user id is both), except the weight.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepfm.data import readers
from deepfm.data.preprocess import Encoded
from deepfm.errors import DataError
from deepfm.schema import Field, Schema

ROLES = ("weight", "group", "time")
OPTION = {"weight": "--weight-column", "group": "--group-column", "time": "--split time:"}


@dataclass(frozen=True)
class SideColumns:
    """The source column of each side role (None: not used)."""

    weight: str | None = None
    group: str | None = None
    time: str | None = None

    def used(self) -> dict[str, str]:
        return {r: c for r in ROLES if (c := getattr(self, r))}

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v}

    def __bool__(self) -> bool:
        return bool(self.used())


def reading_schema(schema: Schema, side: SideColumns) -> Schema:
    """``schema`` plus a field for each side column that no feature reads already."""
    taken = {f.name for f in schema.fields}
    sources = {f.source for f in schema.fields}
    extra: list[Field] = []
    for role, col in side.used().items():
        if col == schema.label:
            raise DataError(f"{OPTION[role]}{'' if role == 'time' else ' '}{col!r} is the label column")
        if role == "weight" and col in sources:
            raise DataError(f"--weight-column {col!r} is also a feature: a weight must not be a model input",
                            field=col)
        if col in sources or any(f.source == col for f in extra):
            continue
        name = col if col not in taken else f"{role}:{col}"
        extra.append(Field(name, "numeric" if role == "weight" else "categorical", column=col))
        taken.add(name)
    return replace(schema, fields=schema.fields + tuple(extra)) if extra else schema


def read(path: str | Path, fmt: str, schema: Schema | None, on_bad_rows: str, side: SideColumns
         ) -> tuple[readers.ReadResult, dict[str, pa.Array]]:
    """``readers.read`` with the side columns: (the rows, typed by ``schema`` alone; role -> its column)."""
    schema = schema or readers.default_schema(fmt)
    if not side:
        return readers.read(path, fmt, schema, on_bad_rows), {}
    if schema is None:
        raise DataError(f"--format {fmt} needs a schema (--schema FILE) for side columns", path=str(path))
    res = readers.read(path, fmt, reading_schema(schema, side), on_bad_rows)
    cols = {role: res.table.column(col).combine_chunks() for role, col in side.used().items()}
    return readers.ReadResult(res.table, res.label, schema, res.path, res.skipped, res.extra), cols


def weights(arr: pa.Array, path: str | None = None, column: str = "weight") -> np.ndarray:
    """A typed weight column -> float64 [N] (metrics exact to the input's digits), refusing empty, negative
    and non-finite values."""
    if not (pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type)):
        try:
            arr = pc.cast(pc.utf8_trim_whitespace(pc.cast(arr, pa.string())), pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError("the weight column holds text that is not a number", path=path, field=column) from None
    w = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64)  # nulls read as NaN
    bad = ~(np.isfinite(w) & (w >= 0))
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        what = "empty" if np.isnan(w[r]) else f"{w[r]:g}"
        raise DataError(f"data row {r + 1}: sample weight must be a finite number >= 0, got {what} "
                        f"({int(bad.sum()):,} such rows)", path=path, field=column,
                        hint="fix the weights; --on-bad-rows skip does not drop weighted rows")
    return w


def group_codes(arr: pa.Array) -> np.ndarray:
    """Group keys -> int64 codes (equal keys, equal codes), -1 for an empty key (no group)."""
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = pc.if_else(pc.equal(pc.utf8_trim_whitespace(arr), ""), pa.scalar(None, arr.type), arr)
    codes = pc.dictionary_encode(arr).indices.to_numpy(zero_copy_only=False)
    codes = np.asarray(codes, dtype=np.float64 if arr.null_count else np.int64)
    return np.where(np.isnan(codes), -1, codes).astype(np.int64) if arr.null_count else codes


def attach(enc: Encoded, cols: dict[str, pa.Array], path: str | None, side: SideColumns) -> Encoded:
    """Put the weight and group columns of ``cols`` (from ``read``) into the encoded rows."""
    if "weight" in cols:
        enc.weight = weights(cols["weight"], path, side.weight or "weight")
    if "group" in cols:
        enc.group = group_codes(cols["group"])
    return enc


def from_arrays(enc: Encoded, sample_weight: Any = None, groups: Any = None, source: str = "X") -> Encoded:
    """The Python API's weights / groups (arrays, one per row) into the encoded rows."""
    if sample_weight is not None:
        w = np.asarray(sample_weight)
        if w.ndim != 1 or w.shape[0] != enc.rows:
            raise DataError(f"sample_weight must be 1-D with one weight per row ({enc.rows}), got shape {w.shape}",
                            path=source)
        if w.dtype.kind not in "biuf":
            raise DataError(f"sample_weight must hold numbers, got dtype {w.dtype}", path=source)
        enc.weight = weights(pa.array(w.astype(np.float64)), source, "sample_weight")
    if groups is not None:
        g = np.asarray(groups)
        if g.ndim != 1 or g.shape[0] != enc.rows:
            raise DataError(f"groups must be 1-D with one key per row ({enc.rows}), got shape {g.shape}", path=source)
        enc.group = group_codes(pa.array(g))
    return enc
