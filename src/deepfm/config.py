"""Named presets (YAML files: ``model:`` and ``train:`` sections) and ``key=value`` overrides."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from deepfm.errors import DeepFMError


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("deepfm.presets").iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str) -> dict[str, dict[str, Any]]:
    """A packaged preset by name (``paper``, ``bars``, ``default``) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text = path.read_text()
    else:
        res = resources.files("deepfm.presets") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise DeepFMError(f"unknown preset {name_or_path!r}: use one of {', '.join(preset_names())} "
                              "or a path to a .yaml file")
        text = res.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict) or set(data) - {"model", "train"}:
        raise DeepFMError(f"preset {name_or_path!r} must be a mapping with 'model' and/or 'train' sections")
    return {"model": dict(data.get("model") or {}), "train": dict(data.get("train") or {})}


def apply_overrides(cfg: dict[str, dict[str, Any]], overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Apply ``section.key=value`` strings (value parsed as YAML: ``model.hidden=[200,200]``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in ("model", "train") or not name:
            raise DeepFMError(f"bad override {item!r}: expected model.KEY=VALUE or train.KEY=VALUE")
        cfg[section][name] = yaml.safe_load(raw)
    return cfg


# Model names (models/ctr.py builds them; kept here so the CLI can list them without importing torch)
MODEL_NAMES = ("lr", "fm", "deepfm", "dnn", "wdl", "fnn", "ipnn", "opnn", "pnnstar", "fmdnn")
