"""Measure this machine's GEMM rate for the DeepFM MLP shapes (fp32 and bf16), forward + backward.

The training-sample cost of the paper's MLP (390-400-400-400-1) is 3 GEMMs forward and ~6 backward;
``limit_samples_per_s`` = rate / flops_per_sample is the ceiling a GEMM-bound trainer can reach.

    python benchmarks/gemm.py [--threads N] [--batch 4096] [--numpy]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def mlp_flops_per_sample(d_in: int, hidden: list[int]) -> float:
    """Forward + backward (grad input and grad weight) multiply-adds x2 for the MLP, per sample."""
    dims = [d_in, *hidden, 1]
    macs = sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
    return 2.0 * macs * 3  # fwd, dgrad, wgrad


def gemm_rate(dtype: torch.dtype, batch: int, d_in: int, hidden: list[int], seconds: float = 2.0,
              pad: bool = True) -> float:
    """GFLOP/s of the MLP's GEMMs alone (forward, grad-input, grad-weight), no elementwise work.

    pad: run the grad-input GEMM with W's columns padded to a multiple of 16, as the trainer does
    (accel.mlp._AlignedLinear): MKL is slower on ``g @ W`` when W's width (390 for the first layer)
    is not a multiple of 16 (see ``grad_input_ms``). The rate still counts only the unpadded FLOPs, so the limit
    is that of the best layout, not of a slow one."""
    dims = [d_in, *hidden, 1]
    xs = [torch.randn(batch, a).to(dtype) for a in dims[:-1]]
    ws = [torch.randn(b, a).to(dtype) * 0.05 for a, b in zip(dims[:-1], dims[1:], strict=True)]
    gs = [torch.randn(batch, b).to(dtype) for b in dims[1:]]
    # the grad-input operand: W, or W zero-padded to 16 columns (the padded output's extra columns are
    # dropped by the trainer, a view)
    wi = [torch.nn.functional.pad(w, (0, -w.shape[1] % 16)) if pad and w.shape[1] % 16 else w for w in ws]

    def step() -> None:
        for x, w, g, w_in in zip(xs, ws, gs, wi, strict=True):
            x @ w.t()      # forward
            g @ w_in       # grad input
            g.t() @ x      # grad weight

    for _ in range(3):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    dt = time.perf_counter() - t0
    return n * batch * mlp_flops_per_sample(d_in, hidden) / dt / 1e9


def measure(threads: int, batch: int = 4096, d_in: int = 390, hidden: list[int] | None = None,
            windows: int = 7) -> dict:
    """GEMM rates as the median of ``windows`` 1-second windows (this shared VM's speed drifts by 10-25%
    within a minute; padded and unpadded windows alternate so drift hits both alike); the max too."""
    hidden = hidden or [400, 400, 400]
    torch.set_num_threads(threads)
    fps = mlp_flops_per_sample(d_in, hidden)
    out = {"threads": threads, "batch": batch, "mflop_per_sample": fps / 1e6}
    padded, plain = [], []
    for _ in range(windows):
        padded.append(gemm_rate(torch.float32, batch, d_in, hidden, seconds=1.0))
        plain.append(gemm_rate(torch.float32, batch, d_in, hidden, seconds=1.0, pad=False))
    rate = statistics.median(padded)
    out["fp32_gflops"] = round(rate, 1)
    out["fp32_limit_samples_per_s"] = round(rate * 1e9 / fps)
    out["fp32_gflops_max"] = round(max(padded), 1)
    # for reference: the same GEMMs with the unpadded grad-input (what a plain nn.Linear runs)
    out["fp32_gflops_unpadded"] = round(statistics.median(plain), 1)
    out["grad_input_ms"] = grad_input_ms(batch, d_in, hidden[0])
    rate = gemm_rate(torch.bfloat16, batch, d_in, hidden, seconds=1.0)
    out["bf16_gflops"] = round(rate, 1)
    out["bf16_limit_samples_per_s"] = round(rate * 1e9 / fps)
    return out


def grad_input_ms(batch: int, d_in: int, width: int, calls: int = 20) -> dict:
    """Median ms of the first layer's grad-input GEMM ``g [batch, width] @ W [width, d_in]`` as is and with
    W's columns zero-padded to a multiple of 16 (what accel.mlp._AlignedLinear runs)."""
    g, w = torch.randn(batch, width), torch.randn(width, d_in) * 0.05
    wp = torch.nn.functional.pad(w, (0, -d_in % 16))
    times: dict[str, list[float]] = {"plain": [], "padded": []}
    for _ in range(3):
        g @ w, g @ wp
    for _ in range(calls):  # alternating, so drift hits both alike
        for name, m in (("plain", w), ("padded", wp)):
            t0 = time.perf_counter()
            g @ m
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {f"{name}_{d_in}_to_{m.shape[1]}" if name == "padded" else f"{name}_{d_in}": round(statistics.median(t), 2)
            for (name, t), m in zip(times.items(), (w, wp), strict=True)}


def numpy_rate(batch: int = 4096, d_in: int = 390, hidden: list[int] | None = None, windows: int = 7) -> float:
    """The same GEMMs through numpy's BLAS (OpenBLAS in the wheels), median GFLOP/s of 1 s windows: a
    second reading of what this CPU can do. torch's BLAS is MKL, which takes a slower code path on AMD."""
    import numpy as np

    dims = [d_in, *(hidden or [400, 400, 400]), 1]
    xs = [np.random.randn(batch, a).astype(np.float32) for a in dims[:-1]]
    ws = [(np.random.randn(b, a) * 0.05).astype(np.float32) for a, b in zip(dims[:-1], dims[1:], strict=True)]
    gs = [np.random.randn(batch, b).astype(np.float32) for b in dims[1:]]
    rates = []
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            for x, w, g in zip(xs, ws, gs, strict=True):
                x @ w.T
                g @ w
                g.T @ x
            n += 1
        rates.append(n * batch * mlp_flops_per_sample(d_in, dims[1:-1]) / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--numpy", action="store_true", help="also time the GEMMs through numpy's BLAS")
    a = ap.parse_args()
    import os
    out = measure(a.threads or os.cpu_count() or 1, a.batch)
    if a.numpy:
        out["numpy_fp32_gflops"] = round(numpy_rate(a.batch), 1)
    print(json.dumps(out))
