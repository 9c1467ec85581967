"""One predictor, raw rows in, probabilities out: the same encode + model path for the CLI, the Python
API and the server, so training and serving can never disagree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from deepfm.data import readers
from deepfm.data.store import Batcher, layout
from deepfm.errors import DataError
from deepfm.serve.bundle import Bundle, load
from deepfm.serve.fastpath import SMALL_BATCH, NumpyForward
from deepfm.train.trainer import predict_logits, set_threads, sigmoid


class Predictor:
    def __init__(self, bundle: Bundle | str | Path, threads: int = 0) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load(bundle)
        self.pre = self.bundle.preprocessor
        self.fields = layout(self.pre)
        set_threads(threads)
        try:
            self.small: NumpyForward | None = NumpyForward(self.bundle.model)
        except ValueError:  # a layer the numpy path does not cover: torch for every batch size
            self.small = None

    @property
    def data_format(self) -> str | None:
        return self.bundle.data_format

    def read(self, path: str | Path, fmt: str | None = None, on_bad_rows: str = "error") -> readers.ReadResult:
        fmt = fmt or self.data_format
        if fmt is None:
            raise DataError("the bundle records no data format; pass --format", path=str(path))
        return readers.read(path, fmt, self.pre.schema, on_bad_rows=on_bad_rows)

    def predict_result(self, data: readers.ReadResult, batch_size: int = 65536) -> np.ndarray:
        """float64 [N] click probabilities for already-read rows."""
        enc = self.pre.transform(data)
        batcher = Batcher(enc, self.fields)
        if self.small is not None and enc.rows <= SMALL_BATCH:
            idx, val, _ = batcher(slice(0, enc.rows))
            return sigmoid(self.small(idx.numpy(), val.numpy()))
        return sigmoid(predict_logits(self.bundle.model, batcher, batch_size=batch_size))

    def predict_file(self, path: str | Path, fmt: str | None = None, on_bad_rows: str = "error"
                     ) -> tuple[np.ndarray, readers.ReadResult]:
        data = self.read(path, fmt, on_bad_rows)
        return self.predict_result(data), data

    def predict_table(self, table: pa.Table) -> np.ndarray:
        """Raw columns (strings/numbers as in the logs) -> probabilities. Extra columns are ignored."""
        return self.predict_result(readers.from_arrow(table, self.pre.schema))
