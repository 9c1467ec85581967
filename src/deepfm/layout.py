"""The field layout: how the fields of a schema become the model's input slots and table rows.

Shared by data (the batcher fills the slots), models (the fused table offsets each slot into its field's
rows), serve (the bundle stores it) and the one-row encoder. Standard library only: it sits below data and
models, so that the models do not import the data store (and Arrow) to learn their input's shape.

Order: categorical fields (incl. bucketized numeric), then numeric, then multi-valued; schema order within.
Slots: one per categorical or numeric field, ``max_len`` per multi-valued field. A field's rows in a fused
table start at the sum of the sizes of the fields before it (models.layers.FusedTable).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class FieldSpec:
    """One field as the model sees it: its kind, its rows in the fused table, its input slots."""

    name: str
    kind: str  # cat | num | multi
    size: int
    slots: int
    pooling: str = "sum"


class _Fitted(Protocol):  # what layout() reads of a fitted data.preprocess.Preprocessor
    def fields_of(self, kind: str) -> Iterable[Any]: ...

    def vocab_size(self, f: Any) -> int: ...


def layout(pre: _Fitted) -> list[FieldSpec]:
    """Model field order: categorical (incl. bucketized), numeric, multi-valued; schema order within."""
    out = [FieldSpec(f.name, "cat", pre.vocab_size(f), 1) for f in pre.fields_of("cat")]
    out += [FieldSpec(f.name, "num", 2, 1) for f in pre.fields_of("num")]
    out += [FieldSpec(f.name, "multi", pre.vocab_size(f), f.max_len, f.pooling) for f in pre.fields_of("multi")]
    return out

