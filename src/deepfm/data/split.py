"""Splits. ``split_lines``: seeded random splits of a text data file into train/valid/test files (line-based,
vectorised), used by the results scripts and tests for data sets that ship as one file (Frappe's validation
split, MovieLens). ``time_key``/``time_split``: time-ordered train/valid/test rows by cut points of a column
(``deepfm train --split time:COLUMN``; the random row split is ``pipeline.split_rows``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepfm.errors import DataError


def split_lines(path: str | Path, out_dir: str | Path, fractions: dict[str, float], seed: int = 2017,
                header: bool = False, suffix: str | None = None) -> dict[str, Path]:
    """Shuffle the lines of ``path`` with ``seed`` and write ``out_dir/<name><suffix>`` per fraction.

    fractions: e.g. ``{"train": 0.8, "valid": 0.1, "test": 0.1}`` (must sum to 1). A header line, if any,
    is copied into every part. RecBole ``.user``/``.item`` files next to a ``.inter`` file are copied
    alongside each part so the movielens reader finds them.
    """
    path, out = Path(path), Path(out_dir)
    if abs(sum(fractions.values()) - 1.0) > 1e-9:
        raise DataError(f"split fractions must sum to 1, got {fractions}")
    raw = path.read_bytes()
    if not raw:
        raise DataError("empty file", path=str(path))
    if not raw.endswith(b"\n"):
        raw += b"\n"
    buf = np.frombuffer(raw, dtype=np.uint8)
    ends = np.flatnonzero(buf == ord("\n")) + 1
    starts = np.concatenate(([0], ends[:-1]))
    head = b""
    if header:
        head, starts, ends = raw[: ends[0]], starts[1:], ends[1:]
    n = len(starts)
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.round(np.cumsum([0.0, *fractions.values()]) * n).astype(int)
    out.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else path.suffix
    result = {}
    for (name, _), lo, hi in zip(fractions.items(), bounds[:-1], bounds[1:], strict=True):
        rows = np.sort(perm[lo:hi])  # keep the original order inside each part
        target = out / f"{name}{suffix}"
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(head)
            lens = ends[rows] - starts[rows]
            pos = np.arange(lens.sum()) + np.repeat(starts[rows] - (np.cumsum(lens) - lens), lens)
            fh.write(buf[pos].tobytes())
        os.replace(tmp, target)
        for side in (".user", ".item"):
            if path.suffix == ".inter" and path.with_suffix(side).exists():
                shutil.copyfile(path.with_suffix(side), target.with_suffix(side))
        result[name] = target
    return result


# --------------------------------------------------------------------------- time-ordered splits


def time_key(values: pa.Array | pa.ChunkedArray, column: str = "time") -> tuple[np.ndarray, Callable[[str], float]]:
    """A time column -> (float64 sort key [N], VALUE text -> the key a cut compares against).

    Numbers (or text that is all numbers: epoch seconds, Avazu's YYMMDDHH) order numerically; other text (ISO
    dates such as 2024-05-01 or 2024-05-01T13:00) orders as text, ranked among the column's sorted distinct
    values. An empty value is an error (a row with no time cannot be placed)."""
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if arr.null_count:
        first = int(np.flatnonzero(pc.is_null(arr).to_numpy(zero_copy_only=False))[0])
        raise DataError(f"the time column has {arr.null_count:,} empty values (first at data row {first + 1})",
                        field=column, hint="fill them, or drop those rows, before a time split")
    if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
        arr = pc.cast(pc.cast(arr, pa.timestamp("us")) if pa.types.is_date(arr.type) else arr, pa.int64())
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        text = pc.utf8_trim_whitespace(pc.cast(arr, pa.string()))
        try:
            arr = pc.cast(text, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            distinct = pc.unique(text)
            distinct = distinct.take(pc.sort_indices(distinct))
            key = pc.index_in(text, value_set=distinct).to_numpy(zero_copy_only=False).astype(np.float64)
            sorted_text = np.asarray(distinct.to_pylist(), dtype=object)
            return key, lambda v: float(np.searchsorted(sorted_text, str(v).strip(), side="left"))
    key = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64)
    if not np.isfinite(key).all():
        raise DataError("the time column holds NaN or infinite values", field=column)

    def number(v: str) -> float:
        try:
            return float(v)
        except ValueError:
            raise DataError(f"the time column is numeric, but the cut value {v!r} is not a number",
                            field=column) from None
    return key, number


def time_split(key: np.ndarray, valid_fraction: float = 0.1, test_fraction: float = 0.0,
               valid_from: float | None = None, test_from: float | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ordered by ``key`` -> (train, valid, test) row indices, each sorted by row.

    Cut values (``valid_from``/``test_from``, keys from ``time_key``): train = key < valid_from, valid =
    valid_from <= key < test_from, test = key >= test_from. A cut not given is the key at the
    ``1 - valid_fraction - test_fraction`` (valid) or ``1 - test_fraction`` (test) quantile of the rows; a
    fraction 0 (and no cut value): no such split.
    Either way, rows whose key equals a cut go to the later split (all rows of one time stamp stay together),
    so every valid/test row is later than every training row. An empty train or valid split is an error."""
    n = key.size
    for name, f in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise DataError(f"{name} must be in [0, 1), got {f}")
    ordered = np.sort(key, kind="stable")
    if test_from is not None:
        t_cut = test_from
    else:
        pos = n - int(round(n * test_fraction))
        t_cut = float(ordered[pos]) if test_fraction > 0 and pos < n else float("inf")
    before = int(np.searchsorted(ordered, t_cut, side="left"))  # rows before the test cut
    if valid_from is not None:
        v_cut = valid_from
    elif valid_fraction > 0:  # the latest valid_fraction of all rows, before the test cut
        pos = before - int(round(n * valid_fraction))
        v_cut = float(ordered[max(pos, 0)]) if before else t_cut
    else:
        v_cut = t_cut
    if v_cut > t_cut:
        raise DataError(f"the valid cut ({v_cut:g}) is after the test cut ({t_cut:g})")
    train = np.flatnonzero(key < v_cut)
    valid = np.flatnonzero((key >= v_cut) & (key < t_cut))
    test = np.flatnonzero(key >= t_cut)
    if train.size == 0:
        raise DataError(f"the time split leaves no training rows (every time value is at or after the valid cut "
                        f"{v_cut:g}); give an earlier --valid-from or a smaller --valid-fraction")
    if valid.size == 0 and (valid_from is not None or valid_fraction > 0):
        raise DataError("the time split leaves no validation rows (all the rows from the valid cut on are at or "
                        "after the test cut); move --valid-from / --test-from apart")
    return train, valid, test
