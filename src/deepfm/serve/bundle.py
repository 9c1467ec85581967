"""The model bundle: one folder, safetensors + JSON only (loading never unpickles or executes anything).

    BUNDLE/
      manifest.json       format name + version, package version, data format, sha256 of every file
      model.safetensors   all weights (float32)
      model.json          ModelConfig and the field layout (names, kinds, table rows, slots)
      preprocessor.json   schema, vocabularies, numeric transform parameters
      training.json       training config, data description, per-epoch history
      metrics.json        validation (and test, if given) metrics

Writes go to a temporary sibling folder, every file is fsynced, then one rename publishes the bundle, so a
crash never leaves a folder that loads. Loading verifies the format version and every checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from deepfm import __version__
from deepfm.data.preprocess import Preprocessor
from deepfm.data.store import FieldSpec, layout
from deepfm.errors import BundleError
from deepfm.models.ctr import CTRModel, ModelConfig, build_model

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
         training: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """Write a bundle atomically to ``bundle_dir`` (replacing an existing bundle there)."""
    out = Path(bundle_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        with open(tmp / "model.safetensors", "rb+") as fh:
            os.fsync(fh.fileno())
        _write_json(tmp / "model.json", {"config": model.cfg.to_dict(),
                                         "fields": [asdict(f) for f in layout(pre)]})
        _write_json(tmp / "preprocessor.json", pre.to_dict())
        _write_json(tmp / "training.json", training)
        _write_json(tmp / "metrics.json", metrics)
        files = sorted(p.name for p in tmp.iterdir())
        _write_json(tmp / "manifest.json", {
            "format": FORMAT, "format_version": FORMAT_VERSION, "deepfm_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "data_format": data_format,
            "model": model.cfg.model, "files": {n: _sha256(tmp / n) for n in files},
        })
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable ({e})") from None


def load(bundle_dir: str | Path, verify: bool = True) -> Bundle:
    """Load a bundle; raises BundleError with what to do when it is missing, corrupt or of another version."""
    d = Path(bundle_dir)
    man_path = d / "manifest.json"
    if not man_path.exists():
        raise BundleError(f"{d}: not a deepfm bundle (no manifest.json); pass the folder written by "
                          "`deepfm train --out DIR`")
    manifest = _read_json(man_path)
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{d}: manifest format is {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{d}: bundle format version {version} is not supported by deepfm {__version__} "
                          f"(which reads version {FORMAT_VERSION}); re-train or use the deepfm version that "
                          f"wrote it ({manifest.get('deepfm_version')})")
    if verify:
        for name, digest in manifest.get("files", {}).items():
            p = d / name
            if not p.exists():
                raise BundleError(f"{d}: missing file {name}; the bundle is incomplete")
            if _sha256(p) != digest:
                raise BundleError(f"{d}: checksum mismatch for {name}; the bundle is corrupt, re-export it")
    model_json = _read_json(d / "model.json")
    pre = Preprocessor.from_dict(_read_json(d / "preprocessor.json"))
    fields = [FieldSpec(**f) for f in model_json["fields"]]
    if fields != layout(pre):
        raise BundleError(f"{d}: model.json fields do not match preprocessor.json")
    model = build_model(fields, ModelConfig.from_dict(model_json["config"]))
    try:
        model.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    except (RuntimeError, OSError) as e:
        raise BundleError(f"{d}: weights do not match the model description: {e}") from None
    model.eval()
    return Bundle(model=model, preprocessor=pre, data_format=manifest.get("data_format"),
                  training=_read_json(d / "training.json"), metrics=_read_json(d / "metrics.json"),
                  manifest=manifest, path=d)
