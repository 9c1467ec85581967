"""Small helpers that several layers share (standard library and numpy; torch imported where used).

Here so that no module imports a higher layer for a one-liner: serving once imported the training loop for
``sigmoid`` and ``set_threads``, the kernels the data store for the cache folder, and four modules each had
their own sha256-of-JSON. Atomic writes live in :mod:`deepfm.outputs`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def digest(obj: Any, length: int | None = None) -> str:
    """sha256 (hex) of ``obj`` as canonical JSON (sorted keys; ``str()`` of what JSON cannot hold), cut to
    ``length`` characters: the same value gives the same digest whatever its key order."""
    h = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return h if length is None else h[:length]


def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, every flag) of this CPU from /proc/cpuinfo (the platform's name and no flags off Linux)."""
    import platform
    import re

    name = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, frozenset()
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    f = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    return (m.group(1).strip() if m else name), frozenset(f.group(1).split() if f else ())


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Probabilities from logits, in float64."""
    with np.errstate(over="ignore"):  # exp overflows to inf for logits below -709: 1 / (1 + inf) = 0, exact
        return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float64)


def available_cores() -> int:
    """Cores this process may run on (affinity mask), not the host's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(threads: int) -> int:
    """torch's intra-op threads: ``threads``, or (0) the cores this process may use; returns the number."""
    import torch

    n = threads or available_cores()
    torch.set_num_threads(n)
    return n


def default_cache_dir() -> Path:
    """The encoded-store (and kernel build) cache: $DEEPFM_CACHE, else ~/.cache/deepfm."""
    return Path(os.environ.get("DEEPFM_CACHE", Path.home() / ".cache" / "deepfm"))
