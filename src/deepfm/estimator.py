"""A scikit-learn-style estimator over pandas / Polars / Arrow tables.

    clf = DeepFMClassifier(preset="default", epochs=5).fit(X_train, y_train)
    p = clf.predict_proba(X_test)[:, 1]
    clf.save("model/");  DeepFMClassifier.load("model/")

X holds raw feature values (strings/numbers as in the logs, Python lists or Arrow list columns for multi-valued
fields); the schema is inferred from X unless given. With scikit-learn installed the estimator is a real
``BaseEstimator``/``ClassifierMixin``: ``clone``, ``cross_val_score``, ``GridSearchCV`` and ``Pipeline`` work
(tests/test_sklearn.py runs scikit-learn's own estimator checks).
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from deepfm import pipeline
from deepfm.accel import accelerate
from deepfm.data import readers, side
from deepfm.data.infer import infer_fields
from deepfm.data.preprocess import Preprocessor
from deepfm.device import model_device, resolve_device
from deepfm.errors import DataError, DeepFMError
from deepfm.schema import Schema
from deepfm.serve import bundle as bundle_mod
from deepfm.serve.predictor import Predictor
from deepfm.train.callbacks import tracking

try:  # scikit-learn is optional: without it the estimator keeps the same methods
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.exceptions import DataConversionWarning as _DataConversionWarning
    from sklearn.exceptions import NotFittedError as _SkNotFitted
    from sklearn.utils.multiclass import type_of_target
except ImportError:  # pragma: no cover - exercised only without scikit-learn
    BaseEstimator = ClassifierMixin = object  # type: ignore[assignment,misc]
    _SkNotFitted = AttributeError  # type: ignore[assignment,misc]
    _DataConversionWarning = UserWarning  # type: ignore[assignment,misc]
    type_of_target = None  # type: ignore[assignment]


class NotFittedError(DeepFMError, _SkNotFitted):  # type: ignore[misc,valid-type]
    """predict/save before fit (scikit-learn's NotFittedError when it is installed)."""


def to_arrow(X: Any) -> pa.Table:
    """pandas / Polars DataFrame, Arrow table, dict of columns or 2-D array -> Arrow table. A 2-D array's
    columns are named ``x0, x1, ...``; pandas columns of Python lists become Arrow list columns."""
    if hasattr(X, "tocsr") or type(X).__module__.startswith("scipy.sparse"):
        raise DataError("sparse input is not supported: pass a dense array or a DataFrame of raw values "
                        "(the model one-hot encodes categorical values itself)")
    if isinstance(X, pa.Table):
        return X
    if hasattr(X, "to_arrow"):  # polars
        return X.to_arrow()
    if hasattr(X, "columns") and hasattr(X, "iloc"):  # pandas
        try:
            return pa.Table.from_pandas(X, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DataError(f"cannot convert the DataFrame to columns: {e}") from None
    if isinstance(X, dict):
        return pa.table(X)
    if isinstance(X, (np.ndarray, list)) or hasattr(X, "__array__"):
        a = np.asarray(X)
        if a.ndim != 2:
            raise DataError(f"X must be 2-D (rows x features), got an array of shape {a.shape}. Reshape your "
                            "data with X.reshape(-1, 1) for a single feature or X.reshape(1, -1) for one row")
        if a.dtype.kind == "c":
            raise DataError("Complex data not supported: X must hold numbers or strings")
        if a.dtype.kind not in "biufUSO":
            raise DataError(f"X has dtype {a.dtype}: expected numbers or strings")
        if a.shape[1] == 0:
            raise DataError(f"Found array with 0 feature(s) (shape={a.shape}) while a minimum of 1 is required.")
        if a.shape[0] == 0:
            raise DataError(f"Found array with 0 sample(s) (shape={a.shape}) while a minimum of 1 is required.")
        return pa.table({f"x{j}": a[:, j] for j in range(a.shape[1])})
    raise DataError(f"X must be a pandas/Polars DataFrame, an Arrow table, a dict of columns or a 2-D array, "
                    f"not {type(X).__name__}")


def _has_names(X: Any) -> bool:
    """Whether X names its columns (a table), as opposed to a bare array."""
    return isinstance(X, (pa.Table, dict)) or hasattr(X, "to_arrow") or hasattr(X, "columns")


def _labels(y: Any, rows: int) -> np.ndarray:
    if y is None:
        raise DataError("DeepFMClassifier requires y to be passed, but the target y is None")
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        import warnings

        warnings.warn(_DataConversionWarning("A column-vector y was passed when a 1d array was expected: "
                                             "using y.ravel()"), stacklevel=3)
        y = y.ravel()
    if y.ndim != 1:
        raise DataError(f"y must be 1-D (one label per row), got shape {y.shape}")
    if y.shape[0] != rows:
        raise DataError(f"y has {y.shape[0]} rows but X has {rows}")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise DataError("y holds NaN or infinite values")
    return y


class DeepFMClassifier(ClassifierMixin, BaseEstimator):
    """DeepFM (or ``model="fm"``/``"lr"``) with scikit-learn conventions: fit / predict_proba / get_params.

    Parameters mirror ``deepfm train``: ``preset`` names a config (``default``, ``paper``, ``bars``),
    ``overrides`` are ``section.key=value`` strings, and explicit arguments win over both.
    ``tensorboard_dir``: write TensorBoard scalars there (as ``deepfm train --tensorboard``); ``mlflow``: log
    each fit as an MLflow run (or into the caller's active run). Each needs its package (``deepfm[tracking]``).
    ``calibrate`` (none, platt, isotonic) and ``negative_rate`` (0 < q <= 1) as ``deepfm train --calibrate``
    / ``--negative-rate`` (None: the preset's, none and 1): ``predict_proba`` serves the corrected, calibrated
    probabilities, as the saved bundle does.
    ``device``: where fit trains and predict scores (``auto``: CUDA when available, ``cpu``, ``cuda``,
    ``cuda:N``); the fitted model, a pickle and a saved bundle hold CPU tensors, so a model fitted on a GPU
    predicts on a machine without one (``load`` and unpickling fall back to the CPU when the device is absent).

    Fitted attributes: ``classes_`` (the two labels of y, sorted; ``classes_[1]`` is the positive class),
    ``n_features_in_``, ``feature_names_in_`` (when X has column names), ``history_`` (one dict per
    validation: epoch, train loss, validation AUC/logloss, as in ``metrics.jsonl``), ``metrics_``,
    ``training_``, ``model_``, ``preprocessor_``.

    Example::

        >>> from sklearn.model_selection import cross_val_score
        >>> cross_val_score(DeepFMClassifier(epochs=1), X, y, cv=3, scoring="roc_auc")  # doctest: +SKIP
    """

    def __init__(self, model: str = "deepfm", preset: str = "default", schema: Schema | str | None = None,
                 epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                 seed: int = 2017, valid_fraction: float = 0.1, threads: int = 0, min_count: int | None = None,
                 overrides: tuple[str, ...] = (), verbose: bool = False, tensorboard_dir: str | None = None,
                 mlflow: bool = False, calibrate: str | None = None, negative_rate: float | None = None,
                 device: str = "auto") -> None:
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
        self.tensorboard_dir = tensorboard_dir
        self.mlflow = mlflow
        self.calibrate = calibrate
        self.negative_rate = negative_rate
        self.device = device

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

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.string = True  # raw categorical values are the point
        tags.input_tags.categorical = True
        tags.input_tags.allow_nan = True  # NaN (a null) is a missing value with its own learned vector
        if tags.classifier_tags is not None:
            tags.classifier_tags.multi_class = False  # a click model: binary only
        return tags

    def _schema_for(self, table: pa.Table) -> Schema:
        from deepfm import schema as schema_mod

        if isinstance(self.schema, Schema):
            s = self.schema
        elif isinstance(self.schema, (str, Path)):
            s = schema_mod.load(self.schema)
        else:
            s = Schema(fields=tuple(infer_fields(table, set())), label="__label__")
        return s.with_overrides(min_count=self.min_count) if self.min_count is not None else s

    def fit(self, X: Any, y: Any, sample_weight: Any = None, eval_set: tuple[Any, ...] | None = None
            ) -> DeepFMClassifier:
        """Fit preprocessing and the model; returns ``self``. Validation: ``eval_set=(X_val, y_val)`` (or
        ``(X_val, y_val, w_val)``) or a seeded ``valid_fraction`` of X. y holds two classes (0/1, booleans or
        any two labels). ``sample_weight``: [N] finite weights >= 0, used in the loss (weighted BCE over the
        mean weight) and in the validation metrics, hence in early stopping."""
        table = to_arrow(X)
        y = _labels(y, table.num_rows)
        kind = type_of_target(y) if type_of_target is not None else "binary"
        if kind == "continuous":
            raise DataError("Unknown label type: continuous. y must hold two classes (0/1 clicks), not "
                            "continuous values")
        classes = np.unique(y)
        if kind == "multiclass" or classes.shape[0] > 2:
            raise DataError(f"Only binary classification is supported. The type of the target is {kind} "
                            f"({classes.shape[0]} classes): DeepFMClassifier predicts click / no click")
        if classes.shape[0] != 2:
            raise DataError(f"y has {classes.shape[0]} class(es) {classes[:5].tolist()}: DeepFMClassifier is a "
                            "binary (click / no click) classifier and needs exactly 2 classes")
        self.classes_ = classes
        self.n_features_in_ = table.num_columns
        if _has_names(X):
            self.feature_names_in_ = np.asarray(table.column_names, dtype=object)
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        schema = self._schema_for(table)
        data = readers.from_arrow(table, schema, self._binary(y), source="X")
        model_cfg, train_cfg = pipeline.resolve_config(self.preset, list(self.overrides), model=self.model,
                                                       epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                                                       seed=self.seed, threads=self.threads,
                                                       calibrate=self.calibrate, negative_rate=self.negative_rate,
                                                       device=self.device)
        if eval_set is not None:
            pre = Preprocessor(schema).fit(data)
            xv = to_arrow(eval_set[0])
            valid = pre.transform(readers.from_arrow(xv, schema, self._binary(_labels(eval_set[1], xv.num_rows)),
                                                     source="eval_set"))
            side.from_arrays(valid, eval_set[2] if len(eval_set) > 2 else None, source="eval_set")
            enc = side.from_arrays(pre.transform(data), sample_weight)
            prep = pipeline.Prepared(pre, enc, None, valid, None, {"rows": data.rows})
        else:
            tr, va = pipeline.split_rows(data.rows, self.valid_fraction, self.seed)
            fit_on = readers.ReadResult(data.table.take(tr), data.label[tr], schema, "X", data.skipped)
            pre = Preprocessor(schema).fit(fit_on)
            enc = side.from_arrays(pre.transform(data), sample_weight)
            prep = pipeline.Prepared(pre, enc, tr, enc, va, {"rows": data.rows})
        trackers = tracking(self.tensorboard_dir, bool(self.mlflow), extra_params={"data.rows": data.rows})
        self.model_, result = pipeline.train(prep, model_cfg, train_cfg, progress=self.verbose,
                                             callbacks=tuple(trackers))
        self.preprocessor_ = pre
        self.training_ = result["training"]
        self.metrics_ = result["metrics"]
        self.history_ = list(self.training_.get("history", []))
        self.postprocess_ = result["postprocess"]
        self.predictor_ = Predictor(bundle_mod.Bundle(self.model_, pre, None, self.training_, self.metrics_, {},
                                                      postprocess=self.postprocess_), threads=self.threads,
                                    device=train_cfg.device)
        return self

    # Pickling (joblib, GridSearchCV with n_jobs) keeps the fitted model and preprocessing and rebuilds the
    # predictor, whose compiled fast path holds closures. Loading a *bundle* never unpickles anything.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("predictor_", None)
        model = state.get("model_")
        if model is not None and model_device(model).type != "cpu":  # a pickle is device-free
            state["model_"] = accelerate(copy.deepcopy(model).cpu())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "model_" in state:
            self.predictor_ = Predictor(bundle_mod.Bundle(self.model_, self.preprocessor_, None, self.training_,
                                                          self.metrics_, {}, postprocess=self._postprocess()),
                                        threads=self.threads, device=_usable(getattr(self, "device", "auto")))

    def _postprocess(self) -> Any:
        from deepfm.calibration import PostProcess

        return getattr(self, "postprocess_", None) or PostProcess()

    def _binary(self, y: np.ndarray) -> np.ndarray:
        """Labels -> 0/1 float (1 = ``classes_[1]``); a label outside ``classes_`` is an error."""
        known = np.isin(y, self.classes_)
        if not known.all():
            bad = y[~known][:3].tolist()
            raise DataError(f"y holds labels {bad} that are not among the classes {self.classes_.tolist()}")
        return (y == self.classes_[1]).astype(np.float64)

    def _check_fitted(self) -> None:
        if not hasattr(self, "predictor_"):
            raise NotFittedError("this DeepFMClassifier is not fitted yet: call fit(X, y) first")

    def _table_for_predict(self, X: Any) -> pa.Table:
        table = to_arrow(X)
        if table.num_columns != self.n_features_in_ and not hasattr(self, "feature_names_in_"):
            raise DataError(f"X has {table.num_columns} features, but DeepFMClassifier is expecting "
                            f"{self.n_features_in_} features as input")
        return table

    def predict_proba(self, X: Any) -> np.ndarray:
        """[N, 2] probabilities of ``classes_[0]`` and ``classes_[1]`` (the click)."""
        self._check_fitted()
        p = self.predictor_.predict_table(self._table_for_predict(X))
        return np.column_stack([1.0 - p, p])

    def decision_function(self, X: Any) -> np.ndarray:
        """[N] logits (log-odds of ``classes_[1]``), as scikit-learn scorers such as ``roc_auc`` accept."""
        p = np.clip(self.predict_proba(X)[:, 1], 1e-15, 1 - 1e-15)
        return np.log(p) - np.log1p(-p)

    def predict(self, X: Any, threshold: float = 0.5) -> np.ndarray:
        """The class in ``classes_`` whose probability is at least ``threshold`` (for ``classes_[1]``)."""
        positive = self.predict_proba(X)[:, 1] >= threshold
        return self.classes_[positive.astype(np.int64)]

    def save(self, path: str | Path) -> Path:
        """Write a bundle (same format as ``deepfm train``); serve it with the CLI or load() it."""
        self._check_fitted()
        fitted = {"classes": self.classes_.tolist(), "n_features_in": self.n_features_in_}
        if hasattr(self, "feature_names_in_"):
            fitted["feature_names_in"] = self.feature_names_in_.tolist()
        training = {**self.training_, "estimator_fitted": fitted,
                    "estimator_params": {k: v for k, v in self.get_params().items() if not isinstance(v, Schema)}}
        return bundle_mod.save(path, self.model_, self.preprocessor_, None, training, self.metrics_,
                               postprocess=self._postprocess())

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> DeepFMClassifier:
        """A saved bundle as a fitted classifier that predicts on ``device`` (default: the saved parameter,
        or the CPU where that device is absent here)."""
        b = bundle_mod.load(path)
        params = b.training.get("estimator_params", {})
        clf = cls(**{k: (tuple(v) if k == "overrides" else v) for k, v in params.items()})
        if device is not None:
            clf.device = device
        clf.model_, clf.preprocessor_, clf.training_, clf.metrics_ = b.model, b.preprocessor, b.training, b.metrics
        clf.postprocess_ = b.postprocess
        clf.predictor_ = Predictor(b, device=clf.device if device is not None else _usable(clf.device))
        clf.history_ = list(b.training.get("history", []))
        fitted = b.training.get("estimator_fitted", {})  # bundles of `deepfm train` have none: labels 0/1
        clf.classes_ = np.asarray(fitted.get("classes", [0, 1]))
        clf.n_features_in_ = fitted.get("n_features_in", len(b.preprocessor.schema.fields))
        names = fitted.get("feature_names_in")
        if names is None and "estimator_fitted" not in b.training:
            names = [f.source for f in b.preprocessor.schema.fields]
        if names is not None:
            clf.feature_names_in_ = np.asarray(names, dtype=object)
        return clf


def _usable(device: str) -> str:
    """``device`` where it exists here, else the CPU (a model fitted on a GPU, unpickled or loaded without one)."""
    try:
        resolve_device(device)
    except DeepFMError:
        return "cpu"
    return device
