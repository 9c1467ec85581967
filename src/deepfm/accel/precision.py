"""``train.precision: auto``: bf16 mixed precision only where this CPU runs the model's own GEMMs clearly
faster in bf16 than in fp32.

The decision is measured once per CPU (model name and the relevant ISA flags), torch version, thread count
and GEMM shapes (batch x the model's Linear layers, forward + both backward GEMMs, the bf16 casts included),
in under a second, and cached as a small JSON file in ``$DEEPFM_CACHE/precision`` (beside the kernels'
cache); delete the file to measure again. bf16 is chosen when its median time is at least
``AUTO_MIN_RATIO`` times shorter. fp32 master weights and optimiser state are unaffected either way: bf16
means autocast of the forward (``train.trainer.autocast``). On a CUDA device (``train.device``) nothing is
measured: auto is bf16 where ``torch.cuda.is_bf16_supported()`` (Ampere and later), else fp32.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepfm import outputs, utils
from deepfm.utils import default_cache_dir, digest

log = logging.getLogger("deepfm.precision")

AUTO_MIN_RATIO = 1.3  # bf16 must take at most 1/1.3 of fp32's GEMM time: "clearly faster"
BUDGET_S = 0.8  # measurement time, both sides together (after one warm-up round each)
MIN_ROUNDS = 3
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "avx512_fp16")
_memo: dict[str, Decision] = {}
_last: list[Decision] = []


@dataclass(frozen=True)
class Decision:
    """What ``precision: auto`` (or a fixed precision) resolved to, as training.json records it."""

    requested: str  # "auto", "fp32" or "bf16"
    chosen: str  # "fp32" or "bf16"
    reason: str
    ratio: float | None = None  # fp32 time / bf16 time of the measured GEMMs (> 1: bf16 faster)
    fp32_ms: float | None = None  # the fastest round of the GEMMs (see measure)
    bf16_ms: float | None = None
    cpu: str = ""
    flags: tuple[str, ...] = ()
    torch: str = torch.__version__
    threads: int = 0
    shapes: tuple[tuple[int, int], ...] = ()  # (in, out) of each Linear layer
    batch: int = 0
    cached: bool = False  # read from the cache rather than measured in this process

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flags"], d["shapes"] = list(self.flags), [list(s) for s in self.shapes]
        return d


def cpu_info() -> tuple[str, tuple[str, ...]]:
    """(model name, the FLAGS this CPU has) from /proc/cpuinfo (empty flags off Linux)."""
    name, flags = utils.cpu_info()
    return name, tuple(x for x in FLAGS if x in flags)


def gemm_shapes(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """(in_features, out_features) of the model's Linear layers, in module order."""
    return tuple((m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear))


def measure(shapes: tuple[tuple[int, int], ...], batch: int, budget_s: float = BUDGET_S,
            timer: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """Seconds of one round of the layers' GEMMs (x W^T, g W, g^T x) in fp32 and in bf16 (with the per-step
    casts of x and W that autocast does), rounds alternating so that drift hits both alike. The fastest
    round of each: the decision is cached, so it should reflect the CPU rather than a neighbour's load
    (on 2 busy shared cores, medians of 2-thread bf16 GEMMs vary 3x from minute to minute)."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, i, generator=gen) for i, _ in shapes]
    ws = [torch.randn(o, i, generator=gen) * 0.05 for i, o in shapes]
    gs = [torch.randn(batch, o, generator=gen) for _, o in shapes]
    gbf = [g.bfloat16() for g in gs]

    def fp32() -> None:
        for x, w, g in zip(xs, ws, gs, strict=True):
            x @ w.t()
            g @ w
            g.t() @ x

    def bf16() -> None:
        for x, w, g in zip(xs, ws, gbf, strict=True):
            xb, wb = x.bfloat16(), w.bfloat16()
            xb @ wb.t()
            g @ wb
            g.t() @ xb

    fp32(), bf16()  # warm-up (oneDNN picks and caches its kernels on the first call)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    start = time.perf_counter()  # the budget is wall time; ``timer`` (a fake one in tests) times each side
    while len(times["fp32"]) < MIN_ROUNDS or time.perf_counter() - start < budget_s:
        for name, fn in (("fp32", fp32), ("bf16", bf16)):
            t0 = timer()
            fn()
            times[name].append(timer() - t0)
        if len(times["fp32"]) >= 50:
            break
    return min(times["fp32"]), min(times["bf16"])


def choose(fp32_s: float, bf16_s: float, min_ratio: float = AUTO_MIN_RATIO) -> str:
    return "bf16" if bf16_s > 0 and fp32_s / bf16_s >= min_ratio else "fp32"


def _cache_path(key: str) -> Path:
    return default_cache_dir() / "precision" / f"{key}.json"


def _read_cache(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) and d.get("chosen") in ("fp32", "bf16") else None
    except (OSError, ValueError):
        return None


def decide(requested: str, model: nn.Module, batch: int, device: str = "cpu", *, cache: bool = True,
           timer: Callable[[], float] = time.perf_counter, min_ratio: float = AUTO_MIN_RATIO) -> Decision:
    """Resolve ``requested`` ("auto", "fp32" or "bf16") for training ``model`` with batches of ``batch``
    rows on ``device``; "auto" measures (or reads the cached measurement, see the module docstring)."""
    if requested not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {requested!r}")
    cpu, flags = cpu_info()
    shapes, threads = gemm_shapes(model), torch.get_num_threads()
    base = {"requested": requested, "cpu": cpu, "flags": flags, "threads": threads, "shapes": shapes,
            "batch": batch}
    if requested != "auto":
        return _remember(Decision(chosen=requested, reason="set in the configuration", **base))
    if device == "cuda":  # a GPU: its tensor cores run bf16 where it has them (Ampere and later)
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
        return _remember(Decision(chosen="bf16" if bf16 else "fp32", reason=(
            f"CUDA device {name} {'supports' if bf16 else 'does not support'} bf16"), **base))
    if device != "cpu":
        return _remember(Decision(chosen="fp32", reason=f"auto measures on CPU only (device {device})", **base))
    if not shapes:
        return _remember(Decision(chosen="fp32", reason="no Linear layers: bf16 has no GEMM to speed up", **base))
    key = digest({"cpu": cpu, "flags": flags, "torch": torch.__version__, "threads": threads, "shapes": shapes,
                  "batch": batch, "min_ratio": min_ratio}, 20)
    if cache and key in _memo:  # remembered too: the pipeline records the latest decision
        return _remember(_memo[key])
    path = _cache_path(key)
    hit = _read_cache(path) if cache else None
    if hit is not None:
        d = Decision(chosen=hit["chosen"], reason=hit.get("reason", ""), ratio=hit.get("ratio"),
                     fp32_ms=hit.get("fp32_ms"), bf16_ms=hit.get("bf16_ms"), cached=True, **base)
    else:
        fp32_s, bf16_s = measure(shapes, batch, timer=timer)
        ratio = fp32_s / bf16_s if bf16_s > 0 else float("inf")
        chosen = choose(fp32_s, bf16_s, min_ratio)
        d = Decision(chosen=chosen, reason=(f"bf16 GEMMs {ratio:.2f}x as fast as fp32 here "
                                            f"({'>=' if chosen == 'bf16' else '<'} {min_ratio})"),
                     ratio=round(ratio, 3), fp32_ms=round(fp32_s * 1e3, 3), bf16_ms=round(bf16_s * 1e3, 3), **base)
        if cache:
            try:
                outputs.write_text(path, json.dumps(d.to_dict(), indent=1) + "\n")
            except OSError as e:  # a read-only home: measure again next time
                log.debug(f"precision cache {path} not written: {e}")
    if cache:
        _memo[key] = d
    return _remember(d)


def _remember(d: Decision) -> Decision:
    _last[:] = [d]
    return d


def last_decision() -> Decision | None:
    """The decision of this process's latest ``decide`` call (what the pipeline records in training.json)."""
    return _last[0] if _last else None


def describe(d: Decision) -> str:
    """One log line."""
    if d.requested != "auto":
        return f"precision {d.chosen}"
    src = f" (cached in {default_cache_dir() / 'precision'}: delete it to measure again)" if d.cached else ""
    return f"precision auto -> {d.chosen}: {d.reason}{src}"

