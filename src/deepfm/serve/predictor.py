"""One predictor, raw rows in, probabilities out: the same encode + model path for the CLI, the Python
API and the server, so training and serving can never disagree.

- files (``iter_file`` / ``predict_file``): read in blocks (bounded memory for any size), encoded by the
  fitted :class:`~deepfm.data.preprocess.Preprocessor`, scored in batches;
- records (``predict_records``, the server): JSON-style dicts encoded by
  :class:`~deepfm.serve.records.RecordEncoder`, which applies the same fitted states per value;
- engines: ``torch`` (the model itself; batches of <= SMALL_BATCH rows go through the numpy forward of
  serve.fastpath, which has no per-op dispatch cost) or ``onnxruntime`` (the model exported to ONNX).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from deepfm.data import readers
from deepfm.data.preprocess import Encoded
from deepfm.data.store import Batcher
from deepfm.errors import DataError
from deepfm.layout import layout
from deepfm.serve.bundle import Bundle, load
from deepfm.serve.fastpath import SMALL_BATCH, NumpyForward
from deepfm.serve.records import RecordEncoder
from deepfm.utils import set_threads

ENGINES = ("torch", "onnxruntime")


@dataclass
class Scored:
    """Probabilities for a whole file, with its labels (if any) and the bad rows skipped."""

    probabilities: np.ndarray  # float64 [N]
    label: np.ndarray | None  # float32 [N]
    skipped: readers.BadRows


class Predictor:
    """``Predictor(bundle).predict_records([{field: value, ...}])`` -> float64 probabilities.

    bundle: a :class:`Bundle` or its folder. threads: intra-op threads (0 = the cores this process may use).
    engine: ``torch`` or ``onnxruntime`` (exports the model to a temporary ONNX file first).
    """

    def __init__(self, bundle: Bundle | str | Path, threads: int = 0, engine: str = "torch") -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.bundle = bundle if isinstance(bundle, Bundle) else load(bundle)
        self.pre = self.bundle.preprocessor
        self.fields = layout(self.pre)
        self.records = RecordEncoder(self.pre)
        self.engine = engine
        # logits -> served probabilities: the bundle's calibration.json (negative-rate correction, calibration),
        # applied here and only here for every caller (predict, evaluate, the server, the estimator)
        self.postprocess = self.bundle.postprocess
        set_threads(threads)
        try:
            self.small: NumpyForward | None = NumpyForward(self.bundle.model)
        except ValueError:  # a layer the numpy path does not cover: the engine for every batch size
            self.small = None
        self.onnx = None
        if engine == "onnxruntime":
            from deepfm.serve.export import OnnxForward, export_onnx

            with tempfile.TemporaryDirectory(prefix="deepfm-onnx-") as tmp:
                path = export_onnx(self.bundle.model, Path(tmp) / "model.onnx")
                self.onnx = OnnxForward(path, threads=threads)

    @property
    def data_format(self) -> str | None:
        return self.bundle.data_format

    @property
    def model_info(self) -> dict[str, str]:
        """name (the bundle folder) and version (the weights' checksum prefix): what served a request."""
        m = self.bundle.manifest
        digest = m.get("files", {}).get("model.safetensors", "")
        return {"name": self.bundle.path.name if self.bundle.path else m.get("model", "model"),
                "version": digest[:12] or m.get("created", "")}

    # ------------------------------------------------------------------ the model on encoded inputs
    def logits(self, idx: np.ndarray, val: np.ndarray) -> np.ndarray:
        """float32 [B] logits for encoded inputs ``idx`` [B, S] int64, ``val`` [B, S] float32."""
        if self.onnx is not None:
            return self.onnx(idx, val)
        if self.small is not None and idx.shape[0] <= SMALL_BATCH:
            return self.small(idx, val)
        with torch.no_grad():
            return self.bundle.model(torch.from_numpy(idx), torch.from_numpy(val)).float().numpy()

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """float64 [B] served probabilities for the model's logits [B]: sigmoid, then the bundle's
        post-processing (deepfm.calibration.PostProcess; exactly sigmoid when the bundle has none)."""
        return self.postprocess.from_logits(logits)

    def predict_encoded(self, enc: Encoded, batch_size: int = 65536) -> np.ndarray:
        """float64 [N] probabilities of an encoded block."""
        batcher = Batcher(enc, self.fields)
        out = np.empty(enc.rows, dtype=np.float32)
        for s in range(0, enc.rows, batch_size):
            idx, val, _ = batcher(slice(s, min(enc.rows, s + batch_size)))
            out[s: s + idx.shape[0]] = self.logits(idx.numpy(), val.numpy())
        return self.probabilities(out)

    # ------------------------------------------------------------------ raw inputs
    def predict_result(self, data: readers.ReadResult, batch_size: int = 65536) -> np.ndarray:
        """float64 [N] click probabilities for already-read rows."""
        return self.predict_encoded(self.pre.transform(data), batch_size)

    def read_format(self, path: str | Path, fmt: str | None) -> str:
        fmt = fmt or self.data_format
        if fmt is None:
            raise DataError("the bundle records no data format; pass --format", path=str(path))
        return fmt

    def iter_file(self, path: str | Path, fmt: str | None = None, on_bad_rows: str = "error",
                  columns: list[str] | None = None, block_bytes: int = 16 << 20, label_rules: bool = False
                  ) -> Iterator[tuple[np.ndarray, readers.ReadResult]]:
        """Score a file block by block: yields (probabilities float64 [n], the block's ReadResult, whose
        ``extra`` holds the passthrough ``columns``). Memory is bounded by the block size. Every input row is
        scored unless ``label_rules`` (for evaluation: e.g. movielens drops the rows rated 3)."""
        fmt = self.read_format(path, fmt)
        for block in readers.iter_read(path, fmt, self.pre.schema, on_bad_rows, block_bytes=block_bytes,
                                       columns=columns, label_rules=label_rules):
            yield self.predict_result(block), block

    def predict_file(self, path: str | Path, fmt: str | None = None, on_bad_rows: str = "error") -> Scored:
        """Score a whole file (streamed in blocks); returns probabilities, labels and skipped rows."""
        probs, labels, skipped = [], [], readers.BadRows()
        for p, block in self.iter_file(path, fmt, on_bad_rows, label_rules=True):  # labels are used
            probs.append(p)
            labels.append(block.label)
            skipped = block.skipped
        label = None if any(lab is None for lab in labels) else np.concatenate(labels)
        return Scored(np.concatenate(probs), label, skipped)

    def predict_table(self, table: pa.Table) -> np.ndarray:
        """Raw columns (strings/numbers as in the logs) -> probabilities. Extra columns are ignored."""
        return self.predict_result(readers.from_arrow(table, self.pre.schema))

    def predict_records(self, records: list[dict[str, Any]]) -> np.ndarray:
        """JSON-style rows ``[{field: raw value}]`` -> float64 [N] probabilities (see serve.records for the
        accepted values; a bad value raises RecordError naming the row and field)."""
        idx, val = self.records.encode(records)
        return self.probabilities(self.logits(idx, val))
