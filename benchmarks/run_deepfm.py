"""deepfm's side of the side-by-side benchmark: the same protocol and JSON keys as peers/run_peer.py.

    python benchmarks/run_deepfm.py --data DIR --out RESULT.json [--embedding-update sparse]

Preprocessing is deepfm's own path (Arrow reader, numeric columns parsed by the CSV parser, vocabulary
fit on train with min-count, encode train, valid and test into the in-memory store; no cache, files read
inside the timer; module imports outside it, as for the peers). Training is
``deepfm.train.trainer.fit`` with the paper's config (embedding 10, 400-400-400 ReLU, dropout 0.5, Adam
1e-3, batch 4096, no batch norm); scoring is ``predict_logits`` over the encoded test set; the 1-row
latency is the model's forward on one encoded test row (as for the peers).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import pandas  # noqa: F401  pyarrow imports it on first use (~0.5 s); the peers import it at the top too,
import torch  # so every system's library imports stay outside its timers
from gemm import measure as gemm_measure  # benchmarks/gemm.py, next to this script

from deepfm.data import readers
from deepfm.data.preprocess import Preprocessor
from deepfm.data.store import Batcher, layout
from deepfm.models import ModelConfig, build_model
from deepfm.serve.fastpath import NumpyForward
from deepfm.train.metrics import evaluate
from deepfm.train.trainer import TrainConfig, fit, predict_logits, seed_everything, set_threads, sigmoid


def latency_ms(model: torch.nn.Module, idx: torch.Tensor, val: torch.Tensor, warmup: int = 50,
               calls: int = 1000) -> tuple[float, float]:
    """1-row predict through deepfm's small-batch path (serve.fastpath, what Predictor uses for <= 256
    rows), on one encoded row: logits and the sigmoid."""
    fwd = NumpyForward(model)
    i, v = idx.numpy(), val.numpy()
    times = []
    for n in range(warmup + calls):
        t0 = time.perf_counter()
        1.0 / (1.0 + np.exp(-fwd(i, v)))
        if n >= warmup:
            times.append(time.perf_counter() - t0)
    t = np.array(times) * 1e3
    return float(np.percentile(t, 50)), float(np.percentile(t, 99))


def run(data: Path, threads: int, batch: int, min_count: int, epochs: int, embed: int, seed: int,
        embedding_update: str, precision: str, train_limit: int = 0) -> dict:
    set_threads(threads)
    seed_everything(seed)
    schema = readers.default_schema("criteo").with_overrides(min_count=min_count)
    t0 = time.perf_counter()
    tr = readers.read(data / "train.tsv", "criteo", schema)
    pre = Preprocessor(schema)
    enc_train = pre.fit_transform(tr)
    del tr
    enc_valid = pre.transform(readers.read(data / "valid.tsv", "criteo", schema))
    enc_test = pre.transform(readers.read(data / "test.tsv", "criteo", schema))
    prep_s = time.perf_counter() - t0
    rows_total = enc_train.rows + enc_valid.rows + enc_test.rows

    fields = layout(pre)
    model = build_model(fields, ModelConfig(embed_dim=embed, hidden=[400, 400, 400], dropout=0.5))
    cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=1e-3, threads=threads, seed=seed,
                      embedding_update=embedding_update, precision=precision)
    used = enc_train.rows if not train_limit else min(train_limit, enc_train.rows)
    hist = fit(model, Batcher(enc_train, fields), cfg, train_rows=np.arange(used), progress=False)
    train_s = sum(h["train_seconds"] for h in hist)
    # the GEMM-bound limit measured in this process right after training (outside every timer): this VM's
    # speed drifts 10-25% within minutes, so the limit measured at the start of a run (before the peers)
    # can be far from the speed this training ran at
    gemm_now = gemm_measure(threads, windows=5)

    test = Batcher(enc_test, fields)
    t0 = time.perf_counter()
    logits = predict_logits(model, test, batch_size=65536)
    score_s = time.perf_counter() - t0
    m = evaluate(np.asarray(enc_test.label), sigmoid(logits))
    idx, val, _ = test(slice(0, 1))
    p50, p99 = latency_ms(model, idx, val)
    return {
        "system": "deepfm" + ("" if embedding_update == "dense" else f"-{embedding_update}")
                  + ("" if precision == "fp32" else f"-{precision}"),
        "version": __import__("deepfm").__version__,
        "preprocess_seconds": prep_s, "preprocess_rows_per_s": rows_total / prep_s,
        "train_seconds": train_s, "train_samples_per_s": used * epochs / train_s, "train_rows_used": used,
        "score_seconds": score_s, "score_samples_per_s": enc_test.rows / score_s,
        "score_path": "predict_logits over the encoded store, batch 65536",
        "latency_p50_ms": p50, "latency_p99_ms": p99,
        "latency_path": "serve.fastpath.NumpyForward (eval-mode weights) on 1 encoded row, + sigmoid",
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "test_auc": m["auc"], "test_logloss": m["logloss"],
        "gemm_after_train": gemm_now,
        "embedding_rows": int(model.v.weight.shape[0]),
        "params": int(sum(p.numel() for p in model.parameters())),
        "notes": [f"embedding_update={embedding_update}", f"precision={precision}",
                  "numeric fields: log transform, value x vector (paper); missing -> its own vector"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--min-count", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--embed", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embedding-update", choices=["dense", "sparse"], default="dense")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--train-limit", type=int, default=0, help="train on the first N training rows only")
    a = ap.parse_args()
    res = run(a.data, a.threads, a.batch, a.min_count, a.epochs, a.embed, a.seed, a.embedding_update,
              a.precision, a.train_limit)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
