"""Peer side of the quality harness (scripts/quality.py): one peer library's DeepFM, with that library's own
documented defaults, trained on already-encoded features, scored on test. Run with the peers venv
(benchmarks/peers/setup_peers.sh, which installs torch-rechub too)::

    benchmarks/.peers-venv/bin/python benchmarks/peers/quality_peer.py --system torchfm --data enc.npz --out r.json

``--data`` is the .npz that scripts/quality.py exports from deepfm's preprocessing (so every system sees the
same vocabularies, min-count and split): ``{train,valid,test}_{idx,val,y}`` in deepfm's slot layout and
``field_sizes``/``field_kinds``/``field_slots``. Every slot becomes one categorical feature for the peer:
a categorical slot keeps its index; a numeric slot becomes 16 equal-frequency bins fitted on train (plus
a missing bin), as torchfm's and FuxiCTR's Criteo recipes bucket counts; a multi-valued slot (MovieLens
genres) becomes one categorical feature per position, padding its own value.

Protocol, the same for every peer: at most ``--max-epochs`` (20) epochs; after each, validation AUC;
stop after ``--patience`` (2) epochs without gain and score test with the best epoch's weights (the early
stopping that torchfm's examples/main.py and torch-rechub's CTRTrainer do). The model hyperparameters,
optimiser, loss, batch size and init are the library's documented defaults / example settings:

- ``deepctr``: DeepCTR-Torch 0.3.0 examples/run_classification_criteo.py: SparseFeat embedding_dim=4,
  DeepFM(task='binary', l2_reg_embedding=1e-5) with its defaults (dnn 256-128, dropout 0, init_std 1e-4,
  l2_reg_linear 1e-5), compile('adam', 'binary_crossentropy'), fit(batch_size=256).
- ``torchfm``: pytorch-fm 0.7.0 examples/main.py: DeepFactorizationMachineModel(embed_dim=16,
  mlp_dims=(16, 16), dropout=0.2), BCELoss, Adam(lr=1e-3, weight_decay=1e-6), batch 2048, EarlyStopper(2).
- ``rechub``: torch-rechub 0.9.0 examples/ranking/run_criteo.py: SparseFeature(embed_dim=16),
  DeepFM(mlp_params={dims: [256, 128], dropout: 0.2, activation: relu}), BCELoss, Adam(lr=1e-3,
  weight_decay=1e-3), batch 2048.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def categorical(d: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[int]]:
    """deepfm slots -> per-split int64 [N, C] categorical codes and labels, plus each column's vocab size."""
    kinds = [str(k) for k in d["field_kinds"]]
    sizes, slots = d["field_sizes"].tolist(), d["field_slots"].tolist()
    cols: dict[str, list[np.ndarray]] = {s: [] for s in ("train", "valid", "test")}
    vocab: list[int] = []
    start = 0
    for kind, size, n in zip(kinds, sizes, slots, strict=True):
        for j in range(start, start + n):
            if kind == "num":
                v = d["train_val"][:, j][d["train_idx"][:, j] == 0]
                edges = np.unique(np.quantile(v, np.linspace(0, 1, 17)[1:-1])) if v.size else np.zeros(0)
                for s in cols:
                    idx, val = d[f"{s}_idx"][:, j], d[f"{s}_val"][:, j]
                    cols[s].append(np.where(idx == 1, edges.size + 1, np.searchsorted(edges, val)))
                vocab.append(edges.size + 2)
            elif kind == "multi":
                for s in cols:  # padding (value 0) is its own value
                    cols[s].append(np.where(d[f"{s}_val"][:, j] == 0, size, d[f"{s}_idx"][:, j]))
                vocab.append(size + 1)
            else:
                for s in cols:
                    cols[s].append(d[f"{s}_idx"][:, j])
                vocab.append(size)
        start += n
    X = {s: np.stack(c, axis=1).astype(np.int64) for s, c in cols.items()}
    y = {s: d[f"{s}_y"].astype(np.float32).ravel() for s in cols}
    return X, y, vocab


def metrics(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    p = np.clip(np.asarray(p, dtype=np.float64).ravel(), 1e-7, 1 - 1e-7)
    return float(roc_auc_score(y, p)), float(log_loss(y, p, labels=[0, 1]))


def torch_loop(model: torch.nn.Module, forward: Any, X: dict, y: dict, batch: int, opt: torch.optim.Optimizer,
               args: argparse.Namespace, extra_loss: Any = None) -> tuple[dict[str, Any], list[dict]]:
    """The examples' loop (BCELoss on the model's probabilities, Adam) with early stopping on valid AUC."""
    loss_fn = torch.nn.BCELoss()
    Xt = {s: torch.from_numpy(v) for s, v in X.items()}
    yt = {s: torch.from_numpy(v) for s, v in y.items()}

    @torch.no_grad()
    def predict(split: str) -> np.ndarray:
        model.eval()
        out = [forward(Xt[split][i: i + 8192]) for i in range(0, len(yt[split]), 8192)]
        model.train()
        return torch.cat(out).numpy()

    best, best_state, bad, hist = -1.0, None, 0, []
    n = len(yt["train"])
    for epoch in range(1, args.max_epochs + 1):
        perm = torch.randperm(n)
        model.train()
        for i in range(0, n, batch):
            sel = perm[i: i + batch]
            p = forward(Xt["train"][sel])
            loss = loss_fn(p, yt["train"][sel])
            if extra_loss is not None:
                loss = loss + extra_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
        auc, ll = metrics(y["valid"], predict("valid"))
        hist.append({"epoch": epoch, "valid_auc": auc, "valid_logloss": ll})
        if auc > best:
            best, best_state, bad = auc, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= args.patience:
                break
    model.load_state_dict(best_state)
    va, vl = metrics(y["valid"], predict("valid"))
    ta, tl = metrics(y["test"], predict("test"))
    best_epoch = max(hist, key=lambda h: h["valid_auc"])["epoch"]
    return {"valid_auc": va, "valid_logloss": vl, "test_auc": ta, "test_logloss": tl, "epochs": len(hist),
            "best_epoch": best_epoch}, hist


def run_torchfm(X: dict, y: dict, vocab: list[int], args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    from torchfm.model.dfm import DeepFactorizationMachineModel

    model = DeepFactorizationMachineModel(np.array(vocab), embed_dim=16, mlp_dims=(16, 16), dropout=0.2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
    res, hist = torch_loop(model, model, X, y, 2048, opt, args)
    return {**res, "version": version("torchfm"), "history": hist, "notes": [
        "pytorch-fm examples/main.py settings: embed_dim 16, mlp_dims (16, 16), dropout 0.2, Adam lr 1e-3 "
        "weight_decay 1e-6, batch 2048, BCELoss, early stopping on valid AUC (EarlyStopper, num_trials 2)",
        "torchfm's MLP always has BatchNorm1d; FeaturesLinear keeps nn.Embedding's N(0, 1) init"]}


def run_rechub(X: dict, y: dict, vocab: list[int], args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    from torch_rechub.basic.features import SparseFeature
    from torch_rechub.models.ranking import DeepFM

    names = [f"f{i}" for i in range(len(vocab))]
    feats = [SparseFeature(n, vocab_size=v, embed_dim=16) for n, v in zip(names, vocab, strict=True)]
    model = DeepFM(deep_features=feats, fm_features=feats,
                   mlp_params={"dims": [256, 128], "dropout": 0.2, "activation": "relu"})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)

    def forward(xb: torch.Tensor) -> torch.Tensor:
        return model({n: xb[:, i] for i, n in enumerate(names)})

    res, hist = torch_loop(model, forward, X, y, 2048, opt, args)
    return {**res, "version": version("torch-rechub"), "history": hist, "notes": [
        "torch-rechub examples/ranking/run_criteo.py settings: SparseFeature embed_dim 16, MLP 256-128 "
        "dropout 0.2 relu, Adam lr 1e-3 weight_decay 1e-3, batch 2048, BCELoss; early stopping on valid AUC "
        "(CTRTrainer's earlystop_patience, here 2) in this script's loop instead of CTRTrainer"]}


def run_deepctr(X: dict, y: dict, vocab: list[int], args: argparse.Namespace) -> dict[str, Any]:
    import deepctr_torch
    from deepctr_torch.inputs import SparseFeat
    from deepctr_torch.models import DeepFM

    names = [f"f{i}" for i in range(len(vocab))]
    cols = [SparseFeat(n, vocabulary_size=v, embedding_dim=4) for n, v in zip(names, vocab, strict=True)]
    model = DeepFM(cols, cols, task="binary", l2_reg_embedding=1e-5, seed=args.seed, device="cpu")
    model.compile("adam", "binary_crossentropy")
    inp = {s: {n: X[s][:, i] for i, n in enumerate(names)} for s in X}
    best, best_state, bad, hist = -1.0, None, 0, []
    for epoch in range(1, args.max_epochs + 1):
        with contextlib.redirect_stdout(sys.stderr):
            model.fit(inp["train"], y["train"], batch_size=256, epochs=1, verbose=0)
        auc, ll = metrics(y["valid"], model.predict(inp["valid"], batch_size=8192))
        hist.append({"epoch": epoch, "valid_auc": auc, "valid_logloss": ll})
        if auc > best:
            best, best_state, bad = auc, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= args.patience:
                break
    model.load_state_dict(best_state)
    va, vl = metrics(y["valid"], model.predict(inp["valid"], batch_size=8192))
    ta, tl = metrics(y["test"], model.predict(inp["test"], batch_size=8192))
    return {"valid_auc": va, "valid_logloss": vl, "test_auc": ta, "test_logloss": tl, "epochs": len(hist),
            "best_epoch": max(hist, key=lambda h: h["valid_auc"])["epoch"], "version": deepctr_torch.__version__,
            "history": hist, "notes": [
                "DeepCTR-Torch examples/run_classification_criteo.py settings: SparseFeat embedding_dim 4, "
                "DeepFM(task='binary', l2_reg_embedding=1e-5) defaults (DNN 256-128, no dropout, init_std 1e-4), "
                "compile('adam', 'binary_crossentropy'), fit(batch_size=256); one fit epoch at a time with "
                "early stopping on valid AUC (patience 2, best weights) around it"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--system", required=True, choices=["deepctr", "torchfm", "rechub"])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-epochs", type=int, default=20)
    ap.add_argument("--patience", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    with np.load(args.data) as d:
        X, y, vocab = categorical(d)
    t0 = time.perf_counter()
    res = {"deepctr": run_deepctr, "torchfm": run_torchfm, "rechub": run_rechub}[args.system](X, y, vocab, args)
    res["seconds"] = time.perf_counter() - t0
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
