"""Where a DeepFM training step's time goes: GEMMs versus everything else, from torch's profiler, and what
the fused CPU kernels (``deepfm.accel.kernels``) save against eager PyTorch.

    python benchmarks/profile_step.py --data DIR [--steps 20] [--threads 2] [--embedding-update dense]
                                      [--batch-norm --dropout 0.2 --embedding-l2 1e-3] [--ab 8]
                                      [--precision bf16] [--ab-precision 8]

DIR holds a Criteo-format train.tsv (e.g. from ``deepfm synth``). Trains the paper config (embedding 10,
400-400-400, dropout 0.5, batch 4096; the flags give the ``default`` preset's batch norm, dropout and
embedding L2) for a few warm-up steps, then profiles ``--steps`` steps and prints the time per step in
GEMMs (aten::mm/addmm), in the other top ops, and the GEMM share. With ``--ab N`` it then trains N rounds
of ``--steps`` steps alternating the kernels on and off (same process, same data) and prints the median
samples/s of each; with ``--ab-precision N``, N rounds alternating fp32 and bf16 (kernels on), the median
samples/s of each and their fraction of this process's GEMM-bound limit (benchmarks/gemm.py, measured
right after).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from torch.profiler import profile

from deepfm.accel import kernels
from deepfm.data import readers
from deepfm.data.preprocess import Preprocessor
from deepfm.data.store import Batcher, layout
from deepfm.models import ModelConfig, build_model
from deepfm.train.trainer import TrainConfig, fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--embedding-update", default="dense")
    ap.add_argument("--batch-norm", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.5)
    ap.add_argument("--embedding-l2", type=float, default=0.0)
    ap.add_argument("--ab", type=int, default=0, help="rounds of kernels on / off, alternating")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="of the profiled steps")
    ap.add_argument("--ab-precision", type=int, default=0, help="rounds of fp32 / bf16, alternating")
    a = ap.parse_args()
    schema = readers.default_schema("criteo")
    pre = Preprocessor(schema)
    enc = pre.fit_transform(readers.read(a.data / "train.tsv", "criteo", schema))
    fields = layout(pre)
    model = build_model(fields, ModelConfig(dropout=a.dropout, batch_norm=a.batch_norm,
                                            embedding_l2=a.embedding_l2))
    cfg = TrainConfig(epochs=1, batch_size=4096, threads=a.threads, embedding_update=a.embedding_update,
                      precision=a.precision)
    batcher = Batcher(enc, fields)
    print(f"fused CPU kernels: {kernels.status()}")
    fit(model, batcher, cfg, train_rows=np.arange(4096 * 3), progress=False)  # warm-up
    rows = np.arange(4096 * a.steps)
    t0 = time.perf_counter()
    fit(model, batcher, cfg, train_rows=rows, progress=False)
    plain = (time.perf_counter() - t0) / a.steps
    with profile() as prof:
        fit(model, batcher, cfg, train_rows=rows, progress=False)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) / 1e3 / a.steps
    gemm = sum(e.self_cpu_time_total for e in ops if e.key in ("aten::mm", "aten::addmm")) / 1e3 / a.steps
    print(f"step without profiler: {plain * 1e3:.1f} ms ({4096 / plain:,.0f} samples/s)")
    print(f"profiled ops per step: {total:.1f} ms, of which GEMM {gemm:.1f} ms ({100 * gemm / total:.0f}%)")
    for e in ops[:a.top]:
        print(f"  {e.key:<40} {e.self_cpu_time_total / 1e3 / a.steps:7.2f} ms/step  ({e.count // a.steps} calls)")
    if a.ab and kernels.library() is not None:
        rates: dict[str, list[float]] = {"kernels": [], "eager": []}
        for _ in range(a.ab):
            for name in rates:
                with kernels.disabled() if name == "eager" else contextlib.nullcontext():
                    hist = fit(model, batcher, cfg, train_rows=rows, progress=False)
                rates[name].append(rows.size / hist[0]["train_seconds"])
        k, e = statistics.median(rates["kernels"]), statistics.median(rates["eager"])
        print(f"A/B over {a.ab} alternating rounds of {a.steps} steps: kernels {k:,.0f} samples/s, "
              f"eager PyTorch {e:,.0f} samples/s ({k / e:.2f}x)")
    if a.ab_precision:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from gemm import measure as gemm_measure

        prec: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(a.ab_precision):
            for name in prec:
                hist = fit(model, batcher, replace(cfg, precision=name), train_rows=rows, progress=False)
                prec[name].append(rows.size / hist[0]["train_seconds"])
        f, b = statistics.median(prec["fp32"]), statistics.median(prec["bf16"])
        g = gemm_measure(a.threads, windows=3)
        print(f"precision A/B over {a.ab_precision} alternating rounds of {a.steps} steps: fp32 {f:,.0f} "
              f"samples/s ({100 * f / g['fp32_limit_samples_per_s']:.0f}% of the fp32 GEMM limit "
              f"{g['fp32_limit_samples_per_s']:,}), bf16 {b:,.0f} samples/s "
              f"({100 * b / g['bf16_limit_samples_per_s']:.0f}% of the bf16 GEMM limit "
              f"{g['bf16_limit_samples_per_s']:,}); bf16 {b / f:.2f}x fp32")


if __name__ == "__main__":
    main()
