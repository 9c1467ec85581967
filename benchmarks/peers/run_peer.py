"""Peer side of the side-by-side DeepFM speed benchmark.

Runs one peer CTR library end to end on Criteo-format TSV files and writes one
JSON result.  Run it with the peers venv made by ``setup_peers.sh``::

    benchmarks/.peers-venv/bin/python benchmarks/peers/run_peer.py \\
        --system deepctr --data DIR --out result.json

``DIR`` holds ``train.tsv``, ``valid.tsv`` and ``test.tsv`` in the Criteo
Kaggle layout: no header, tab separated, ``label, I1..I13, C1..C26``; integer
counts and 8-hex-digit categoricals, either may be empty (missing).

Protocol (the same for every system):

* Shared model config: DeepFM, embedding ``--embed`` (10), DNN 400-400-400
  ReLU, dropout 0.5, no batch norm, Adam lr 1e-3, batch ``--batch`` (4096),
  ``--epochs`` (1), ``--min-count`` (10): a categorical value seen fewer times
  than that in train.tsv, or unseen there, maps to the field's one OOV id.
  ``torch.set_num_threads(--threads)``.
* Everything else follows the library's own README / examples (that is the
  point of the comparison); each deviation or differing default is listed in
  the JSON ``notes``.

  - ``deepctr``: DeepCTR-Torch's ``examples/run_classification_criteo.py``:
    pandas ``read_csv``, ``fillna``, ``LabelEncoder`` per sparse field (after a
    vectorised pandas min-count -> OOV mapping), ``MinMaxScaler`` on dense
    fields, ``SparseFeat``/``DenseFeat`` columns, ``DeepFM``,
    ``compile``/``fit``/``predict``.
  - ``torchfm``: pytorch-fm's ``DeepFactorizationMachineModel`` with the
    ``CriteoDataset`` feature recipe (integers -> ``int(log(v)**2)`` buckets,
    every field categorical, min-count threshold) done vectorised in
    pandas/numpy instead of its per-row lmdb cache, then the training loop of
    its ``examples/main.py`` (``Dataset`` + ``DataLoader``, ``BCELoss``, Adam).
  - ``fuxictr``: FuxiCTR's ``FeatureProcessor`` (its Criteo
    ``CustomizedFeatureProcessor``: integers bucketed by
    ``convert_to_bucket``) + ``build_dataset`` (polars + Ray -> parquet) +
    ``RankDataLoader``, and ``BaseModel.fit``/``predict``; the DeepFM class
    (model_zoo, not in the wheel) is rebuilt here from fuxictr's layers as in
    ``model_zoo/DeepFM/DeepFM_torch/src/DeepFM.py``.

Measured (``time.perf_counter``):

* ``preprocess_seconds``: read + encode train, valid and test into the
  library's model input (files read inside the timer);
  ``preprocess_rows_per_s`` = (train+valid+test rows) / that.
* ``train_seconds``: wall time of the library's fit for the epochs, minus any
  validation pass the library runs inside fit (reported separately);
  ``train_samples_per_s`` = train rows * epochs / that.
* ``score_seconds``: batch scoring of test through the library's predict path
  (``score_path`` says which and at which batch size).
* ``latency_p50_ms``/``latency_p99_ms``: one already-encoded test row, 50
  warm-up calls then 1000 timed calls under ``torch.no_grad``, through the
  library's predict API where it has one for a single row, else forward.
* ``peak_rss_mb``: ``getrusage(RUSAGE_SELF).ru_maxrss`` at the end.
* ``test_auc``/``test_logloss``: sklearn on the predicted probabilities.
* ``embedding_rows``: rows of the ``embed``-wide embedding tables (the 1-wide
  linear tables, where separate, are listed in ``linear_embedding_rows``);
  ``params``: all trainable parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import log_loss, roc_auc_score

LABEL = "label"
DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
COLUMNS = [LABEL, *DENSE, *SPARSE]
SPLITS = ("train", "valid", "test")
HIDDEN = (400, 400, 400)
DROPOUT = 0.5
LR = 1e-3
OOV = "__OOV__"
WARMUP_CALLS = 50
TIMED_CALLS = 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", required=True, choices=["deepctr", "torchfm", "fuxictr"])
    p.add_argument("--data", required=True, type=Path, help="dir with train/valid/test.tsv")
    p.add_argument("--out", required=True, type=Path, help="result JSON path")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--min-count", type=int, default=10)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--embed", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--torchfm-strip-bn",
        action="store_true",
        help="torchfm only: replace the BatchNorm1d that torchfm's MLP always adds with Identity",
    )
    p.add_argument(
        "--train-limit",
        type=int,
        default=0,
        help="train on the first N training rows only (a throughput measurement on a huge vocabulary: "
        "preprocessing still fits on every training row); deepctr and torchfm only",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="fuxictr only: where its parquet files / checkpoints go (default: a temp dir)",
    )
    return p.parse_args(argv)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_path(data: Path, split: str) -> Path:
    return data / f"{split}.tsv"


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def latency_ms(call: Callable[[], Any]) -> dict[str, float]:
    """p50/p99/mean of ``call()`` in ms: WARMUP_CALLS untimed, then TIMED_CALLS timed."""
    with torch.no_grad():
        for _ in range(WARMUP_CALLS):
            call()
        times = np.empty(TIMED_CALLS)
        for i in range(TIMED_CALLS):
            t0 = time.perf_counter()
            call()
            times[i] = time.perf_counter() - t0
    times *= 1e3
    return {
        "latency_p50_ms": float(np.percentile(times, 50)),
        "latency_p99_ms": float(np.percentile(times, 99)),
        "latency_mean_ms": float(times.mean()),
    }


def quality(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, float]:
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    y_prob = np.asarray(y_prob, dtype=np.float64).reshape(-1)
    return {
        "test_auc": float(roc_auc_score(y_true, y_prob)),
        "test_logloss": float(log_loss(y_true, y_prob)),
    }


def read_tsv(path: Path) -> pd.DataFrame:
    """Criteo TSV -> DataFrame with named columns, as the pandas-based peers read it."""
    return pd.read_csv(path, sep="\t", header=None, names=COLUMNS)


# --------------------------------------------------------------------------- deepctr


def run_deepctr(args: argparse.Namespace) -> dict[str, Any]:
    import deepctr_torch
    from deepctr_torch.inputs import DenseFeat, SparseFeat, get_feature_names
    from deepctr_torch.models import DeepFM
    from sklearn.preprocessing import LabelEncoder, MinMaxScaler

    notes = [
        "preprocessing as DeepCTR-Torch examples/run_classification_criteo.py: pandas read_csv, "
        "fillna('-1') sparse / fillna(0) dense, LabelEncoder per sparse field, MinMaxScaler on "
        "dense fields (both fitted on train only, not on train+test as the example does)",
        "min-count -> OOV done in pandas (value_counts/isin/where) before LabelEncoder; the "
        "OOV token is always in the vocabulary, so each field has exactly one OOV id",
        "sklearn LabelEncoder on string columns maps values through a Python dict per element "
        "(sklearn.utils._encode._map_to_integer): a per-sample Python loop in preprocessing",
        "DeepCTR defaults kept that differ from the shared config: l2_reg_embedding=1e-5 and "
        "l2_reg_linear=1e-5 (its get_regularization_loss sums the squares of every full "
        "embedding table on every step), init_std=1e-4 normal init, loss is "
        "F.binary_cross_entropy with reduction='sum' (not mean)",
        "dense fields enter both the linear part and the DNN (DenseFeat), as in the example",
        "fit(verbose=0, shuffle=True), no validation inside fit (DeepCTR default); valid.tsv is "
        "read and encoded but not used",
        f"batch scoring: model.predict(test, batch_size={args.batch}) (DeepCTR default is 256)",
        "latency: model.predict(one-row feature dict) - DeepCTR's predict API, which builds a "
        "TensorDataset + DataLoader per call",
        "deepctr_torch import starts a background thread that queries PyPI for a newer version",
    ]

    t0 = time.perf_counter()
    frames = {s: read_tsv(split_path(args.data, s)) for s in SPLITS}
    train = frames["train"]
    for df in frames.values():
        df[SPARSE] = df[SPARSE].fillna("-1")
        df[DENSE] = df[DENSE].fillna(0)
    vocab_sizes: dict[str, int] = {}
    for feat in SPARSE:
        counts = train[feat].value_counts()
        keep = counts.index[counts >= args.min_count]
        for df in frames.values():
            col = df[feat]
            df[feat] = col.where(col.isin(keep), OOV)
        lbe = LabelEncoder()
        lbe.fit(pd.concat([train[feat], pd.Series([OOV], dtype=train[feat].dtype)]))
        for df in frames.values():
            df[feat] = lbe.transform(df[feat])
        vocab_sizes[feat] = len(lbe.classes_)
    mms = MinMaxScaler(feature_range=(0, 1))
    train[DENSE] = mms.fit_transform(train[DENSE])
    for s in ("valid", "test"):
        frames[s][DENSE] = mms.transform(frames[s][DENSE])

    fixlen_feature_columns = [
        SparseFeat(feat, vocabulary_size=vocab_sizes[feat], embedding_dim=args.embed) for feat in SPARSE
    ] + [DenseFeat(feat, 1) for feat in DENSE]
    dnn_feature_columns = fixlen_feature_columns
    linear_feature_columns = fixlen_feature_columns
    feature_names = get_feature_names(linear_feature_columns + dnn_feature_columns)
    inputs = {s: {name: frames[s][name] for name in feature_names} for s in SPLITS}
    labels = {s: frames[s][[LABEL]].values for s in SPLITS}
    preprocess_seconds = time.perf_counter() - t0
    rows = {s: len(frames[s]) for s in SPLITS}

    model = DeepFM(
        linear_feature_columns=linear_feature_columns,
        dnn_feature_columns=dnn_feature_columns,
        dnn_hidden_units=HIDDEN,
        dnn_dropout=DROPOUT,
        task="binary",
        seed=args.seed,
        device="cpu",
    )
    model.compile(torch.optim.Adam(model.parameters(), lr=LR), "binary_crossentropy")

    if args.train_limit:
        n = args.train_limit
        inputs["train"] = {k: v.iloc[:n] for k, v in inputs["train"].items()}
        labels["train"] = labels["train"][:n]
        rows["train_used"] = len(labels["train"])
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # fit prints the device and sample counts
        model.fit(
            inputs["train"],
            labels["train"],
            batch_size=args.batch,
            epochs=args.epochs,
            verbose=0,
        )
    train_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    pred = model.predict(inputs["test"], batch_size=args.batch)
    score_seconds = time.perf_counter() - t0

    one_row = {name: col.iloc[:1] for name, col in inputs["test"].items()}
    lat = latency_ms(lambda: model.predict(one_row))

    return {
        "version": deepctr_torch.__version__,
        "rows": rows,
        "preprocess_seconds": preprocess_seconds,
        "train_seconds": train_seconds,
        "score_seconds": score_seconds,
        "score_path": f"DeepFM.predict(dict of test columns, batch_size={args.batch})",
        "latency_path": "DeepFM.predict(dict of 1-row columns) (default batch_size=256)",
        **lat,
        **quality(labels["test"], pred),
        "embedding_rows": sum(e.num_embeddings for e in model.embedding_dict.values()),
        "linear_embedding_rows": sum(e.num_embeddings for e in model.linear_model.embedding_dict.values()),
        "params": count_params(model),
        "defaults_differing": {
            "l2_reg_embedding": 1e-5,
            "l2_reg_linear": 1e-5,
            "init_std": 1e-4,
            "loss_reduction": "sum",
        },
        "notes": notes,
    }


# --------------------------------------------------------------------------- torchfm


class CriteoArrays(torch.utils.data.Dataset):
    """Already-encoded Criteo rows: ``(fields int64[39], label)`` per item, like torchfm's CriteoDataset."""

    def __init__(self, fields: np.ndarray, labels: np.ndarray) -> None:
        self.fields = fields
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.int64]:
        return self.fields[index], self.labels[index]


def torchfm_numeric(values: pd.Series) -> pd.Series:
    """torchfm.dataset.criteo.convert_numeric_feature, vectorised.

    ``'' -> 'NULL'``; ``v > 2 -> int(log(v)**2)``; else ``v - 2``.  Missing stays
    NaN (its own category, like 'NULL'); the float values stand in for the strings.
    """
    v = values.to_numpy(dtype=np.float64)
    big = v > 2
    out = v - 2
    out[big] = np.floor(np.log(v[big]) ** 2)
    return pd.Series(out, index=values.index)


def run_torchfm(args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    from torch.utils.data import DataLoader
    from torchfm.model.dfm import DeepFactorizationMachineModel

    notes = [
        "features as torchfm.dataset.criteo.CriteoDataset: every field categorical, integers "
        "bucketed by convert_numeric_feature (v>2: int(log(v)**2), else v-2, ''->NULL), a value "
        "with count < min-count in train (or unseen) -> the field's OOV id = len(kept); missing "
        "values are an ordinary category",
        "that recipe is done vectorised in pandas/numpy (value_counts + Index.get_indexer) "
        "instead of torchfm's per-row Python + lmdb cache; its vocabulary is built from "
        "train.tsv only",
        "training loop as torchfm examples/main.py train(): torch Dataset + DataLoader, "
        "model(fields), BCELoss, model.zero_grad(), backward, Adam step, loss.item(); "
        "no tqdm bar",
        "the Dataset returns one row per __getitem__ and DataLoader's default collate stacks "
        f"{args.batch} numpy rows per batch: a per-sample Python loop in the input pipeline, "
        "as with torchfm's own CriteoDataset",
        "DataLoader(shuffle=True, num_workers=0): examples/main.py uses num_workers=8 and no "
        "shuffle (its random_split already permutes); 8 workers would oversubscribe 2 cores",
        "Adam weight_decay=1e-6: the default of examples/main.py (--weight_decay)",
        "after each epoch the validation AUC is computed as in examples/main.py (outside the train timer)",
        "batch scoring: examples/main.py test() loop (DataLoader over test, batch "
        f"{args.batch}, model(fields) under no_grad, .tolist()); torchfm has no predict API",
        "latency: model(one-row LongTensor) forward in eval mode under no_grad",
        "torchfm's FeaturesLinear keeps nn.Embedding's default N(0, 1) init, so the initial "
        "linear logit has std ~sqrt(39) ~ 6: with few steps (e.g. 48k rows / 4096 = 12) "
        "test AUC stays near 0.5 and logloss is large; it recovers with more steps",
        "torchfm.dataset imports lmdb, which torchfm does not declare; it is not installed "
        "(torchfm.dataset is not used)",
    ]
    if args.torchfm_strip_bn:
        notes.append(
            "--torchfm-strip-bn: the BatchNorm1d layers torchfm's MultiLayerPerceptron always "
            "inserts were replaced by Identity (shared config: no batch norm)"
        )
    else:
        notes.append(
            "torchfm's MultiLayerPerceptron always inserts BatchNorm1d after each Linear (no "
            "option to disable): kept, unlike the shared config (see --torchfm-strip-bn)"
        )

    t0 = time.perf_counter()
    frames = {s: read_tsv(split_path(args.data, s)) for s in SPLITS}
    fields = {s: np.empty((len(frames[s]), len(DENSE) + len(SPARSE)), np.int64) for s in SPLITS}
    field_dims = []
    for j, feat in enumerate(DENSE + SPARSE):
        cols = {s: frames[s][feat] for s in SPLITS}
        if feat in DENSE:
            cols = {s: torchfm_numeric(c) for s, c in cols.items()}
        counts = cols["train"].value_counts(dropna=False)
        kept = pd.Index(counts.index[counts >= args.min_count])
        oov = len(kept)
        for s in SPLITS:
            idx = kept.get_indexer(cols[s])
            idx[idx < 0] = oov
            fields[s][:, j] = idx
        field_dims.append(oov + 1)
    labels = {s: frames[s][LABEL].to_numpy(np.int64) for s in SPLITS}
    datasets = {s: CriteoArrays(fields[s], labels[s]) for s in SPLITS}
    preprocess_seconds = time.perf_counter() - t0
    rows = {s: len(frames[s]) for s in SPLITS}
    if args.train_limit:
        n = args.train_limit
        datasets["train"] = CriteoArrays(fields["train"][:n], labels["train"][:n])
        rows["train_used"] = len(datasets["train"])
    del frames
    gc.collect()

    model = DeepFactorizationMachineModel(np.array(field_dims), embed_dim=args.embed, mlp_dims=HIDDEN, dropout=DROPOUT)
    if args.torchfm_strip_bn:
        layers = model.mlp.mlp
        for i, layer in enumerate(layers):
            if isinstance(layer, torch.nn.BatchNorm1d):
                layers[i] = torch.nn.Identity()
    criterion = torch.nn.BCELoss()
    optimizer = torch.optim.Adam(params=model.parameters(), lr=LR, weight_decay=1e-6)
    train_loader = DataLoader(datasets["train"], batch_size=args.batch, shuffle=True)

    def predict(dataset: CriteoArrays) -> tuple[list[float], list[float]]:
        """examples/main.py test(), returning the predictions instead of the AUC."""
        loader = DataLoader(dataset, batch_size=args.batch)
        model.eval()
        targets, predicts = [], []
        with torch.no_grad():
            for batch_fields, target in loader:
                y = model(batch_fields)
                targets.extend(target.tolist())
                predicts.extend(y.tolist())
        return targets, predicts

    train_seconds = 0.0
    valid_auc = []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        model.train()
        total_loss = 0.0
        for batch_fields, target in train_loader:
            y = model(batch_fields)
            loss = criterion(y, target.float())
            model.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
        train_seconds += time.perf_counter() - t0
        valid_auc.append(float(roc_auc_score(*predict(datasets["valid"]))))

    t0 = time.perf_counter()
    targets, predicts = predict(datasets["test"])
    score_seconds = time.perf_counter() - t0

    one_row = torch.from_numpy(fields["test"][:1])
    model.eval()
    lat = latency_ms(lambda: model(one_row))

    return {
        "version": version("torchfm"),
        "rows": rows,
        "preprocess_seconds": preprocess_seconds,
        "train_seconds": train_seconds,
        "score_seconds": score_seconds,
        "score_path": f"examples/main.py test() loop, DataLoader batch_size={args.batch}",
        "latency_path": "model.forward(LongTensor[1, 39]) under torch.no_grad",
        **lat,
        **quality(np.array(targets), np.array(predicts)),
        "valid_auc": valid_auc,
        "embedding_rows": model.embedding.embedding.num_embeddings,
        "linear_embedding_rows": model.linear.fc.num_embeddings,
        "params": count_params(model),
        "defaults_differing": {
            "batch_norm": not args.torchfm_strip_bn,
            "weight_decay": 1e-6,
            "embedding_init": "xavier_uniform",
        },
        "notes": notes,
    }


# --------------------------------------------------------------------------- fuxictr


def fuxictr_deepfm_class() -> type:
    """model_zoo/DeepFM/DeepFM_torch/src/DeepFM.py, rebuilt from fuxictr's own layers."""
    from fuxictr.pytorch.layers import FactorizationMachine, FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel

    class DeepFM(BaseModel):
        def __init__(
            self,
            feature_map,
            model_id="DeepFM",
            gpu=-1,
            learning_rate=1e-3,
            embedding_dim=10,
            hidden_units=(64, 64, 64),
            hidden_activations="ReLU",
            net_dropout=0,
            batch_norm=False,
            embedding_regularizer=None,
            net_regularizer=None,
            **kwargs,
        ):
            super().__init__(
                feature_map,
                model_id=model_id,
                gpu=gpu,
                embedding_regularizer=embedding_regularizer,
                net_regularizer=net_regularizer,
                **kwargs,
            )
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            self.fm = FactorizationMachine(feature_map)  # LogisticRegression + FM term
            self.mlp = MLP_Block(
                input_dim=feature_map.sum_emb_out_dim(),
                output_dim=1,
                hidden_units=list(hidden_units),
                hidden_activations=hidden_activations,
                output_activation=None,
                dropout_rates=net_dropout,
                batch_norm=batch_norm,
            )
            self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs):
            X = self.get_inputs(inputs)
            feature_emb = self.embedding_layer(X)
            y_pred = self.fm(X, feature_emb)
            y_pred += self.mlp(feature_emb.flatten(start_dim=1))
            y_pred = self.output_activation(y_pred)
            return {"y_pred": y_pred}

    return DeepFM


def fuxictr_processor_class() -> type:
    """FuxiCTR's Criteo processor, reading the header-less Kaggle TSV."""
    import polars as pl
    from fuxictr.datasets.criteo import CustomizedFeatureProcessor

    class TsvCriteoProcessor(CustomizedFeatureProcessor):
        def read_data(self, data_path, data_format="csv", sep=",", n_rows=None, **kwargs):
            # FeatureProcessor.read_data, but tab separated, no header row, named columns.
            return pl.scan_csv(
                source=data_path,
                separator="\t",
                has_header=False,
                new_columns=COLUMNS,
                schema_overrides=self.dtype_dict,
                low_memory=False,
                n_rows=n_rows,
            )

    # FeatureProcessor.fit pickles itself, so the class must be reachable by name
    # at module level (Ray ships it to its workers by value via cloudpickle).
    TsvCriteoProcessor.__qualname__ = TsvCriteoProcessor.__name__
    globals()[TsvCriteoProcessor.__name__] = TsvCriteoProcessor
    return TsvCriteoProcessor


def run_fuxictr(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    import fuxictr
    import ray
    from fuxictr.features import FeatureMap
    from fuxictr.preprocess import build_dataset
    from fuxictr.preprocess.build_dataset import init_ray
    from fuxictr.pytorch.dataloaders import RankDataLoader
    from fuxictr.pytorch.torch_utils import seed_everything

    logging.basicConfig(level=logging.WARNING)
    notes = [
        "feature spec = FuxiCTR config/dataset_config/Criteo.yaml (criteo_x4): I1-I13 "
        "categorical with preprocess convert_to_bucket (v>2: floor(log(v)**2) else int(v)), "
        "C1-C26 categorical, min_categr_count as --min-count; its 'na_value' keys are ignored "
        "by fuxictr 2.3.10 (which reads 'fill_na'), so missing I -> 0.0 (a regular token) and "
        "missing C -> '' which the Tokenizer leaves out of the vocabulary, i.e. the OOV id",
        "the processor is fuxictr.datasets.criteo.CustomizedFeatureProcessor with read_data "
        "overridden to read the header-less TSV (polars scan_csv, separator='\\t', "
        "schema_overrides) - the only change to its pipeline",
        "polars<2 is pinned: fuxictr 2.3.10's own read_data calls pl.scan_csv(dtypes=...), which polars 2 removed",
        "preprocessing = build_dataset (polars statistics, then Ray Data map_batches of "
        "FeatureProcessor.transform writing parquet; Tokenizer.encode_category is a per-element "
        "Python dict lookup) + FeatureMap.load + RankDataLoader (Ray Data parquet readers); "
        "includes ray.init start-up",
        "DeepFM rebuilt from fuxictr layers (FeatureEmbedding, FactorizationMachine = "
        "LogisticRegression + inner-product FM, MLP_Block) as model_zoo DeepFM.py",
        "model params from model_zoo DeepFM_default: embedding_regularizer=0, "
        "net_regularizer=0, batch_norm=False, monitor {'AUC': 1, 'logloss': -1}, "
        "early_stop_patience=2, save_best_only=True, num_workers=3 (Ray prefetch batches); "
        "verbose=0",
        "fuxictr defaults that differ: embedding init normal(std=1e-4), Linear init "
        "xavier_normal, clip_grad_norm_(max_norm=10) every step, loss "
        "F.binary_cross_entropy(reduction='mean')",
        "BaseModel.fit evaluates valid at each epoch end, saves a checkpoint and reloads the "
        "best one at the end; train_seconds = fit wall minus that validation evaluate "
        "(valid_eval_seconds); checkpoint save/load stay in train_seconds",
        f"batch scoring: BaseModel.predict(RankDataLoader(stage='test', batch_size={args.batch}))",
        "latency: BaseModel.predict([one-row batch dict]) (its predict API iterates any iterable of batch dicts)",
        "fuxictr 2.3.10's RankDataLoader returns the loaders directly (the repo's "
        "run_expid.py calls .make_iterator() on it, which 2.3.10 lacks)",
        "the train loader's Ray random_shuffle is not seeded by seed_everything, so runs are not bit-reproducible",
        "peak_rss_mb is the driver process only; Ray worker processes are not included "
        "(peak_rss_children_mb is the largest reaped child after ray.shutdown)",
    ]

    temp_work = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="fuxictr-")) if temp_work else args.work_dir
    data_root = work / "data"
    dataset_id = "criteo_peer"
    data_dir = data_root / dataset_id
    if (data_dir / "feature_map.json").exists():
        raise SystemExit(f"{data_dir} already holds a built dataset; pass an empty --work-dir")
    params: dict[str, Any] = {
        "model": "DeepFM",
        "model_id": "DeepFM_peer",
        "dataset_id": dataset_id,
        "loss": "binary_crossentropy",
        "metrics": ["logloss", "AUC"],
        "task": "binary_classification",
        "optimizer": "adam",
        "hidden_units": list(HIDDEN),
        "hidden_activations": "relu",
        "net_regularizer": 0,
        "embedding_regularizer": 0,
        "learning_rate": LR,
        "batch_norm": False,
        "net_dropout": DROPOUT,
        "batch_size": args.batch,
        "embedding_dim": args.embed,
        "epochs": args.epochs,
        "shuffle": True,
        "seed": args.seed,
        "monitor": {"AUC": 1, "logloss": -1},
        "monitor_mode": "max",
        "early_stop_patience": 2,
        "save_best_only": True,
        "num_workers": 3,
        "verbose": 0,
        "gpu": -1,
        "model_root": str(work / "checkpoints"),
        "data_format": "csv",
        "min_categr_count": args.min_count,
    }
    feature_cols = [
        {
            "name": DENSE,
            "active": True,
            "dtype": "float",
            "type": "categorical",
            "preprocess": "convert_to_bucket",
            "na_value": 0,
        },
        {"name": SPARSE, "active": True, "dtype": "str", "type": "categorical", "na_value": ""},
    ]
    seed_everything(seed=args.seed)

    t0 = time.perf_counter()
    init_ray()  # build_dataset would start Ray itself; called first only to time it
    ray_init_seconds = time.perf_counter() - t0
    processor = fuxictr_processor_class()(
        feature_cols=feature_cols,
        label_col={"name": LABEL, "dtype": "float"},
        dataset_id=dataset_id,
        data_root=str(data_root),
    )
    train_data, valid_data, test_data = build_dataset(
        processor,
        train_data=str(split_path(args.data, "train")),
        valid_data=str(split_path(args.data, "valid")),
        test_data=str(split_path(args.data, "test")),
        data_format="csv",
        min_categr_count=args.min_count,
    )
    build_dataset_seconds = time.perf_counter() - t0 - ray_init_seconds
    params.update(train_data=train_data, valid_data=valid_data, test_data=test_data)
    feature_map = FeatureMap(dataset_id, str(data_dir))
    feature_map.load(str(data_dir / "feature_map.json"), params)
    # Keep row order for the unshuffled test loader so labels line up with predictions.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    train_gen, valid_gen = RankDataLoader(feature_map, stage="train", **params)
    test_gen = RankDataLoader(feature_map, stage="test", **params)
    preprocess_seconds = time.perf_counter() - t0
    rows = {
        "train": train_gen.num_samples,
        "valid": valid_gen.num_samples,
        "test": test_gen.num_samples,
    }

    model = fuxictr_deepfm_class()(feature_map, **params)
    os.makedirs(model.model_dir, exist_ok=True)  # run_expid's set_logger would create it

    valid_eval_seconds = 0.0
    base_evaluate = model.evaluate

    def timed_evaluate(*a: Any, **kw: Any) -> Any:
        nonlocal valid_eval_seconds
        t = time.perf_counter()
        try:
            return base_evaluate(*a, **kw)
        finally:
            valid_eval_seconds += time.perf_counter() - t

    model.evaluate = timed_evaluate
    t0 = time.perf_counter()
    model.fit(train_gen, validation_data=valid_gen, **params)
    fit_seconds = time.perf_counter() - t0
    model.evaluate = base_evaluate
    train_seconds = fit_seconds - valid_eval_seconds

    t0 = time.perf_counter()
    pred = model.predict(test_gen)
    score_seconds = time.perf_counter() - t0
    y_test = pd.read_parquet(test_data, columns=[LABEL])[LABEL].to_numpy()
    if len(y_test) != len(pred):
        raise RuntimeError(f"fuxictr predicted {len(pred)} rows for {len(y_test)} labels")

    first = next(iter(test_gen))
    one_row = {k: v[:1] for k, v in first.items()}
    lat = latency_ms(lambda: model.predict([one_row]))

    embedding_rows = sum(
        e.num_embeddings
        for e in model.embedding_layer.embedding_layer.embedding_layers.values()
        if isinstance(e, torch.nn.Embedding)
    )
    linear_rows = sum(
        e.num_embeddings
        for e in model.fm.lr_layer.embedding_layer.embedding_layer.embedding_layers.values()
        if isinstance(e, torch.nn.Embedding)
    )
    result = {
        "version": fuxictr.__version__,
        "rows": rows,
        "preprocess_seconds": preprocess_seconds,
        "preprocess_breakdown": {
            "ray_init_seconds": ray_init_seconds,
            "build_dataset_seconds": build_dataset_seconds,
            "feature_map_and_loaders_seconds": (preprocess_seconds - ray_init_seconds - build_dataset_seconds),
        },
        "train_seconds": train_seconds,
        "fit_seconds": fit_seconds,
        "valid_eval_seconds": valid_eval_seconds,
        "score_seconds": score_seconds,
        "score_path": f"BaseModel.predict(RankDataLoader test, batch_size={args.batch})",
        "latency_path": "BaseModel.predict([1-row batch dict]) under torch.no_grad",
        **lat,
        **quality(y_test, pred),
        "embedding_rows": embedding_rows,
        "linear_embedding_rows": linear_rows,
        "params": count_params(model),
        "defaults_differing": {
            "embedding_init": "normal(std=1e-4)",
            "clip_grad_norm": 10.0,
            "validation_in_fit": True,
        },
        "notes": notes,
    }
    ray.shutdown()
    gc.collect()
    if temp_work:
        shutil.rmtree(work, ignore_errors=True)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["peak_rss_children_mb"] = children
    return result


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


RUNNERS = {"deepctr": run_deepctr, "torchfm": run_torchfm, "fuxictr": run_fuxictr}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    if args.train_limit and args.system == "fuxictr":
        raise SystemExit("--train-limit is not supported for fuxictr")
    result = RUNNERS[args.system](args)
    rows = result.pop("rows")
    total_rows = rows["train"] + rows["valid"] + rows["test"]
    out = {
        "system": args.system,
        "version": result.pop("version"),
        "torch_version": torch.__version__,
        "config": {
            "threads": args.threads,
            "batch": args.batch,
            "min_count": args.min_count,
            "epochs": args.epochs,
            "embed": args.embed,
            "seed": args.seed,
            "hidden": list(HIDDEN),
            "dropout": DROPOUT,
            "lr": LR,
        },
        "rows": rows,
        "preprocess_seconds": result["preprocess_seconds"],
        "preprocess_rows_per_s": total_rows / result["preprocess_seconds"],
        "train_seconds": result["train_seconds"],
        "train_samples_per_s": rows.get("train_used", rows["train"]) * args.epochs / result["train_seconds"],
        "score_seconds": result["score_seconds"],
        "score_samples_per_s": rows["test"] / result["score_seconds"],
    }
    for key in ("preprocess_seconds", "train_seconds", "score_seconds"):
        result.pop(key)
    notes = result.pop("notes")
    out.update(result)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["notes"] = notes
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(out, indent=2, default=json_default)
    args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
