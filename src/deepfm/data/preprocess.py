"""Preprocessing fitted on the training split only, applied vectorised (Arrow compute + numpy).

A :class:`Preprocessor` composes one encoder per field (:mod:`deepfm.data.encoders`, which says what the
indices mean): it fits them on the training table, on a thread per core, and assembles their columns into
the :class:`Encoded` store. The server encodes single rows with the same encoders' value path
(``serve.records``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from deepfm.data.encoders import (  # noqa: F401 (FNV_*, fnv1a64, hash_collisions: re-exported since the move)
    FNV_OFFSET,
    FNV_PRIME,
    Encoder,
    MultiEncoder,
    bucket_tokens,
    encoder_for,
    fnv1a64,
    hash_collisions,
    state_from_dict,
    state_to_dict,
    vocab_order,
)
from deepfm.data.readers import ReadResult, parallel_map
from deepfm.errors import DataError
from deepfm.schema import Field, Schema, from_dict
from deepfm.utils import digest

# the names data.shards imports (the column path's tokens now live with their encoders)
_bucket_tokens = bucket_tokens
_vocab_order = vocab_order


def _split_multi(col: pa.Array, f: Field) -> tuple[pa.Array, np.ndarray]:
    return MultiEncoder(f).split(col)


def _rows(columns: list[np.ndarray], n: int, dtype: type) -> np.ndarray:
    """F columns of length n -> a C-contiguous [n, F] array."""
    if not columns:
        return np.empty((n, 0), dtype=dtype)
    return np.ascontiguousarray(np.array(columns, dtype=dtype).T)


@dataclass
class Encoded:
    """The columnar encoding of a table: what the store holds and the loader slices.

    cat:   int32 [N, F_cat] per-field indices (categorical and bucketized fields, schema order)
    num:   float32 [N, F_num] transformed values, NaN = missing
    multi: {field: (offsets int64 [N + 1], values int32 [total])} for multi-valued fields
    label: float32 [N] in {0, 1}, or None for unlabelled data
    weight: float64 [N] sample weights (finite, >= 0), or None (``--weight-column``)
    group: int64 [N] group codes for grouped AUC, -1 = no group, or None (``--group-column``)
    """

    cat: np.ndarray
    num: np.ndarray
    multi: dict[str, tuple[np.ndarray, np.ndarray]]
    label: np.ndarray | None
    weight: np.ndarray | None = None
    group: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return int(self.cat.shape[0])


class Preprocessor:
    """Fit on training data (``fit``), then encode any split identically (``transform``).

    ``states``: field name -> the fitted state of its encoder (see :mod:`deepfm.data.encoders`);
    ``encoder(f)`` is the field's encoder on that state."""

    def __init__(self, schema: Schema, states: dict[str, dict[str, Any]] | None = None) -> None:
        self.schema = schema
        self.states = states or {}
        for st in self.states.values():  # in place: a 10M-value vocabulary list costs ~1 GB
            state_from_dict(st)

    # ------------------------------------------------------------------ fields and their encoders
    def fields_of(self, kind: str) -> list[Field]:
        return [f for f in self.schema.fields if f.encoded_kind == kind]

    def encoder(self, f: Field) -> Encoder:
        """The field's encoder on its fitted state (cheap: built on each call, so that replacing
        ``states`` never leaves a stale one)."""
        return encoder_for(f, self.states.get(f.name))

    def encoders(self) -> list[Encoder]:
        """Every field's encoder, in slot order: categorical (incl. bucketized), numeric, multi-valued
        (``deepfm.layout``); schema order within."""
        return [self.encoder(f) for kind in ("cat", "num", "multi") for f in self.fields_of(kind)]

    def vocab_size(self, f: Field) -> int:
        """Rows this field owns in the fused embedding table."""
        return self.encoder(f).size

    def vocab(self, name: str) -> list[str]:
        """The vocabulary of a vocabulary-backed field, index i -> table row i + N_RESERVED."""
        return self.states[name]["_vocab_array"].to_pylist()

    # ------------------------------------------------------------------ fit / transform
    def fit(self, data: ReadResult) -> Preprocessor:
        self._fit(data, encode=False)
        return self

    def fit_transform(self, data: ReadResult) -> Encoded:
        """``fit(data).transform(data)`` in one pass: categorical columns are hashed once (dictionary
        encoding), counted from the codes and remapped, instead of hashed again by a vocabulary lookup."""
        return self.transform(data, self._fit(data, encode=True))

    def _fit(self, data: ReadResult, encode: bool) -> dict[str, np.ndarray]:
        """Fit the states; with ``encode``, returns the categorical columns encoded on the way (see
        fit_transform). Fields are independent, so they run on a thread per core (Arrow and numpy release
        the GIL)."""
        if data.rows == 0:
            raise DataError("cannot fit preprocessing on zero rows", path=data.path)
        encoders = [encoder_for(f) for f in self.schema.fields]

        def fit(enc: Encoder) -> np.ndarray | None:
            col = data.table.column(enc.field.source).combine_chunks()
            if encode and enc.kind == "cat":
                return enc.fit_transform(col)
            enc.fit(col)
            return None

        done = parallel_map(fit, encoders)
        self.states = {enc.field.name: enc.state for enc in encoders}
        return {enc.field.name: out for enc, out in zip(encoders, done, strict=True) if out is not None}

    def transform(self, data: ReadResult, _done: dict[str, np.ndarray] | None = None) -> Encoded:
        if not self.states and self.schema.fields:
            raise DataError("the preprocessor is not fitted: call fit() on the training data first")
        n = data.rows
        done = _done or {}

        def column(enc: Encoder) -> Any:
            if enc.field.name in done:
                return done[enc.field.name]
            return enc.transform(data.table.column(enc.field.source).combine_chunks())

        def of(kind: str) -> list[Encoder]:
            return [self.encoder(f) for f in self.fields_of(kind)]

        # columns are built side by side, then transposed once into row-major [N, F] (rows are what the
        # loader slices); that is faster than writing each column with a stride
        cat = _rows(parallel_map(column, of("cat")), n, np.int32)
        num = _rows(parallel_map(column, of("num")), n, np.float32)
        multi = {enc.field.name: column(enc) for enc in of("multi")}
        return Encoded(cat=cat, num=num, multi=multi, label=data.label)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.schema.to_dict(), "states": {k: state_to_dict(v) for k, v in self.states.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        return cls(from_dict(d["schema"], source="preprocessor"), d["states"])

    def fingerprint(self) -> str:
        return digest(self.to_dict(), 16)
