"""Seeded random splits of a text data file into train/valid/test files (line-based, vectorised).

Used by the results scripts and tests for data sets that ship as one file (Frappe's validation split,
MovieLens), and by users who want a reproducible split without writing code.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

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
