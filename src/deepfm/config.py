"""Named presets (YAML files: ``model:`` and ``train:`` sections) and ``key=value`` overrides."""

from __future__ import annotations

import contextlib
import math
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from deepfm.errors import DeepFMError

# Model names (models/ builds them; defined here so the CLI can list them without importing torch)
MODEL_NAMES = ("lr", "fm", "deepfm", "dnn", "wdl", "fnn", "ipnn", "opnn", "pnnstar", "fmdnn")
# Input formats (data/readers.py reads them; here so the CLI can list them without importing pyarrow)
FORMATS = ("criteo", "avazu", "libfm", "movielens", "csv", "tsv", "parquet")
# Training options that change how fast a run goes, not what it computes: left out of compare's and tune's
# run keys, and free to change when a run resumes from a checkpoint (as are the epochs)
RUNTIME_KEYS = ("threads", "prefetch", "checkpoint_every", "keep_checkpoints", "eval_batch_size", "device")


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("deepfm.presets").iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str) -> dict[str, dict[str, Any]]:
    """A packaged preset by name (``paper``, ``bars``, ``default``) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise DeepFMError(f"preset file {path} not found (or not a regular file); packaged presets: "
                              f"{', '.join(preset_names())}")
        if path.stat().st_size > MAX_PRESET_BYTES:
            raise DeepFMError(f"preset file {path} is larger than {MAX_PRESET_BYTES // 1024} KB")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DeepFMError(f"preset file {path}: unreadable ({e})") from None
    else:
        res = resources.files("deepfm.presets") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise DeepFMError(f"unknown preset {name_or_path!r}: use one of {', '.join(preset_names())} "
                              "or a path to a .yaml file")
        text = res.read_text()
    data = _yaml(text, f"preset {name_or_path}") or {}
    if not isinstance(data, dict) or set(data) - {"model", "train"}:
        raise DeepFMError(f"preset {name_or_path!r} must be a mapping with 'model' and/or 'train' sections")
    for section in ("model", "train"):
        if not isinstance(data.get(section) or {}, dict):
            raise DeepFMError(f"preset {name_or_path!r}: '{section}' must be a mapping of options, got "
                              f"{short(data[section])}")
    return {"model": dict(data.get("model") or {}), "train": dict(data.get("train") or {})}


def apply_overrides(cfg: dict[str, dict[str, Any]], overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Apply ``section.key=value`` strings (value parsed as YAML: ``model.hidden=[200,200]``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in ("model", "train") or not name:
            raise DeepFMError(f"bad override {item!r}: expected model.KEY=VALUE or train.KEY=VALUE")
        cfg[section][name] = _yaml(raw, f"--set {short(item)}")
    return cfg


MAX_PRESET_BYTES = 1 << 20


def short(value: Any, limit: int = 200) -> str:
    """``repr`` cut to ``limit`` characters: a message never carries a whole (possibly huge) value."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _yaml(text: str, what: str) -> Any:
    """Safe YAML without aliases (an alias can expand a few bytes into gigabytes: "billion laughs")."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise DeepFMError(f"{what}: YAML aliases (*name) are not allowed")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise DeepFMError(f"{what}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None


# The type and range of every option of the two sections, checked before a config is built, so that a bad
# value from a preset, --set or the API is one clear message instead of a failure deep inside training.
def _int(lo: int | None = None) -> Any:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return "an integer"
        return f"an integer >= {lo}" if lo is not None and v < lo else None
    return check


def _float(lo: float = 0.0, lo_open: bool = False, hi: float | None = None, hi_open: bool = False) -> Any:
    want = (f"a finite number {'>' if lo_open else '>='} {lo:g}"
            + (f" and {'<' if hi_open else '<='} {hi:g}" if hi is not None else ""))

    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return want
        if v < lo or (lo_open and v == lo) or (hi is not None and (v > hi or (hi_open and v == hi))):
            return want
        return None
    return check


def _choice(*allowed: Any) -> Any:
    def check(v: Any) -> str | None:
        ok = any(v is a if isinstance(a, bool) or a is None else (type(v) is type(a) and v == a) for a in allowed)
        return None if ok else "one of " + ", ".join(repr(a) for a in allowed)
    return check


def _hidden(v: Any) -> str | None:
    if not isinstance(v, list) or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in v):
        return "a list of positive integers (layer widths), e.g. [400, 400, 400]"
    return None


def _batch_size(v: Any) -> str | None:
    return None if v == "auto" or _int(1)(v) is None else "a positive integer or 'auto'"


def _column(v: Any) -> str | None:
    return None if v is None or (isinstance(v, str) and v) else "a column name or null"


def _device(v: Any) -> str | None:
    from deepfm.device import check_device_name  # no torch import: the CLI lists options without it

    return check_device_name(v)


def _activation(v: Any) -> str | None:
    return None if v is None or (isinstance(v, str) and v) else "an activation name (relu, tanh, sigmoid) or null"


OPTION_CHECKS: dict[str, dict[str, Any]] = {
    "model": {"model": _choice(*MODEL_NAMES), "embed_dim": _int(1), "hidden": _hidden,
              "dropout": _float(0.0, hi=1.0, hi_open=True), "batch_norm": _choice(True, False, "auto"),
              "activation": _activation, "embedding_l2": _float(), "net_l2": _float(), "init_std": _float()},
    "train": {"epochs": _int(1), "batch_size": _batch_size, "lr": _float(0.0, lo_open=True), "patience": _int(1),
              "monitor": _choice("auc", "auc-logloss"), "reduce_lr_on_plateau": _choice(True, False),
              "seed": _int(0), "threads": _int(0), "eval_batch_size": _int(1),
              "embedding_update": _choice("dense", "sparse", "auto"), "precision": _choice("fp32", "bf16", "auto"),
              "prefetch": _choice(True, False, "auto"), "checkpoint_every": _int(0), "keep_checkpoints": _int(1),
              "evals_per_epoch": _batch_size,  # also a positive integer or 'auto'
              "negative_rate": _float(0.0, lo_open=True, hi=1.0), "calibrate": _choice("none", "platt", "isotonic"),
              "wide_lr_scale": _float(0.0, lo_open=True), "wide_start": _choice(True, False, "auto"),
              "weight_column": _column, "device": _device},

}
# YAML 1.1 reads 1e-3 (no dot) as a string: such numbers are taken as floats where a float is expected
_FLOATS = {("model", "dropout"), ("model", "embedding_l2"), ("model", "net_l2"), ("model", "init_std"),
           ("train", "lr"), ("train", "negative_rate")}


def check_options(section: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` of ``section`` ("model" or "train") with float-like strings converted; raises
    ValueError naming the first option whose type or range is wrong (unknown names are left to the
    config classes, which list the allowed ones)."""
    out = dict(options)
    for name, value in options.items():
        check = OPTION_CHECKS[section].get(name)
        if check is None:
            continue
        if (section, name) in _FLOATS and isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = out[name] = float(value)
        want = check(value)
        if want is not None:
            raise ValueError(f"{section}.{name} must be {want}, got {short(value)}")
    return out
