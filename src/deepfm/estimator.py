"""A scikit-learn-style estimator over pandas / Polars / Arrow tables.

    clf = DeepFMClassifier(preset="default", epochs=5).fit(X_train, y_train)
    p = clf.predict_proba(X_test)[:, 1]
    clf.save("model/");  DeepFMClassifier.load("model/")

X holds raw feature values (strings/numbers as in the logs); the schema is inferred from X unless given.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from deepfm import pipeline
from deepfm.data import readers
from deepfm.data.infer import infer_fields
from deepfm.data.preprocess import Preprocessor
from deepfm.errors import DataError, DeepFMError
from deepfm.schema import Schema
from deepfm.serve import bundle as bundle_mod
from deepfm.serve.predictor import Predictor


def to_arrow(X: Any) -> pa.Table:
    """pandas / Polars DataFrame, Arrow table or dict of columns -> Arrow table."""
    if isinstance(X, pa.Table):
        return X
    if hasattr(X, "to_arrow"):  # polars
        return X.to_arrow()
    if hasattr(X, "columns") and hasattr(X, "iloc"):  # pandas
        return pa.Table.from_pandas(X, preserve_index=False)
    if isinstance(X, dict):
        return pa.table(X)
    raise DataError(f"X must be a pandas/Polars DataFrame, an Arrow table or a dict of columns, not {type(X).__name__}")


class DeepFMClassifier:
    """DeepFM (or ``model="fm"``/``"lr"``) with scikit-learn conventions: fit / predict_proba / get_params.

    Parameters mirror ``deepfm train``: ``preset`` names a config (``default``, ``paper``, ``bars``),
    ``overrides`` are ``section.key=value`` strings, and explicit arguments win over both.
    """

    def __init__(self, model: str = "deepfm", preset: str = "default", schema: Schema | str | None = None,
                 epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                 seed: int = 2017, valid_fraction: float = 0.1, threads: int = 0, min_count: int | None = None,
                 overrides: tuple[str, ...] = (), verbose: bool = False) -> None:
        self.model = model
        self.preset = preset
        self.schema = schema
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.valid_fraction = valid_fraction
        self.threads = threads
        self.min_count = min_count
        self.overrides = overrides
        self.verbose = verbose

    # scikit-learn protocol
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {k: getattr(self, k) for k in inspect.signature(type(self).__init__).parameters if k != "self"}

    def set_params(self, **params: Any) -> DeepFMClassifier:
        valid = self.get_params()
        for k, v in params.items():
            if k not in valid:
                raise ValueError(f"invalid parameter {k!r} for DeepFMClassifier")
            setattr(self, k, v)
        return self

    classes_ = np.array([0, 1])

    def _schema_for(self, table: pa.Table) -> Schema:
        from deepfm import schema as schema_mod

        if isinstance(self.schema, Schema):
            s = self.schema
        elif isinstance(self.schema, (str, Path)):
            s = schema_mod.load(self.schema)
        else:
            s = Schema(fields=tuple(infer_fields(table, set())), label="__label__")
        return s.with_overrides(min_count=self.min_count) if self.min_count is not None else s

    def fit(self, X: Any, y: Any, eval_set: tuple[Any, Any] | None = None) -> DeepFMClassifier:
        """Fit preprocessing and the model. Validation: ``eval_set=(X_val, y_val)`` or ``valid_fraction``."""
        table = to_arrow(X)
        schema = self._schema_for(table)
        data = readers.from_arrow(table, schema, np.asarray(y), source="X")
        model_cfg, train_cfg = pipeline.resolve_config(self.preset, list(self.overrides), model=self.model,
                                                       epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                                                       seed=self.seed, threads=self.threads)
        if eval_set is not None:
            pre = Preprocessor(schema).fit(data)
            valid = pre.transform(readers.from_arrow(to_arrow(eval_set[0]), schema, np.asarray(eval_set[1]),
                                                     source="eval_set"))
            prep = pipeline.Prepared(pre, pre.transform(data), None, valid, None, {"rows": data.rows})
        else:
            tr, va = pipeline.split_rows(data.rows, self.valid_fraction, self.seed)
            fit_on = readers.ReadResult(data.table.take(tr), data.label[tr], schema, "X", data.skipped)
            pre = Preprocessor(schema).fit(fit_on)
            enc = pre.transform(data)
            prep = pipeline.Prepared(pre, enc, tr, enc, va, {"rows": data.rows})
        self.model_, result = pipeline.train(prep, model_cfg, train_cfg, progress=self.verbose)
        self.preprocessor_ = pre
        self.training_ = result["training"]
        self.metrics_ = result["metrics"]
        self.predictor_ = Predictor(bundle_mod.Bundle(self.model_, pre, None, self.training_, self.metrics_, {}),
                                    threads=self.threads)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "predictor_"):
            raise DeepFMError("this DeepFMClassifier is not fitted yet: call fit(X, y) first")

    def predict_proba(self, X: Any) -> np.ndarray:
        """[N, 2] probabilities of class 0 and class 1 (click)."""
        self._check_fitted()
        p = self.predictor_.predict_table(to_arrow(X))
        return np.column_stack([1.0 - p, p])

    def predict(self, X: Any, threshold: float = 0.5) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= threshold).astype(np.int64)

    def save(self, path: str | Path) -> Path:
        """Write a bundle (same format as ``deepfm train``); serve it with the CLI or load() it."""
        self._check_fitted()
        training = {**self.training_, "estimator_params": {k: v for k, v in self.get_params().items()
                                                           if not isinstance(v, Schema)}}
        return bundle_mod.save(path, self.model_, self.preprocessor_, None, training, self.metrics_)

    @classmethod
    def load(cls, path: str | Path) -> DeepFMClassifier:
        b = bundle_mod.load(path)
        params = b.training.get("estimator_params", {})
        clf = cls(**{k: (tuple(v) if k == "overrides" else v) for k, v in params.items()})
        clf.model_, clf.preprocessor_, clf.training_, clf.metrics_ = b.model, b.preprocessor, b.training, b.metrics
        clf.predictor_ = Predictor(b)
        return clf
