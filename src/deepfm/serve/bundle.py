"""The model bundle: one folder, safetensors + JSON only (loading never unpickles or executes anything).

    BUNDLE/
      manifest.json       format name + version, package version, data format, sha256 of every file
      model.safetensors   all weights (float32)
      model.json          ModelConfig and the field layout (names, kinds, table rows, slots)
      preprocessor.json   schema, vocabularies, numeric transform parameters
      training.json       training config, data description, per-epoch history
      metrics.json        validation (and test, if given) metrics
      calibration.json    the negative-rate correction and calibration map (deepfm.calibration), when not identity
      train.log           the training run's log lines (written by `deepfm train --out`)

Writes go to a temporary sibling folder, every file is fsynced, then one rename publishes the bundle, so a
crash never leaves a folder that loads. Loading verifies the format version and every checksum.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import mmap
import os
import reprlib
import shutil
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from deepfm import __version__, outputs
from deepfm.accel import accelerate
from deepfm.calibration import FILE as CALIBRATION_FILE
from deepfm.calibration import PostProcess
from deepfm.data.preprocess import Preprocessor
from deepfm.errors import BundleError, DeepFMError
from deepfm.layout import FieldSpec, layout
from deepfm.models.baselines import BASELINE_CLASSES
from deepfm.models.build import build_model
from deepfm.models.ctr import MODELS, CTRModel, ModelConfig
from deepfm.models.layers import MLP
from deepfm.schema import from_dict as schema_from_dict

FORMAT = "deepfm-bundle"
FORMAT_VERSION = 1


@dataclass
class Bundle:
    model: CTRModel
    preprocessor: Preprocessor
    data_format: str | None
    training: dict[str, Any]
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    path: Path | None = None
    # logits -> served probabilities (calibration.json; the identity when the bundle has none)
    postprocess: PostProcess = dataclasses.field(default_factory=PostProcess)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, allow_nan=True)
        fh.flush()
        os.fsync(fh.fileno())


def save(bundle_dir: str | Path, model: CTRModel, pre: Preprocessor, data_format: str | None,
         training: dict[str, Any], metrics: dict[str, Any], force: bool = False,
         extra_files: dict[str, bytes] | None = None, postprocess: PostProcess | None = None) -> Path:
    """Write a bundle atomically to ``bundle_dir``, under its write lock. An existing folder there is replaced
    only if it is a bundle or a training run's folder (checkpoints), or with ``force``; else a DeepFMError.
    ``extra_files``: more files by name (e.g. ``train.log``), checksummed in the manifest like the others.
    ``postprocess``: written as calibration.json unless it is the identity."""
    out = Path(bundle_dir)
    extra = dict(extra_files or {})
    if postprocess is not None and not postprocess.identity:
        extra[CALIBRATION_FILE] = json.dumps(postprocess.to_dict(), indent=1).encode()
    with outputs.locked(out):
        outputs.check_dir_out(out, ("bundle", "train-run"), force=force)
        return _save(out, model, pre, data_format, training, metrics, extra)


def _save(out: Path, model: CTRModel, pre: Preprocessor, data_format: str | None, training: dict[str, Any],
          metrics: dict[str, Any], extra_files: dict[str, bytes]) -> Path:
    tmp = outputs.temp_dir(out)  # unique, and 0755 under umask 022 (mkdtemp alone makes 0700)
    try:
        # CPU tensors whatever the device the model trained on: a bundle is device-free
        state = {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        outputs.follow_umask(tmp / "model.safetensors", is_dir=False)  # safetensors creates its files 0600
        with open(tmp / "model.safetensors", "rb+") as fh:
            os.fsync(fh.fileno())
        _write_json(tmp / "model.json", {"config": model.cfg.to_dict(),
                                         "fields": [asdict(f) for f in layout(pre)]})
        _write_json(tmp / "preprocessor.json", pre.to_dict())
        _write_json(tmp / "training.json", training)
        _write_json(tmp / "metrics.json", metrics)
        for name, data in extra_files.items():
            if Path(name).name != name or name == "manifest.json" or (tmp / name).exists():
                raise ValueError(f"bad extra bundle file name {name!r}")
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        files = sorted(p.name for p in tmp.iterdir())
        _write_json(tmp / "manifest.json", {
            "format": FORMAT, "format_version": FORMAT_VERSION, "deepfm_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "data_format": data_format,
            "model": model.cfg.model, "files": {n: _sha256(tmp / n) for n in files},
        })
        outputs.publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------------ loading
# Loading trusts nothing in the folder: every file is opened by name inside the bundle folder, without
# following symlinks, only if it is a regular file, and only up to a size limit; every size the JSON files
# claim is checked against the weights file's header before the model (and its tables) is allocated.
REQUIRED_FILES = ("model.safetensors", "model.json", "preprocessor.json", "training.json", "metrics.json")
JSON_LIMITS = {"manifest.json": 1 << 20, "model.json": 16 << 20, "training.json": 64 << 20,
               "metrics.json": 16 << 20}
PREPROCESSOR_LIMIT = 256 << 20  # plus 4 x the weights file: each vocabulary entry is a row of the tables
OTHER_FILE_LIMIT = 256 << 20  # other checksummed files (e.g. train.log)
HEADER_LIMIT = 100 << 20  # the safetensors library's own limit on the header
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_HEX = frozenset("0123456789abcdef")
_FIELD_KINDS = ("cat", "num", "multi")


def _clip(value: Any, n: int = 80) -> str:
    text = reprlib.repr(value)  # bounded: never the repr of a whole 16 MB value
    return text if len(text) <= n else text[:n] + "..."


def _open_regular(d: Path, dir_fd: int, name: str, limit: int) -> tuple[int, int]:
    """-> (fd, size) of the regular file ``name`` directly inside the bundle folder (opened through the
    folder's descriptor, without following a symlink and without blocking on a FIFO), at most ``limit`` bytes."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        raise BundleError(f"{d}: missing file {name}; the bundle is incomplete") from None
    except OSError as e:
        raise BundleError(f"{d}: cannot read {name} ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise BundleError(f"{d}: {name} is a symbolic link; a bundle holds only regular files, refusing it")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd) if stat.S_ISREG(st.st_mode) else -1
    except OSError as e:  # ELOOP: replaced by a symlink since the lstat
        raise BundleError(f"{d}: cannot open {name} ({e.strerror}); a bundle holds only regular files") from None
    st = os.fstat(fd) if fd >= 0 else st
    if not stat.S_ISREG(st.st_mode):
        if fd >= 0:
            os.close(fd)
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a special file")
        raise BundleError(f"{d}: {name} is not a regular file ({kind}); refusing it")
    if st.st_size > limit:
        os.close(fd)
        raise BundleError(f"{d}: {name} is {st.st_size:,} bytes, more than the {limit:,}-byte limit for it; "
                          "the bundle is damaged or not deepfm's")
    return fd, st.st_size


def _read_exact(d: Path, name: str, fd: int, size: int) -> bytes:
    """Exactly ``size`` bytes from ``fd`` (a file that shrinks or grows while read is an error)."""
    parts, left = [], size
    while left > 0:
        chunk = os.read(fd, min(left, 16 << 20))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    if left or os.read(fd, 1):
        raise BundleError(f"{d}: {name} changed size while it was read; retry when the bundle is complete")
    return b"".join(parts)


def _read_file(d: Path, dir_fd: int, name: str, limit: int) -> bytes:
    fd, size = _open_regular(d, dir_fd, name, limit)
    try:
        return _read_exact(d, name, fd, size)
    except OSError as e:
        raise BundleError(f"{d}: cannot read {name} ({e.strerror})") from None
    finally:
        os.close(fd)


def _parse_json(d: Path, name: str, data: bytes, obj: bool = True) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BundleError(f"{d}: {name} is not UTF-8 (byte {e.start}); the bundle is corrupt") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise BundleError(f"{d}: {name} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                          "the bundle is corrupt") from None
    except RecursionError:
        raise BundleError(f"{d}: {name} is nested too deeply; the bundle is corrupt") from None
    if obj and not isinstance(value, dict):
        raise BundleError(f"{d}: {name} must hold a JSON object, not {type(value).__name__}")
    return value


def _check_manifest(d: Path, manifest: dict[str, Any], verify: bool) -> dict[str, str]:
    """-> the checksummed files {name: sha256}: every file the format defines must be listed (an empty or
    partial ``files`` would otherwise switch the checks off) and each name must be a plain file name."""
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{d}: manifest format is {_clip(manifest.get('format'))}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise BundleError(f"{d}: bundle format version {_clip(version)} is not supported by deepfm {__version__} "
                          f"(which reads version {FORMAT_VERSION}); re-train or use the deepfm version that "
                          f"wrote it ({_clip(manifest.get('deepfm_version'))})")
    for key in ("deepfm_version", "created", "model", "data_format"):  # what `deepfm info` and /v1/metadata show
        if not isinstance(manifest.get(key), str) and not (key == "data_format" and manifest.get(key) is None):
            raise BundleError(f"{d}: manifest.json: {key!r} must be a string, got {_clip(manifest.get(key))}")
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise BundleError(f"{d}: manifest.json 'files' must be a mapping of file name to SHA-256, "
                          f"not {type(files).__name__}")
    for name, digest in files.items():
        if name in ("", ".", "..", "manifest.json") or "/" in name or "\\" in name or "\0" in name:
            raise BundleError(f"{d}: manifest.json lists {_clip(name)}, which is not a file name in the bundle")
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX):
            raise BundleError(f"{d}: manifest.json: the checksum of {name} is not a SHA-256 hex digest "
                              f"({_clip(digest)})")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if verify and missing:
        raise BundleError(f"{d}: manifest.json has no checksum for {', '.join(missing)}; every file of the "
                          "format must be checksummed, the bundle is damaged or was edited")
    return files


def _verified(d: Path, files: dict[str, str], name: str, data: bytes, verify: bool) -> bytes:
    if verify and hashlib.sha256(data).hexdigest() != files[name]:
        raise BundleError(f"{d}: checksum mismatch for {name}; the bundle is corrupt, re-export it")
    return data


def _header(d: Path, fd: int, size: int) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], int]:
    """Parse and validate model.safetensors' header (its 8-byte length, then JSON) without reading the
    data: -> ({tensor: (dtype, shape, begin, end)}, data start). The tensors must tile the data exactly."""
    name = "model.safetensors"
    if size < 8:
        raise BundleError(f"{d}: {name} is too short ({size} bytes) to be a safetensors file")
    n = int.from_bytes(os.pread(fd, 8, 0), "little")
    if n > min(HEADER_LIMIT, size - 8):
        raise BundleError(f"{d}: {name}: the header claims {n:,} bytes, but the file holds {size - 8:,} after "
                          "its length; the file is truncated or not safetensors")
    raw = os.pread(fd, n, 8)
    if len(raw) != n:
        raise BundleError(f"{d}: {name} changed size while it was read")
    header = _parse_json(d, f"{name} header", raw, obj=True)
    out: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise BundleError(f"{d}: {name}: header entry {_clip(key)} is not a mapping")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise BundleError(f"{d}: {name}: tensor {key} has unknown dtype {_clip(dtype)}")
        if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
            raise BundleError(f"{d}: {name}: tensor {key} has an invalid shape {_clip(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise BundleError(f"{d}: {name}: tensor {key} has invalid data offsets {_clip(offsets)}")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise BundleError(f"{d}: {name}: tensor {key} {dtype} {shape} does not fit its "
                              f"{offsets[1] - offsets[0]:,} data bytes")
        out[key] = (dtype, tuple(shape), offsets[0], offsets[1])
    end = 0
    for key, (_, _, begin, stop) in sorted(out.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != end:
            what = "overlaps another tensor's" if begin < end else "leaves a gap before it"
            raise BundleError(f"{d}: {name}: tensor {key}'s data {what}; the file is corrupt")
        end = stop
    held = size - 8 - n
    if end != held:
        raise BundleError(f"{d}: {name}: the header declares {end:,} data bytes, the file holds {held:,} "
                          f"({'truncated' if held < end else 'trailing bytes'}); the file is corrupt")
    return out, 8 + n


def _model_json(d: Path, model_json: dict[str, Any]) -> tuple[list[FieldSpec], ModelConfig]:
    """model.json -> (fields, config), every value checked for type and range (a negative or absurd size
    must be a clear error here, not a traceback from torch)."""
    where = f"{d}: model.json"
    for key in ("config", "fields"):
        if key not in model_json:
            raise BundleError(f"{where} has no {key!r}; the bundle is damaged or was edited")
    raw_fields, raw_cfg = model_json["fields"], model_json["config"]
    if not isinstance(raw_fields, list) or not raw_fields:
        raise BundleError(f"{where}: 'fields' must be a non-empty list")
    fields = []
    names = {f.name for f in dataclasses.fields(FieldSpec)}
    for i, f in enumerate(raw_fields):
        if not isinstance(f, dict) or set(f) - names or not {"name", "kind", "size", "slots"} <= set(f):
            raise BundleError(f"{where}: fields[{i}] must be a mapping with keys {sorted(names)}, got {_clip(f)}")
        if not isinstance(f["name"], str) or f["kind"] not in _FIELD_KINDS or not isinstance(f.get("pooling", ""), str):
            raise BundleError(f"{where}: fields[{i}] has an invalid name, kind or pooling ({_clip(f)})")
        for key in ("size", "slots"):
            if type(f[key]) is not int or f[key] < 1:
                raise BundleError(f"{where}: fields[{i}] ({f['name']!r}) {key} must be a positive integer, "
                                  f"got {_clip(f[key])}")
        fields.append(FieldSpec(**f))
    if not isinstance(raw_cfg, dict):
        raise BundleError(f"{where}: 'config' must be a mapping, not {type(raw_cfg).__name__}")
    try:
        cfg = ModelConfig.from_dict(raw_cfg)
    except (TypeError, ValueError) as e:
        raise BundleError(f"{where}: config: {str(e)[:300]}") from None
    bad = None
    if type(cfg.embed_dim) is not int or cfg.embed_dim < 1:
        bad = "embed_dim must be a positive integer"
    elif not (isinstance(cfg.hidden, list) and all(type(h) is int and h >= 1 for h in cfg.hidden)):
        bad = "hidden must be a list of positive integers"
    elif not (isinstance(cfg.dropout, (int, float)) and not isinstance(cfg.dropout, bool) and 0 <= cfg.dropout < 1):
        bad = "dropout must be a number in [0, 1)"
    elif not isinstance(cfg.batch_norm, bool) or cfg.activation not in MLP.ACTIVATIONS:
        bad = f"batch_norm must be true/false and activation one of {sorted(MLP.ACTIVATIONS)}"
    elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                 for v in (cfg.embedding_l2, cfg.net_l2, cfg.init_std)):
        bad = "embedding_l2, net_l2 and init_std must be finite non-negative numbers"
    if bad:
        raise BundleError(f"{where}: config: {bad} ({_clip(raw_cfg)})")
    return fields, cfg


def _preprocessor(d: Path, data: dict[str, Any]) -> Preprocessor:
    """preprocessor.json -> Preprocessor, with the state every field needs (a vocabulary of strings, or the
    standardize mean/std) present and well-typed, so that a damaged file fails here and not at predict time."""
    where = f"{d}: preprocessor.json"
    for key in ("schema", "states"):
        if key not in data:
            raise BundleError(f"{where} has no {key!r}; the bundle is damaged or was edited")
    if not isinstance(data["states"], dict) or not all(isinstance(s, dict) for s in data["states"].values()):
        raise BundleError(f"{where}: 'states' must map each field to a mapping")
    try:
        schema = schema_from_dict(data["schema"], source="preprocessor.json")
    except (DeepFMError, TypeError, ValueError) as e:
        raise BundleError(f"{where}: invalid schema: {str(e)[:300]}") from None
    states = data["states"]
    for f in schema.fields:
        st = states.get(f.name)
        if st is None:
            raise BundleError(f"{where}: no state for field {f.name!r}")
        if f.encoded_kind != "num" and f.hash_buckets is None:
            vocab = st.get("vocab")
            if not (isinstance(vocab, list) and all(isinstance(v, str) for v in vocab)):
                raise BundleError(f"{where}: field {f.name!r} has no vocabulary (a list of strings)")
        if f.encoded_kind == "num" and f.transform == "standardize":
            for key in ("mean", "std"):
                v = st.get(key)
                if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                        and (key == "mean" or v > 0)):
                    raise BundleError(f"{where}: field {f.name!r}: standardize {key} must be a finite number"
                                      f"{' > 0' if key == 'std' else ''}, got {_clip(v)}")
    try:
        return Preprocessor(schema, states)
    except (TypeError, ValueError) as e:  # pyarrow's errors are both
        raise BundleError(f"{where}: {str(e)[:300]}") from None


def _check_claims(d: Path, fields: list[FieldSpec], cfg: ModelConfig,
                  header: dict[str, tuple[str, tuple[int, ...], int, int]]) -> None:
    """The model that model.json and preprocessor.json describe must be the one the weights hold: table
    rows, embedding size and layer widths against the header, before anything is allocated (a small bundle
    that claims 3e7 hash buckets must not make us allocate gigabytes to find out)."""
    for key, (dtype, _, _, _) in header.items():
        if dtype != "F32":
            raise BundleError(f"{d}: model.safetensors: tensor {key} is {dtype}; a bundle stores float32 weights")
    rows = sum(f.size for f in fields)
    k = cfg.embed_dim
    cls = CTRModel if cfg.model in MODELS else BASELINE_CLASSES[cfg.model]
    stub = cls.__new__(cls)  # uninitialised: the model's own blocks()/dnn_width(), nothing allocated
    object.__setattr__(stub, "cfg", cfg)
    use_first, use_fm, use_dnn = cls.blocks(stub, cfg)
    tables = {"w.weight": (rows, 1)} if use_first else {}
    if use_fm or use_dnn:
        tables["v.weight"] = (rows, k)
    if "v_dnn.weight" in header:
        tables["v_dnn.weight"] = (rows, k)
    big = max(fields, key=lambda f: f.size)
    for key, want in tables.items():
        got = header.get(key, (None, None))[1]
        if got != want:
            raise BundleError(
                f"{d}: model.json and preprocessor.json describe {rows:,} table rows (the sum of the field sizes; "
                f"the largest is {big.name!r} with {big.size:,}) and embed_dim {k}: {key} should be {list(want)}, "
                f"but model.safetensors holds "
                f"{'no such tensor' if got is None else list(got)}; the bundle is inconsistent")
    claimed = sum(r * c for r, c in tables.values())
    if use_dnn:
        widths = [cls.dnn_width(stub, fields), *cfg.hidden, 1]
        claimed += sum(a * b for a, b in zip(widths, widths[1:], strict=False))
    held = sum(math.prod(shape) for _, shape, _, _ in header.values())
    if claimed > held:
        raise BundleError(f"{d}: model.json describes a model of at least {claimed:,} weights, but "
                          f"model.safetensors holds {held:,}; the bundle is inconsistent")


def _weights(d: Path, fd: int, size: int, start: int,
             header: dict[str, tuple[str, tuple[int, ...], int, int]]) -> tuple[dict[str, torch.Tensor], mmap.mmap]:
    """Float32 tensors viewing a private (copy-on-write) map of the file: nothing is copied until
    load_state_dict copies them into the model. Every value must be finite."""
    buf = mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else None
    state = {}
    for key, (_, shape, begin, end) in header.items():
        t = torch.frombuffer(buf, dtype=torch.float32, count=(end - begin) // 4, offset=start + begin) \
            if end > begin else torch.empty(0)
        flat = t.reshape(-1)
        for i in range(0, flat.numel(), 1 << 22):  # in blocks: a bool mask of a whole table costs its size / 4
            part = flat[i:i + (1 << 22)]
            if not bool(torch.isfinite(part).all()):
                bad = int((~torch.isfinite(flat)).sum())
                first = i + int(torch.nonzero(~torch.isfinite(part))[0])
                raise BundleError(f"{d}: model.safetensors: tensor {key} holds {bad:,} non-finite value(s) "
                                  f"(NaN or inf; the first at flat index {first:,}); the model diverged or "
                                  "the file is corrupt, re-train it")
        state[key] = t.reshape(shape)
    return state, buf


def load(bundle_dir: str | Path, verify: bool = True) -> Bundle:
    """Load a bundle; raises BundleError with what to do when it is missing, corrupt, inconsistent or of
    another version. Reads only the regular files the manifest lists, inside the folder (see _open_regular)."""
    d = Path(bundle_dir)
    try:
        dir_fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise BundleError(f"{d}: not a deepfm bundle ({e.strerror}); pass the folder written by "
                          "`deepfm train --out DIR`") from None
    try:
        return _load(d, dir_fd, verify)
    finally:
        os.close(dir_fd)


def _load(d: Path, dir_fd: int, verify: bool) -> Bundle:
    try:
        os.lstat("manifest.json", dir_fd=dir_fd)
    except FileNotFoundError:
        raise BundleError(f"{d}: not a deepfm bundle (no manifest.json); pass the folder written by "
                          "`deepfm train --out DIR`") from None
    except OSError:
        pass  # _read_file says what is wrong
    manifest = _parse_json(d, "manifest.json", _read_file(d, dir_fd, "manifest.json", JSON_LIMITS["manifest.json"]))
    files = _check_manifest(d, manifest, verify)
    docs: dict[str, Any] = {}
    wfd, wsize = _open_regular(d, dir_fd, "model.safetensors", 1 << 62)
    try:
        if verify:
            h = hashlib.sha256()
            for off in range(0, wsize, 16 << 20):
                h.update(os.pread(wfd, min(16 << 20, wsize - off), off))
            if h.hexdigest() != files["model.safetensors"]:
                raise BundleError(f"{d}: checksum mismatch for model.safetensors; the bundle is corrupt, re-export it")
        for name in ("model.json", "preprocessor.json", "training.json", "metrics.json"):
            limit = JSON_LIMITS.get(name, PREPROCESSOR_LIMIT + 4 * wsize)
            docs[name] = _parse_json(d, name, _verified(d, files, name, _read_file(d, dir_fd, name, limit), verify))
        for name in sorted(set(files) - set(REQUIRED_FILES)):  # e.g. train.log: verified, not parsed
            data = _verified(d, files, name, _read_file(d, dir_fd, name, OTHER_FILE_LIMIT), verify)
            if name == CALIBRATION_FILE:
                docs[name] = data
        post = PostProcess()
        if CALIBRATION_FILE in docs:
            try:
                post = PostProcess.from_dict(_parse_json(d, CALIBRATION_FILE, docs.pop(CALIBRATION_FILE)))
            except ValueError as e:
                raise BundleError(f"{d}: {CALIBRATION_FILE}: {str(e)[:300]}; the bundle is damaged or was edited") \
                    from None
        fields, cfg = _model_json(d, docs["model.json"])
        pre = _preprocessor(d, docs["preprocessor.json"])
        if fields != layout(pre):
            raise BundleError(f"{d}: model.json fields do not match preprocessor.json")
        metrics = docs["metrics.json"]
        for split, met in metrics.items():
            if not (isinstance(met, dict) and all(isinstance(met.get(k), (int, float)) for k in ("auc", "logloss"))
                    and type(met.get("rows")) is int):
                raise BundleError(f"{d}: metrics.json: {_clip(split)} must hold a numeric auc, logloss and rows")
        header, start = _header(d, wfd, wsize)
        _check_claims(d, fields, cfg, header)
        state, buf = _weights(d, wfd, wsize, start, header)
        model = accelerate(build_model(fields, cfg))  # scored with the fused CPU kernels (deepfm.accel)
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, OSError) as e:
            raise BundleError(f"{d}: weights do not match the model description: {str(e)[:400]}") from None
        finally:
            del state  # the views into the map, before it is unmapped
            if buf is not None:
                with contextlib.suppress(BufferError):  # a view still alive: the map goes with it
                    buf.close()
    except OSError as e:
        raise BundleError(f"{d}: cannot read the bundle ({e.strerror or e})") from None
    finally:
        os.close(wfd)
    model.eval()
    return Bundle(model=model, preprocessor=pre, data_format=manifest.get("data_format"),
                  training=docs["training.json"], metrics=metrics, manifest=manifest, path=d, postprocess=post)
