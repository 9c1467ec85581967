"""Optional fused CPU kernels for training and scoring (``kernels.c``), compiled on first use and cached.

The C file is built with the system C compiler (``$CC``, else ``cc``/``gcc``) into the per-user cache
(``$DEEPFM_CACHE/kernels``, by default ``~/.cache/deepfm/kernels``), named by a hash of the source, the
flags and the compiler, written then renamed. Everything degrades to the eager PyTorch path,
which gives the same results: no compiler, a failed build, a non-Linux platform, an OpenMP runtime other
than torch's in the process, or ``DEEPFM_KERNELS=0``. ``status()`` says which.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from deepfm.utils import default_cache_dir

SOURCE = Path(__file__).with_name("kernels.c")
_FLAG_SETS = (["-O3", "-fPIC", "-shared", "-fopenmp", "-DDEEPFM_CLONES"], ["-O3", "-fPIC", "-shared", "-fopenmp"])
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    return default_cache_dir() / "kernels"  # next to the encoded-store cache ($DEEPFM_CACHE)


def _private(path: Path) -> bool:
    """Only load a library from a directory and file that no other user can write."""
    for p in (path.parent, path):
        st = p.stat()
        if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
    return True


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtimes mapped into this process (one is fine: then our threads are torch's threads)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return set(re.findall(r"(/\S*lib(?:gomp|iomp5|omp)[\w.-]*\.so[\w.]*)", maps))


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("DEEPFM_KERNELS", "1") == "0":
        return None, "off (DEEPFM_KERNELS=0)"
    if not sys.platform.startswith("linux"):
        return None, f"off (not built on {sys.platform})"
    cc = _compiler()
    if cc is None:
        return None, "off (no C compiler: set CC, or install gcc)"
    src = SOURCE.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"off ({cc} --version failed: {e})"
    cache = _cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        return None, f"off (cache {cache}: {e})"
    errors = []
    torch.empty(1)  # torch (and its OpenMP runtime) is loaded before ours, so the library links to it
    before = _openmp_runtimes()
    for flags in _FLAG_SETS:
        key = hashlib.sha256(src + " ".join([cc, *flags, version]).encode()).hexdigest()[:20]
        lib_path = cache / f"kernels-{key}.so"
        if not lib_path.exists():
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            try:
                r = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
                if r.returncode != 0:
                    errors.append(r.stderr.strip().splitlines()[-1:] or ["?"])
                    continue
                os.chmod(tmp, 0o700)
                os.replace(tmp, lib_path)
            except (OSError, subprocess.SubprocessError) as e:
                errors.append([str(e)])
                continue
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        try:
            if not _private(lib_path):
                return None, f"off ({lib_path} is writable by other users)"
            lib = ctypes.CDLL(str(lib_path))
        except OSError as e:
            errors.append([str(e)])
            continue
        after = _openmp_runtimes()
        if before and len(after) > len(before):
            return None, f"off (a second OpenMP runtime next to torch's: {sorted(after - before)})"
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.relu_dropout_forward.argtypes = [p, p, p, i64, ctypes.c_int, ctypes.c_uint32, ctypes.c_float, i64, i64]
        lib.relu_dropout_forward.restype = None
        lib.relu_dropout_backward.argtypes = [p, p, p, ctypes.c_float, p, i64, i64]
        lib.relu_dropout_backward.restype = ctypes.c_int
        lib.column_stats.argtypes = [p, i64, i64, p, p]
        lib.column_stats.restype = ctypes.c_int
        lib.affine_relu_dropout_forward.argtypes = [p, p, p, p, p, i64, ctypes.c_int, ctypes.c_uint32,
                                                    ctypes.c_float, i64, i64]
        lib.affine_relu_dropout_forward.restype = None
        lib.bn_relu_dropout_backward.argtypes = [p, p, p, p, p, p, p, ctypes.c_float, p, p, p, i64, i64]
        lib.bn_relu_dropout_backward.restype = ctypes.c_int
        lib.embed_forward.argtypes = [p, i64, p, p, p, p, i64, i64, i64, p, p, p, p]
        lib.embed_forward.restype = None
        lib.embed_backward.argtypes = [p, i64, p, p, p, p, p, p, i64, i64, i64, i64, p, p, p, i64, p, p,
                                       ctypes.c_float]
        lib.embed_backward.restype = ctypes.c_int
        lib.relu_dropout_forward_bf16.argtypes = lib.relu_dropout_forward.argtypes
        lib.relu_dropout_forward_bf16.restype = None
        lib.relu_dropout_backward_bf16.argtypes = lib.relu_dropout_backward.argtypes
        lib.relu_dropout_backward_bf16.restype = ctypes.c_int
        lib.column_stats_bf16.argtypes = lib.column_stats.argtypes
        lib.column_stats_bf16.restype = ctypes.c_int
        lib.affine_relu_dropout_forward_bf16.argtypes = lib.affine_relu_dropout_forward.argtypes
        lib.affine_relu_dropout_forward_bf16.restype = None
        lib.bn_relu_dropout_backward_bf16.argtypes = lib.bn_relu_dropout_backward.argtypes
        lib.bn_relu_dropout_backward_bf16.restype = ctypes.c_int
        return lib, f"on ({lib_path})"
    return None, f"off (build failed: {'; '.join(e[0] for e in errors)})"


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (built once per process; see ``status``; None inside ``disabled()``)."""
    if "lib" not in _state:
        _state["lib"], _state["status"] = _build()
    return None if _state.get("disabled") else _state["lib"]  # type: ignore[return-value]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside the block, everything takes the eager PyTorch path (for comparisons and tests)."""
    before = _state.get("disabled", False)
    _state["disabled"] = True
    try:
        yield
    finally:
        _state["disabled"] = before


def status() -> str:
    """'on (path)' or 'off (why)'."""
    library()
    return str(_state["status"])


def capturing() -> bool:
    """True while torch traces, scripts, compiles or exports the model: the graph must see plain ops."""
    return bool(torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
                or torch.compiler.is_compiling())


def _check(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> None:
    if t.dtype != dtype or not t.is_contiguous() or tuple(t.shape) != shape or t.device.type != "cpu":
        raise ValueError(f"expected a contiguous {dtype} CPU tensor of shape {shape}, got {t.dtype} "
                         f"{tuple(t.shape)} contiguous={t.is_contiguous()}")


def _act(t: torch.Tensor) -> tuple[torch.dtype, str]:
    """The activation dtype a kernel runs in (float32 or bfloat16) and its symbol suffix."""
    if t.dtype == torch.bfloat16:
        return torch.bfloat16, "_bf16"
    return torch.float32, ""


def relu_dropout_forward(z: torch.Tensor, bias: torch.Tensor, bits: np.ndarray, k: int, threshold: int,
                         scale: float) -> None:
    """z [rows, cols] <- dropout(relu(z + bias)) in place; ``bits`` [rows, row_words] uint64 row-aligned raw
    bits, element j kept when its k-bit field >= threshold (see FastDropout.draw)."""
    rows, cols = z.shape
    dt, sfx = _act(z)
    _check(z, (rows, cols), dt)
    _check(bias, (cols,))
    _bits_ok(bits, rows, cols, k)
    getattr(library(), "relu_dropout_forward" + sfx)(z.data_ptr(), bias.data_ptr(), bits.ctypes.data,
                                                     bits.shape[1] * 8, k, threshold, scale, rows, cols)


def relu_dropout_backward(grad: torch.Tensor, y: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dz [rows, cols], dL/dbias [cols] float32) from dL/dy and the forward's output y (both float32,
    or both bfloat16: then dL/dz is bfloat16)."""
    rows, cols = y.shape
    dt, sfx = _act(y)
    grad = grad.contiguous()
    _check(grad, (rows, cols), dt)
    _check(y, (rows, cols), dt)
    out, gb = torch.empty_like(y), y.new_empty(cols, dtype=torch.float32)
    if getattr(library(), "relu_dropout_backward" + sfx)(out.data_ptr(), grad.data_ptr(), y.data_ptr(), scale,
                                                         gb.data_ptr(), rows, cols):
        raise MemoryError("relu_dropout_backward: out of memory for the bias-gradient partial sums")
    return out, gb


def column_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [cols], biased variance [cols]) of z [rows, cols] (float32 or bfloat16), float64."""
    rows, cols = z.shape
    dt, sfx = _act(z)
    _check(z, (rows, cols), dt)
    mean, var = torch.empty(cols, dtype=torch.float64), torch.empty(cols, dtype=torch.float64)
    if getattr(library(), "column_stats" + sfx)(z.data_ptr(), rows, cols, mean.data_ptr(), var.data_ptr()):
        raise MemoryError("column_stats: out of memory for the partial sums")
    return mean, var


def _bits_ok(bits: np.ndarray, rows: int, cols: int, k: int) -> None:
    if bits.dtype != np.uint64 or bits.shape[0] != rows or bits.shape[1] * 64 < cols * k or not bits.flags.c_contiguous:
        raise ValueError(f"dropout bits {bits.dtype} {bits.shape} do not cover [{rows}, {cols}] x {k} bits")


def affine_relu_dropout_forward(z: torch.Tensor, a: torch.Tensor, c: torch.Tensor, bits: np.ndarray, k: int,
                                threshold: int, scale: float) -> torch.Tensor:
    """dropout(relu(a * z + c)) [rows, cols] (a new tensor of z's dtype, float32 or bfloat16; a, c [cols]
    float32); mask bits as in :func:`relu_dropout_forward`."""
    rows, cols = z.shape
    dt, sfx = _act(z)
    _check(z, (rows, cols), dt)
    _check(a, (cols,))
    _check(c, (cols,))
    _bits_ok(bits, rows, cols, k)
    y = torch.empty_like(z)
    getattr(library(), "affine_relu_dropout_forward" + sfx)(z.data_ptr(), y.data_ptr(), a.data_ptr(), c.data_ptr(),
                                                            bits.ctypes.data, bits.shape[1] * 8, k, threshold, scale,
                                                            rows, cols)
    return y


def bn_relu_dropout_backward(grad: torch.Tensor, y: torch.Tensor, z: torch.Tensor, mean: torch.Tensor,
                             invstd: torch.Tensor, gamma: torch.Tensor, scale: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dz, dL/dgamma, dL/dbeta, dL/dbias) of y = dropout(relu(gamma * (z - mean) * invstd + beta)) with
    batch statistics (mean, invstd [cols] float32 of z itself). grad, y, z (and dL/dz) all float32 or all
    bfloat16; the parameter gradients float32."""
    rows, cols = y.shape
    dt, sfx = _act(y)
    grad = grad.contiguous()
    for t in (grad, y, z):
        _check(t, (rows, cols), dt)
    for t in (mean, invstd, gamma):
        _check(t, (cols,))
    dz = torch.empty_like(z)
    dgamma, dbeta, gb = (z.new_empty(cols, dtype=torch.float32) for _ in range(3))
    if getattr(library(), "bn_relu_dropout_backward" + sfx)(dz.data_ptr(), grad.data_ptr(), y.data_ptr(),
                                                            z.data_ptr(), mean.data_ptr(), invstd.data_ptr(),
                                                            gamma.data_ptr(), scale, dgamma.data_ptr(),
                                                            dbeta.data_ptr(), gb.data_ptr(), rows, cols):
        raise MemoryError("bn_relu_dropout_backward: out of memory for the partial sums")
    return dz, dgamma, dbeta, gb


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def embed_forward(v: torch.Tensor, w: torch.Tensor | None, rows: torch.Tensor, val: torch.Tensor,
                  slot_field: torch.Tensor, n_fields: int, fm: bool, penalty: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One pass for DeepFM's field terms: (e [B, F, K], fm [B] or None, first [B] or None, penalty [] or
    None), with e[b, f] = sum of v[rows[b, s]] * val[b, s] over the slots s of field f, fm the FM
    second-order term over e (paper eq. 2), first = sum_s w[rows[b, s]] * val[b, s] (when ``w`` [R, 1] is given) and
    penalty the sum of squares of the rows used, per use, in v and w (``CTRModel.embedding_penalty`` times
    B). v [R, K] float32, rows [B, S] int64 (< R), val [B, S] float32, slot_field [S] int32 (< n_fields)."""
    R, K = v.shape
    B, S = rows.shape
    _check(v, (R, K))
    _check(val, (B, S))
    if w is not None:
        _check(w, (R, 1))
    if (rows.dtype != torch.int64 or not rows.is_contiguous() or slot_field.dtype != torch.int32
            or tuple(slot_field.shape) != (S,) or not slot_field.is_contiguous()):
        raise ValueError("rows must be contiguous int64 [B, S] and slot_field contiguous int32 [S]")
    if B * max(S, n_fields) >= 2**31:
        raise ValueError(f"a batch of {B} x {S} slots is too large for the kernels' int32 positions")
    e = v.new_empty(B, n_fields, K)
    y_fm = v.new_empty(B) if fm else None
    y_first = v.new_empty(B) if w is not None else None
    sq = v.new_empty(B) if penalty else None
    library().embed_forward(v.data_ptr(), K, _ptr(w), rows.data_ptr(), val.data_ptr(), slot_field.data_ptr(), B, S,
                            n_fields, e.data_ptr(), _ptr(y_fm), _ptr(y_first), _ptr(sq))
    return e, y_fm, y_first, None if sq is None else sq.sum()


def embed_backward(grad_e: torch.Tensor | None, grad_fm: torch.Tensor | None, grad_first: torch.Tensor | None,
                   grad_penalty: torch.Tensor | None, v: torch.Tensor, w: torch.Tensor | None, e: torch.Tensor,
                   rows: torch.Tensor, val: torch.Tensor, slot_field: torch.Tensor, want_v: bool, want_w: bool
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The dense table gradients (v [R, K], w [R, 1]) of :func:`embed_forward` from dL/de [B, F, K] (any row
    stride, unit stride inside a row), dL/dfm [B], dL/dfirst [B] and dL/dpenalty [] (each may be None)."""
    B, F, K = e.shape
    S = rows.shape[1]
    n_rows = v.shape[0]
    ld = F * K
    if grad_e is not None:
        if grad_e.stride(2) != 1 or grad_e.stride(1) != K:
            grad_e = grad_e.contiguous()
        ld = grad_e.stride(0)
        if grad_e.dtype != torch.float32 or tuple(grad_e.shape) != (B, F, K):
            raise ValueError(f"grad_e {grad_e.dtype} {tuple(grad_e.shape)} does not fit e {(B, F, K)}")
    if grad_fm is not None:
        grad_fm = grad_fm.contiguous()
        _check(grad_fm, (B,))
    if grad_first is not None:
        grad_first = grad_first.contiguous()
        _check(grad_first, (B,))
    c = 0.0 if grad_penalty is None else 2.0 * float(grad_penalty)
    want_w = want_w and w is not None and (grad_first is not None or c != 0.0)
    gv = e.new_zeros(n_rows, K) if want_v else None
    gw = e.new_zeros(n_rows, 1) if want_w else None
    scratch = e.new_empty(B, F, K) if want_v else None
    if library().embed_backward(_ptr(grad_e), ld, _ptr(grad_fm), _ptr(grad_first) if want_w else None,
                                e.data_ptr(), rows.data_ptr(), val.data_ptr(), slot_field.data_ptr(), B, S, F, K,
                                _ptr(scratch), _ptr(gv), _ptr(gw), n_rows, v.data_ptr(), _ptr(w), c):
        raise MemoryError("embed_backward: out of memory for the per-thread pair lists")
    return gv, gw
