"""Quantised scoring: the MLP's hidden GEMMs in int8 or bf16 for batch scoring, each checked against fp32.

Engines (``deepfm predict/serve --engine``; ``Predictor(engine=...)``):

- ``int8``: the hidden Linear layers after the first run as dynamic int8 GEMMs
  (``torch.ops.quantized.linear_dynamic``: symmetric per-output-channel int8 weights, activations quantised
  per call to 8 bits; VNNI/AMX-INT8 where the CPU has them, AVX2's ``vpmaddubsw`` otherwise, where the
  activations use 7 bits (``reduce_range``, as fbgemm needs there to avoid saturation)). The first layer,
  whose input is the concatenated field embeddings (per-field ranges that one per-tensor activation scale
  cannot cover: 5x the error measured on the default preset), and the 1-unit output layer stay fp32, as do
  the embeddings, the first-order and the FM terms.
- ``bf16``: every hidden layer's GEMM takes bf16 weights (cast once) and bf16 activations; the output layer,
  the embeddings and the FM term stay fp32. Fast where the CPU has AVX512-BF16 or AMX
  (:func:`has_fast_bf16`); it runs, slowly, anywhere.
- ``auto``: whichever of those passes parity and is at least ``AUTO_MIN_SPEEDUP`` times faster than fp32
  on a small batch (bf16 is a candidate only where the CPU has it), else fp32.

Batch norm is folded into its Linear layer first (eval statistics), so each layer is one GEMM + bias +
activation. The quantised model is a shallow copy: it shares the embedding tables with the fp32 model.

Parity (:func:`parity`): on up to ``PARITY_ROWS`` rows, max |p - p_fp32| <= ``MAX_DP`` and, when the rows
have labels of both classes, |AUC - AUC_fp32| <= ``MAX_DAUC``. An engine requested by name that fails it
is used anyway, with a warning giving the figures; ``auto`` never picks it. :class:`Scorer` runs the
check once, on the first rows it is given (``deepfm predict``: the input's first block) or, when its first
call is a small batch (a served request, the server's warm-up), on ``PARITY_ROWS`` random valid encoded
rows (no labels: max |dp| only).

:func:`export_onnx_int8` writes the int8 model as ONNX (onnxruntime's ``quantize_dynamic`` of the fp32
export, the same layers quantised).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepfm.errors import DeepFMError
from deepfm.models.ctr import CTRModel
from deepfm.models.layers import FastDropout
from deepfm.train.metrics import auc
from deepfm.utils import cpu_info, sigmoid

log = logging.getLogger("deepfm.serve")

ENGINES = ("int8", "bf16", "auto")
PARITY_ROWS = 10_000
MAX_DP, MAX_DAUC = 2e-3, 5e-4
AUTO_MIN_SPEEDUP = 1.15  # auto takes a quantised engine only if fp32 takes >= 1.15x its time
SPEED_ROWS, SPEED_BUDGET_S = 2048, 0.3
MIN_SAMPLE = 1000  # fewer rows given (a request): the check runs on random rows instead


def _cpu_flags() -> frozenset[str]:
    return cpu_info()[1]


def has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: bf16 GEMMs run faster than fp32 (elsewhere bf16 is emulated, slower)."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def has_vnni() -> bool:
    """An int8 dot-product instruction without saturation (VNNI or AMX-INT8): 8-bit activations are safe."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & _cpu_flags())


# ---------------------------------------------------------------------------------------------- the models
def fold(mlp: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, nn.Module | None]]:
    """An eval-mode MLP's ``net`` as (W [out, in], b [out], activation module or None) per Linear, batch norm
    folded into W and b (running statistics), dropout dropped."""
    out: list[tuple[torch.Tensor, torch.Tensor, nn.Module | None]] = []
    with torch.no_grad():
        for layer in mlp.net:
            if isinstance(layer, nn.Linear):
                out.append((layer.weight.detach().clone(), layer.bias.detach().clone(), None))
            elif isinstance(layer, nn.BatchNorm1d):
                w, b, act = out[-1]
                scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
                out[-1] = (w * scale[:, None], (b - layer.running_mean) * scale + layer.bias, act)
            elif isinstance(layer, (nn.Dropout, FastDropout)):
                continue
            else:
                w, b, _ = out[-1]
                out[-1] = (w, b, copy.deepcopy(layer))
    return out


class _Int8Linear(nn.Module):
    """x [B, in] float32 -> [B, out] float32 with a dynamic int8 GEMM (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        scale = (weight.abs().amax(dim=1).clamp_min(1e-12) / 127).double()
        with warnings.catch_warnings():  # torch 2.13 flags its quantized tensor API as deprecated
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(weight.float(), scale, torch.zeros_like(scale, dtype=torch.long), 0,
                                           torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, bias.float())
        self.reduce_range = not has_vnni()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self.packed, self.reduce_range)


class ScoringMLP(nn.Module):
    """The folded MLP for scoring: ``forward(x [B, d_in]) -> [B]`` like ``MLP``, its hidden layers in
    ``kind`` ("fp32", "bf16" or "int8"; see the module docstring), the output layer in fp32. ``matmul``:
    hidden layers as ``x @ W^T + b`` with W^T a parameter (what onnxruntime's dynamic quantiser handles:
    MatMul, not Gemm), for the ONNX export."""

    def __init__(self, mlp: nn.Module, kind: str = "fp32", matmul: bool = False) -> None:
        super().__init__()
        if kind not in ("fp32", "bf16", "int8"):
            raise ValueError(f"kind must be fp32, bf16 or int8, got {kind!r}")
        self.kind, self.matmul = kind, matmul
        layers = fold(mlp)
        *hidden, (w_out, b_out, act_out) = layers
        self.hidden = nn.ModuleList()
        self.acts = nn.ModuleList(act if act is not None else nn.Identity() for _, _, act in hidden)
        for i, (w, b, _) in enumerate(hidden):
            if kind == "int8" and i > 0:
                self.hidden.append(_Int8Linear(w, b))
            elif matmul:
                lin = nn.Module()
                lin.weight_t = nn.Parameter(w.t().contiguous(), requires_grad=False)
                lin.bias = nn.Parameter(b, requires_grad=False)
                self.hidden.append(lin)
            else:
                lin = nn.Linear(w.shape[1], w.shape[0]).requires_grad_(False)
                with torch.no_grad():
                    lin.weight.copy_(w)
                    lin.bias.copy_(b)
                self.hidden.append(lin)
        # bf16: the weights cast once (autocast would cast them on every call)
        self._bf16 = ([(lin.weight.t().bfloat16().contiguous(), lin.bias.bfloat16()) for lin in self.hidden]
                      if kind == "bf16" else None)
        self.out = nn.Linear(w_out.shape[1], w_out.shape[0]).requires_grad_(False)
        with torch.no_grad():
            self.out.weight.copy_(w_out)
            self.out.bias.copy_(b_out)
        self.out_act = act_out if act_out is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._bf16 is not None:
            h = x.bfloat16()
            for (w_t, b), act in zip(self._bf16, self.acts, strict=True):
                h = act(torch.addmm(b, h, w_t))
            h = h.float()
        else:
            h = x
            for lin, act in zip(self.hidden, self.acts, strict=True):
                h = act(h @ lin.weight_t + lin.bias if self.matmul and hasattr(lin, "weight_t") else lin(h))
        return self.out_act(self.out(h)).squeeze(-1)


def scoring_model(model: CTRModel, kind: str, matmul: bool = False) -> CTRModel:
    """A copy of the eval-mode ``model`` whose MLP is :class:`ScoringMLP` of ``kind``; it shares every other
    parameter (the embedding tables) with ``model``. ValueError for a model without an MLP."""
    if getattr(model, "dnn", None) is None:
        raise ValueError(f"model kind {getattr(model.cfg, 'model', '?')!r} has no MLP: nothing to quantise")
    model.eval()
    q = copy.copy(model)  # a shallow copy: same tables ...
    q._modules = dict(model._modules)  # ... in its own module dict, so replacing its dnn leaves model's
    q._modules["dnn"] = ScoringMLP(model.dnn, kind, matmul=matmul).eval()
    return q.eval()


def _logits(model: nn.Module, idx: np.ndarray, val: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(idx)),
                     torch.from_numpy(np.ascontiguousarray(val))).float().numpy()


# ---------------------------------------------------------------------------------------------- parity
@dataclass
class Parity:
    """One engine against fp32 on the same rows."""

    engine: str
    rows: int
    max_dp: float
    d_auc: float | None  # None: no labels (or one class only)
    source: str = ""
    fp32_ms: float | None = None  # a SPEED_ROWS batch, fastest round
    engine_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.max_dp <= MAX_DP and (self.d_auc is None or self.d_auc <= MAX_DAUC)

    @property
    def speedup(self) -> float | None:
        return self.fp32_ms / self.engine_ms if self.fp32_ms and self.engine_ms else None

    def line(self) -> str:
        auc_part = (f", AUC difference {self.d_auc:.1e} (target <= {MAX_DAUC:g})" if self.d_auc is not None
                    else ", no labels: AUC not compared")
        speed = (f"; {self.speedup:.2f}x fp32's speed on {SPEED_ROWS:,} rows" if self.speedup is not None else "")
        return (f"{self.engine} against fp32 on {self.rows:,} rows{self.source and ' of ' + self.source}: "
                f"max |dp| {self.max_dp:.1e} (target <= {MAX_DP:g}){auc_part}: "
                f"{'parity holds' if self.ok else 'PARITY FAILS'}{speed}")


def parity(reference: nn.Module, candidate: nn.Module, idx: np.ndarray, val: np.ndarray,
           label: np.ndarray | None = None, engine: str = "", source: str = "",
           ref_logits: np.ndarray | None = None) -> Parity:
    """``candidate`` against ``reference`` (fp32) on the first PARITY_ROWS rows of (idx, val[, label])."""
    n = min(len(idx), PARITY_ROWS)
    idx, val = idx[:n], val[:n]
    ref = sigmoid(ref_logits[:n] if ref_logits is not None else _logits(reference, idx, val))
    got = sigmoid(_logits(candidate, idx, val))
    max_dp = float(np.abs(got - ref).max()) if n else 0.0
    d_auc = None
    if label is not None:
        y = np.asarray(label[:n])
        if 0 < y.sum() < n:
            d_auc = abs(auc(y, got) - auc(y, ref))
    return Parity(engine, n, max_dp, d_auc, source)


def time_pair(a: nn.Module, b: nn.Module, idx: np.ndarray, val: np.ndarray,
              budget_s: float = SPEED_BUDGET_S) -> tuple[float, float]:
    """Seconds of ``a`` and of ``b`` on the first SPEED_ROWS rows: the fastest of alternating rounds (>= 3
    each, after a warm-up), so that a neighbour's load hits both alike."""
    x = torch.from_numpy(np.ascontiguousarray(idx[:SPEED_ROWS]))
    v = torch.from_numpy(np.ascontiguousarray(val[:SPEED_ROWS]))
    times: tuple[list[float], list[float]] = ([], [])
    with torch.no_grad():
        a(x, v), b(x, v)
        start = time.perf_counter()
        while len(times[0]) < 3 or (time.perf_counter() - start < budget_s and len(times[0]) < 50):
            for m, t in ((a, times[0]), (b, times[1])):
                t0 = time.perf_counter()
                m(x, v)
                t.append(time.perf_counter() - t0)
    return min(times[0]), min(times[1])


class Scorer:
    """``__call__(idx, val) -> logits`` through the engine that ``requested`` ("int8", "bf16", "auto")
    resolves to, after one parity check (:meth:`resolve`; see the module docstring). ``report`` receives
    the one-line outcome (default: the deepfm.serve logger; a warning when a requested engine fails)."""

    def __init__(self, model: CTRModel, requested: str, report: Callable[[str], None] | None = None) -> None:
        if requested not in ENGINES:
            raise ValueError(f"quantised engine must be one of {ENGINES}, got {requested!r}")
        self.reference, self.requested = model.eval(), requested
        self.report = report
        names = [requested] if requested != "auto" else ["int8"] + (["bf16"] if has_fast_bf16() else [])
        self.candidates: dict[str, nn.Module] = {}
        if getattr(model, "dnn", None) is None:
            if requested != "auto":
                raise DeepFMError(f"--engine {requested}: model kind {model.cfg.model!r} has no MLP, nothing to "
                                  "quantise; use --engine torch")
        else:
            self.candidates = {name: scoring_model(model, name) for name in names}
        self.chosen: str | None = None  # None until resolved; "fp32" = the reference model
        self.checks: list[Parity] = []

    def _say(self, text: str, warn: bool = False) -> None:
        if self.report is not None:
            self.report(f"warning: {text}" if warn else text)
        else:
            (log.warning if warn else log.info)(text)

    def resolve(self, idx: np.ndarray | None = None, val: np.ndarray | None = None,
                label: np.ndarray | None = None, source: str = "") -> str:
        """Check parity on the first PARITY_ROWS of these rows (on PARITY_ROWS random valid encoded rows when
        none, or fewer than MIN_SAMPLE, are given), report it, and pick the engine; once."""
        if self.chosen is not None:
            return self.chosen
        if idx is None or val is None or len(idx) < MIN_SAMPLE:
            from deepfm.serve.export import random_inputs

            idx, val = random_inputs(self.reference, PARITY_ROWS)
            label, source = None, "random encoded input"
        n = min(len(idx), PARITY_ROWS)
        ref_logits = _logits(self.reference, idx[:n], val[:n])
        self.checks = []
        for name, model in self.candidates.items():
            p = parity(self.reference, model, idx, val, label, engine=name, source=source, ref_logits=ref_logits)
            if self.requested == "auto":
                fp32_s, q_s = time_pair(self.reference, model, idx, val)
                p.fp32_ms, p.engine_ms = fp32_s * 1e3, q_s * 1e3
            self.checks.append(p)
        if self.requested != "auto":
            self.chosen = self.requested
            p = self.checks[0]
            self._say(f"engine {self.requested}: {p.line()}" + ("" if p.ok else
                      f"; scoring in {self.requested} as requested (--engine torch scores in fp32)"), warn=not p.ok)
            return self.chosen
        good = [p for p in self.checks if p.ok and (p.speedup or 0) >= AUTO_MIN_SPEEDUP]
        self.chosen = max(good, key=lambda p: p.speedup or 0).engine if good else "fp32"
        why = "; ".join(p.line() for p in self.checks) or "the model has no MLP"
        verdict = ("passes parity and is the fastest" if good else
                   f"no quantised engine both passes parity and is >= {AUTO_MIN_SPEEDUP}x as fast")
        self._say(f"engine auto -> {self.chosen} ({verdict}): {why}")
        return self.chosen

    @property
    def model(self) -> nn.Module:
        """The model that scores (the resolved engine's, or the fp32 reference)."""
        chosen = self.chosen if self.chosen is not None else self.resolve()
        return self.reference if chosen == "fp32" else self.candidates[chosen]

    def __call__(self, idx: np.ndarray, val: np.ndarray) -> np.ndarray:
        return _logits(self.model, idx, val)


# ---------------------------------------------------------------------------------------------- ONNX
@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantiser logs a pre-processing hint on the root logger at WARNING: not for our users."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def export_onnx_int8(model: CTRModel, path: str | Path) -> Path:
    """Write ``model`` as an int8 ONNX file: the fp32 export (serve.export.export_onnx) of the folded model,
    then onnxruntime's ``quantize_dynamic`` of the same layers as the ``int8`` engine (per-channel int8
    weights of the hidden MatMuls after the first; embeddings, first and output layers fp32). DeepFMError
    naming the package when onnx or onnxruntime is missing."""
    for pkg in ("onnx", "onnxruntime"):
        try:
            __import__(pkg)
        except ImportError:
            raise DeepFMError(f"--quantize int8 needs the {pkg} package: pip install {pkg} "
                              "(or pip install 'deepfm[serve]')") from None
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from deepfm import outputs
    from deepfm.serve.export import export_onnx

    folded = scoring_model(model, "fp32", matmul=True)
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="deepfm-onnx-int8-") as tmp:
        fp32 = export_onnx(folded, Path(tmp) / "fp32.onnx")
        graph = onnx.load(str(fp32)).graph
        inits = {i.name for i in graph.initializer}
        hidden = [n.name for n in graph.node if n.op_type == "MatMul"
                  and any(i in inits and i.startswith("model.dnn.hidden.") and i.endswith("weight_t")
                          for i in n.input)]
        # the first hidden layer stays fp32, like the int8 engine's (its hidden[0] is no MatMul there)
        quantise = hidden[1:]
        if not quantise:
            raise DeepFMError("the model has fewer than two hidden layers: nothing for --quantize int8 to quantise")
        try:
            with outputs.locked(path), outputs.atomic_file(path, ".onnx.tmp") as out, _quiet_root_logger():
                quantize_dynamic(str(fp32), str(out), per_channel=True, reduce_range=not has_vnni(),
                                 weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                                 nodes_to_quantize=quantise)
        except outputs.WRITE_ERRORS as e:
            raise outputs.write_error(e, "the export", path) from None
    return path
