"""GPU benchmark (issue 19): train, score and check CPU/GPU parity on one CUDA device; one JSON line per
measurement on stdout (progress lines on stderr). ``benchmarks/gpu.sh`` runs it after ``deepfm synth``.

    python benchmarks/gpu.py check                  # exit 3 with a message when CUDA is absent
    python benchmarks/gpu.py run --data DIR         # DIR: train/valid/test.tsv from `deepfm synth`

``run`` measures, in this order, each step only while the time budget (``--budget-s``) lasts (a step
past it prints ``{"measure": ..., "skipped": "time budget"}``):

1. ``env``: the GPU, torch, CUDA, bf16 support;
2. ``prepare``: reading and encoding the TSVs once (cached in ``--work``; every run below reuses them);
3. ``train``: the paper config (``--preset paper``: embedding 10, MLP 400-400-400, dropout 0.5, Adam 1e-3),
   1 epoch, at each ``--batches`` size in each ``--precisions`` (fp32, bf16 autocast): training rows/s
   (the trainer's own figure: the epoch's rows over its training time, validation excluded), the wall
   time, and the validation/test AUC;
4. ``score``: the last trained model scoring ``--score-rows`` encoded rows (test rows, repeated when there
   are fewer) at batch 65536 on the device, fp32 and bf16: rows/s of the model alone (batches built from
   the store, copied, scored, copied back), not of parsing text;
5. ``parity``: the first run's bundle (CPU tensors in safetensors) loaded twice, scored on the CPU and on
   the GPU over ``--parity-rows`` test rows: max |dp| and the AUC difference;
6. ``cpu_reference`` (unless ``--no-cpu-reference``): the same training at the largest batch in fp32 on
   the CPU, for the target "GPU bf16 test AUC within 0.002 of CPU fp32 at the same batch size", and
   ``auc_gap``.

``--device cpu`` runs the same steps on the CPU (a dry run of the script itself, e.g. in tests).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

NO_CUDA_EXIT = 3


def ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def precisions(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in ("fp32", "bf16")]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"precisions are fp32 and/or bf16, got {text!r}")
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/gpu.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="exit 0 when a CUDA device is usable, else print why and exit 3")
    r = sub.add_parser("run", help="the measurements (see the module docstring)")
    r.add_argument("--data", required=True, type=Path, help="folder with train.tsv, valid.tsv, test.tsv")
    r.add_argument("--work", type=Path, help="bundles and the encoded cache (default: DATA/work)")
    r.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a dry run (default cuda)")
    r.add_argument("--batches", type=ints, default=[4096, 16384, 65536])
    r.add_argument("--precisions", type=precisions, default=["fp32", "bf16"])
    r.add_argument("--preset", default="paper")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    r.add_argument("--score-rows", type=int, default=1_000_000)
    r.add_argument("--parity-rows", type=int, default=100_000)
    r.add_argument("--budget-s", type=float, default=420.0, help="start no step after this many seconds")
    r.add_argument("--no-cpu-reference", dest="cpu_reference", action="store_false")
    return p.parse_args(argv)


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here (None: it can)."""
    import torch

    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    return None


def no_cuda_message(why: str) -> str:
    return (f"benchmarks/gpu: CUDA is not available: {why}. Nothing was measured; run benchmarks/gpu.sh on a "
            "machine with an NVIDIA GPU and a CUDA build of torch (the CPU benchmarks are benchmarks/run.py).")


def emit(rec: dict[str, Any]) -> None:
    print(json.dumps(rec), flush=True)


def say(msg: str) -> None:
    print(f"[gpu.py] {msg}", file=sys.stderr, flush=True)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.monotonic(), seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def over(self, measure: str, **what: Any) -> bool:
        if self.elapsed() <= self.seconds:
            return False
        emit({"measure": measure, **what, "skipped": "time budget", "elapsed_s": round(self.elapsed(), 1)})
        return True


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from deepfm import pipeline
    from deepfm.data.store import Batcher
    from deepfm.device import resolve_device
    from deepfm.serve.predictor import Predictor
    from deepfm.train.metrics import auc
    from deepfm.train.trainer import autocast, predict_logits
    from deepfm.utils import sigmoid

    budget = Budget(args.budget_s)
    dev = resolve_device(args.device)
    work = args.work or args.data / "work"
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    emit({"measure": "env", "device": str(dev), "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
          "bf16_supported": bool(dev.type == "cuda" and torch.cuda.is_bf16_supported()),
          "cpu_threads": torch.get_num_threads()})

    t = time.perf_counter()
    prep = pipeline.prepare(args.data / "train.tsv", "criteo", None, args.data / "valid.tsv", cache_dir=cache)
    test = pipeline.encode_file(args.data / "test.tsv", "criteo", prep.pre, cache_dir=cache, use_cache=True)
    emit({"measure": "prepare", "train_rows": int(prep.train.rows), "test_rows": int(test.rows),
          "vocab_rows": prep.info["vocab_rows"], "seconds": round(time.perf_counter() - t, 2)})

    def train_once(batch: int, prec: str, device: str, out: Path | None) -> tuple[Any, dict[str, Any]]:
        model_cfg, train_cfg = pipeline.resolve_config(args.preset, [*args.overrides, "train.epochs=1"],
                                                       batch_size=batch, precision=prec, device=device)
        t0 = time.perf_counter()
        model, result = pipeline.train(prep, model_cfg, train_cfg, out, "criteo", test, progress=False,
                                       force=True)
        h = result["training"]["history"][-1]
        m = result["metrics"]
        return model, {"device": result["training"].get("device", device), "batch": batch,
                       "precision": result["training"].get("precision", {}).get("chosen", prec),
                       "train_rows": int(prep.train.rows), "train_rows_per_s": round(h["train_rows_per_s"]),
                       "train_seconds": round(h["train_seconds"], 2), "wall_s": round(time.perf_counter() - t0, 2),
                       "valid_auc": round(m["valid"]["auc"], 5), "test_auc": round(m["test"]["auc"], 5),
                       "test_logloss": round(m["test"]["logloss"], 5), "gpu": gpu}

    model, bundle, results = None, None, {}
    for batch in args.batches:
        for prec in args.precisions:
            if budget.over("train", batch=batch, precision=prec):
                continue
            out = work / "bundle" if bundle is None else None  # one bundle, for the parity check
            say(f"training batch {batch} {prec} on {dev}")
            model, rec = train_once(batch, prec, str(dev), out)
            bundle = bundle or out
            results[(batch, prec)] = rec
            emit({"measure": "train", **rec})

    if model is not None:
        n = min(args.score_rows, 1 << 26)
        rows = np.resize(np.arange(test.rows), n)
        source = Batcher(test, prep.fields)
        predict_logits(model, source, rows[:65536], 65536)  # warm-up (kernels, allocator)
        for prec in args.precisions:
            if budget.over("score", precision=prec):
                continue
            _sync(dev)
            t0 = time.perf_counter()
            with autocast(prec, dev):
                predict_logits(model, source, rows, 65536)
            _sync(dev)
            s = time.perf_counter() - t0
            emit({"measure": "score", "device": str(dev), "precision": prec, "rows": n, "batch": 65536,
                  "seconds": round(s, 3), "rows_per_s": round(n / s), "gpu": gpu})

    if bundle is not None and not budget.over("parity"):
        k = min(args.parity_rows, test.rows)
        source = Batcher(test, prep.fields)
        idx, val, y = source(slice(0, k))
        idx_np, val_np = idx.numpy(), val.numpy()
        scored = {}
        for where in ("cpu", str(dev)):
            pred = Predictor(bundle, device=where)
            scored[where] = sigmoid(np.concatenate([pred.logits(idx_np[s: s + 65536], val_np[s: s + 65536])
                                                    for s in range(0, k, 65536)]))
        p_cpu, p_dev = scored["cpu"], scored[str(dev)]
        labels = y.numpy()
        dp = float(np.abs(p_cpu - p_dev).max())
        emit({"measure": "parity", "bundle": str(bundle), "rows": k, "device": str(dev), "max_abs_dp": dp,
              "auc_cpu": round(auc(labels, p_cpu), 6), "auc_device": round(auc(labels, p_dev), 6),
              "auc_diff": abs(auc(labels, p_cpu) - auc(labels, p_dev)), "ok": dp <= 1e-4, "gpu": gpu})

    if args.cpu_reference and dev.type != "cpu" and not budget.over("cpu_reference"):
        batch = max(args.batches)
        say(f"CPU reference: batch {batch} fp32")
        _, rec = train_once(batch, "fp32", "cpu", None)
        emit({"measure": "cpu_reference", **rec})
        gpu_bf16 = results.get((batch, "bf16"))
        if gpu_bf16 is not None:
            gap = gpu_bf16["test_auc"] - rec["test_auc"]
            emit({"measure": "auc_gap", "batch": batch, "gpu_bf16_test_auc": gpu_bf16["test_auc"],
                  "cpu_fp32_test_auc": rec["test_auc"], "gap": round(gap, 5), "within_0.002": abs(gap) <= 0.002,
                  "gpu": gpu})
    emit({"measure": "done", "elapsed_s": round(budget.elapsed(), 1)})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.cmd == "check" or not str(args.device).startswith("cpu"):
        why = cuda_problem()
        if why is not None:
            print(no_cuda_message(why), file=sys.stderr)
            return NO_CUDA_EXIT
        if args.cmd == "check":
            import torch

            print(f"CUDA device: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
            return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
