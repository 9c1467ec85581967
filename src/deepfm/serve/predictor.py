"""One predictor, raw rows in, probabilities out: the same encode + model path for the CLI, the Python
API and the server, so training and serving can never disagree.

- files (``iter_file`` / ``predict_file``): read in blocks (bounded memory for any size), encoded by the
  fitted :class:`~deepfm.data.preprocess.Preprocessor`, scored in batches;
- records (``predict_records``, the server): JSON-style dicts encoded by
  :class:`~deepfm.serve.records.RecordEncoder`, which applies the same fitted states per value;
- engines: ``torch`` (the model itself; batches of <= SMALL_BATCH rows go through the numpy forward of
  serve.fastpath, which has no per-op dispatch cost), ``onnxruntime`` (the model exported to ONNX), or
  ``int8``/``bf16``/``auto`` (serve.quantize: the MLP's hidden GEMMs quantised for batches above
  SMALL_BATCH rows, checked once against fp32 on the first rows scored).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from deepfm.accel import accelerate, plain
from deepfm.data import readers
from deepfm.data.preprocess import Encoded
from deepfm.data.store import Batcher
from deepfm.device import model_device, resolve_device, to_device
from deepfm.errors import DataError, DeepFMError
from deepfm.layout import layout
from deepfm.serve.bundle import Bundle, load
from deepfm.serve.fastpath import SMALL_BATCH, NumpyForward
from deepfm.serve.records import RecordEncoder
from deepfm.utils import set_threads

ENGINES = ("torch", "onnxruntime", "int8", "bf16", "auto")
QUANTISED = ("int8", "bf16", "auto")  # serve.quantize.ENGINES: CPU only


@dataclass
class Scored:
    """Probabilities for a whole file, with its labels (if any) and the bad rows skipped."""

    probabilities: np.ndarray  # float64 [N]
    label: np.ndarray | None  # float32 [N]
    skipped: readers.BadRows


class Predictor:
    """``Predictor(bundle).predict_records([{field: value, ...}])`` -> float64 probabilities.

    bundle: a :class:`Bundle` or its folder. threads: intra-op threads (0 = the cores this process may use).
    engine: ``torch`` or ``onnxruntime`` (exports the model to a temporary ONNX file first). device: where
    the torch engine scores batches above SMALL_BATCH rows (``deepfm.device``: cpu, cuda, cuda:N, auto); the
    bundle is loaded on the CPU, then moved there. Small batches (a served request) keep the numpy path.
    report: where the int8/bf16/auto engines' one-line parity outcome goes (default: the deepfm.serve logger).
    """

    def __init__(self, bundle: Bundle | str | Path, threads: int = 0, engine: str = "torch",
                 device: str = "cpu", report: Callable[[str], None] | None = None) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if engine in QUANTISED and device == "auto":
            device = "cpu"  # the quantised engines are CPU GEMMs
        if engine in QUANTISED and resolve_device(device).type != "cpu":
            raise DeepFMError(f"--engine {engine} runs on the CPU; use --engine torch for --device {device}")
        # onnxruntime runs on the CPU here: "auto" means the CPU for it
        self.device = resolve_device("cpu" if engine == "onnxruntime" and device == "auto" else device)
        if engine == "onnxruntime" and self.device.type != "cpu":
            raise DeepFMError(f"--engine onnxruntime runs on the CPU here; use --engine torch for --device "
                              f"{device}")
        self.bundle = bundle if isinstance(bundle, Bundle) else load(bundle)
        model = self.bundle.model
        if model_device(model).type != "cpu":  # e.g. the estimator's model, trained on a GPU
            accelerate(model.cpu())
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
        self.quant = None
        if engine in QUANTISED:
            from deepfm.serve.quantize import Scorer

            self.quant = Scorer(self.bundle.model, engine, report=report)
        if self.device.type != "cpu":  # after the numpy path took its CPU copy of the weights
            plain(model).to(self.device)

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
        if self.quant is not None:
            return self.quant(idx, val)
        with torch.no_grad():
            if self.device.type == "cpu":
                return self.bundle.model(torch.from_numpy(idx), torch.from_numpy(val)).float().numpy()
            ti, tv = to_device((torch.from_numpy(idx), torch.from_numpy(val)), self.device)
            return self.bundle.model(ti, tv).float().cpu().numpy()

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """float64 [B] served probabilities for the model's logits [B]: sigmoid, then the bundle's
        post-processing (deepfm.calibration.PostProcess; exactly sigmoid when the bundle has none)."""
        return self.postprocess.from_logits(logits)

    def predict_encoded(self, enc: Encoded, batch_size: int = 65536) -> np.ndarray:
        """float64 [N] probabilities of an encoded block."""
        batcher = Batcher(enc, self.fields)
        if self.quant is not None and self.quant.chosen is None:  # the parity check, on the first rows scored
            from deepfm.serve.quantize import MIN_SAMPLE, PARITY_ROWS

            if enc.rows >= MIN_SAMPLE:
                idx, val, _ = batcher(slice(0, min(enc.rows, PARITY_ROWS)))
                label = enc.label[:PARITY_ROWS] if enc.label is not None else None
                self.quant.resolve(idx.numpy(), val.numpy(), label, source="the input")
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
