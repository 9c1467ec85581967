"""Export a trained :class:`CTRModel` to ONNX (or TorchScript), and run an ONNX file with onnxruntime.

The exported graph takes the model's own inputs, ``idx`` [batch, slots] int64 and ``val`` [batch, slots]
float32 (see data.store.Batcher), with a dynamic batch axis, and returns ``logit`` [batch] and
``probability`` [batch] (= sigmoid(logit)), both float32.

It is traced from :class:`_ExportForward`: the model protocol's two steps, ``embed`` in ops every exporter
and runtime handles (a plain ``Gather`` for the table rows and, for multi-valued fields, a MatMul with a
fixed [F, S] 0/1 pooling matrix instead of ``index_add_``), then the model's own ``head`` (plain tensor ops),
so the export evaluates the model's own equation for every kind of ``MODEL_NAMES``; any other model is
refused with a BundleError.

We use the legacy TorchScript-based exporter (``dynamo=False``): on torch 2.13 it exports these models in a
fraction of a second with a clean graph, where the dynamo exporter takes seconds and logs a lot; its
DeprecationWarning is silenced here.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepfm import __version__, outputs
from deepfm.errors import BundleError
from deepfm.models.ctr import MODEL_NAMES, CTRModel

INPUTS = ("idx", "val")
OUTPUTS = ("logit", "probability")


class _ExportForward(nn.Module):
    """``(idx [B, S] int64, val [B, S] float32) -> (logit [B], probability [B])``: ``model.head`` of the
    tables' pooled outputs, looked up in export-friendly ops. Call on an eval-mode model (batch norm uses its
    running statistics)."""

    def __init__(self, model: CTRModel) -> None:
        super().__init__()
        if getattr(model.cfg, "model", None) not in MODEL_NAMES:
            raise BundleError(f"cannot export a model of kind {getattr(model.cfg, 'model', None)!r}: the exporter "
                              f"covers {', '.join(MODEL_NAMES)}")
        self.model = model
        table = model.v if model.v is not None else model.w
        assert table is not None  # every model kind has a first-order or an embedding table
        self.register_buffer("offsets", table.slot_offsets.clone(), persistent=False)
        # pool[f, s] = 1 if slot s belongs to field f: pool @ e sums multi-valued slots into their field
        pool = nn.functional.one_hot(table.slot_field, table.n_fields).T.float() if table.pooled else None
        self.register_buffer("pool", pool, persistent=False)
        self.slots = int(table.slot_offsets.numel())

    def forward(self, idx: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit = self.model.head(self.embed(idx, val))
        return logit, torch.sigmoid(logit)

    def embed(self, idx: torch.Tensor, val: torch.Tensor) -> dict[str, torch.Tensor]:
        """``model.embed`` in export ops: {table name: [B, F, dim] = x_i * row_i, slots pooled into their field}."""
        rows = idx + self.offsets  # [B, S] rows of the fused tables
        x = val.unsqueeze(-1)  # [B, S, 1]
        out = {}
        for name, table in self.model.tables().items():
            e = nn.functional.embedding(rows, table.weight) * x  # [B, S, dim]
            out[name] = torch.matmul(self.pool, e) if self.pool is not None else e
        return out


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside; every submodule's train/eval flag restored after (also those that
    ``.eval()`` on a wrapper around ``model`` changes)."""
    modes = [(mod, mod.training) for mod in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch 2.13 flags the TorchScript tracer and the legacy ONNX exporter as deprecated on each call
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for mod, training in modes:
            mod.training = training


def _write_atomic(path: str | Path, suffix: str, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` to a unique temporary file in ``path``'s folder, then one rename, under ``path``'s write
    lock: no half-written file at path, and a concurrent export to it is refused. The file follows the umask
    (mkstemp alone makes 0600); a failed write (disk full above all) is one clear DeepFMError."""
    path = Path(path)
    try:
        with outputs.locked(path), outputs.atomic_file(path, suffix) as tmp:
            write(str(tmp))
    except outputs.WRITE_ERRORS as e:
        raise outputs.write_error(e, "the export", path) from None
    return path


def is_export(path: str | Path, fmt: str = "onnx") -> bool:
    """Whether ``path`` is a file written by this module (what an export may overwrite without --force)."""
    path = Path(path)
    if fmt == "onnx":
        try:
            import onnxruntime as ort

            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception:  # not ONNX, or no onnxruntime: not known to be ours
            return False
        meta = sess.get_modelmeta().custom_metadata_map
        return meta.get("producer") == "deepfm" or tuple(i.name for i in sess.get_inputs()) == INPUTS
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/extra/deepfm.json") or "/code/__torch__/deepfm/" in n for n in names)


def _example(slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    # batch 2, not 1, so that nothing gets specialised to a single row; index 0 exists in every field
    return torch.zeros(2, slots, dtype=torch.long), torch.ones(2, slots)


def export_onnx(model: CTRModel, path: str | Path, opset: int = 17) -> Path:
    """Write ``model`` (in eval mode) as an ONNX file: inputs ``idx`` int64 [batch, slots] and ``val`` float32
    [batch, slots], outputs ``logit`` and ``probability`` float32 [batch]. Returns the path."""
    batch = {0: "batch"}

    def write(tmp: str) -> None:
        with _evaluating(model):
            wrapper = _ExportForward(model).eval()
            torch.onnx.export(wrapper, _example(wrapper.slots), tmp, dynamo=False, opset_version=opset,
                              input_names=list(INPUTS), output_names=list(OUTPUTS),
                              dynamic_axes={name: batch for name in INPUTS + OUTPUTS}, do_constant_folding=True)
        try:
            import onnx
        except ImportError:  # metadata is a nicety; the graph is complete without it
            return
        proto = onnx.load(tmp)
        meta = {"producer": "deepfm", "deepfm_version": __version__, "model": model.cfg.model,
                "slots": str(wrapper.slots), "inputs": ",".join(INPUTS), "outputs": ",".join(OUTPUTS)}
        onnx.helper.set_model_props(proto, meta)
        onnx.save(proto, tmp)

    return _write_atomic(path, ".onnx.tmp", write)


def export_torchscript(model: CTRModel, path: str | Path) -> Path:
    """Write ``model`` (in eval mode) as a traced TorchScript file with the ONNX file's signature:
    ``(idx [B, S] int64, val [B, S] float32) -> (logit [B], probability [B])``. Returns the path.

    TorchScript is deprecated in torch 2.13 (it still works); prefer :func:`export_onnx`."""
    def write(tmp: str) -> None:
        with _evaluating(model):
            wrapper = _ExportForward(model).eval()
            # check_trace re-runs the trace through the graph executor (~1 s on first use); tests check parity
            traced = torch.jit.trace(wrapper, _example(wrapper.slots), check_trace=False)
            torch.jit.save(traced, tmp, _extra_files={"deepfm.json": f'{{"producer": "deepfm", "deepfm_version": '
                                                                     f'"{__version__}"}}'})

    return _write_atomic(path, ".pt.tmp", write)


class OnnxForward:
    """``__call__(idx [B, S] int64, val [B, S] float32) -> logits [B] float32`` with onnxruntime on CPU, for a
    file written by :func:`export_onnx` (same call as fastpath.NumpyForward, so the two can be swapped)."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BundleError("ONNX inference needs onnxruntime: pip install 'deepfm[serve]'") from exc
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"{path}: no such ONNX model file")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3  # errors only: no per-session info lines on stderr
        if threads > 0:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for corrupt or foreign files
            raise BundleError(f"{path}: not a loadable ONNX model ({exc})") from exc
        names_in = tuple(i.name for i in self.session.get_inputs())
        if names_in != INPUTS or "logit" not in {o.name for o in self.session.get_outputs()}:
            raise BundleError(f"{path}: not a deepfm ONNX export (inputs {names_in}, expected {INPUTS})")
        self.slots = self.session.get_inputs()[0].shape[1]

    def __call__(self, idx: np.ndarray, val: np.ndarray) -> np.ndarray:
        feeds = {"idx": np.ascontiguousarray(idx, dtype=np.int64), "val": np.ascontiguousarray(val, dtype=np.float32)}
        return self.session.run(["logit"], feeds)[0]


def random_inputs(model: CTRModel, rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random valid encoded inputs for ``model``: idx [rows, S] within each slot's field rows (OOV and
    MISSING included), val [rows, S] in [-2, 2) with some exact zeros."""
    table = model.v if model.v is not None else model.w
    assert table is not None
    offsets = table.slot_offsets.numpy()
    starts = np.unique(offsets)
    ends = np.r_[starts[1:], table.weight.shape[0]]
    size = (ends - starts)[np.searchsorted(starts, offsets)]  # rows of each slot's field
    rng = np.random.default_rng(seed)
    idx = (rng.random((rows, offsets.size)) * size).astype(np.int64)
    val = rng.uniform(-2, 2, (rows, offsets.size)).astype(np.float32)
    val[rng.random(val.shape) < 0.1] = 0.0
    return idx, val


def check_export(model: CTRModel, path: str | Path, fmt: str = "onnx", rows: int = 10000) -> float:
    """max |p_exported - p_torch| over ``rows`` random encoded rows (probabilities, float64)."""
    idx, val = random_inputs(model, rows)
    with _evaluating(model):
        ref = model(torch.from_numpy(idx), torch.from_numpy(val)).double().numpy()
    if fmt == "onnx":
        got = OnnxForward(path)(idx, val).astype(np.float64)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.load(str(path))
        with torch.no_grad():
            got = traced(torch.from_numpy(idx), torch.from_numpy(val))[0].double().numpy()
    return float(np.abs(1 / (1 + np.exp(-got)) - 1 / (1 + np.exp(-ref))).max())
