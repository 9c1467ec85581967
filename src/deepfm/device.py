"""Where the model runs: ``--device {auto,cpu,cuda,cuda:N}`` / ``train.device`` / ``DeepFMClassifier(device=)``.

One place resolves a device name (``resolve_device``), and moves a batch there (``to_device``):

- ``auto``: CUDA when ``torch.cuda.is_available()``, else the CPU;
- ``cpu``: the CPU, with the fused C kernels (deepfm.accel) — exactly what ran before there was a device option;
- ``cuda`` / ``cuda:N``: a CUDA GPU (under torchrun, ``cuda`` and ``auto`` mean this rank's GPU,
  ``cuda:$LOCAL_RANK``); a clear error when this machine or this torch build has no CUDA.

The device is a runtime option (``config.RUNTIME_KEYS``): it changes where a run computes, not what it
computes, so it is not part of cache keys, compare/tune run keys or a checkpoint's fingerprint, and bundles
hold CPU tensors whatever the device was (``serve.bundle``).
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

from deepfm.errors import DeepFMError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(spec: Any) -> str | None:
    """None when ``spec`` is a device name this library accepts, else what it must be (config checks)."""
    return None if isinstance(spec, str) and _PATTERN.match(spec) else f"one of {DEVICE_HELP}"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` that ``spec`` names (None: ``auto``). Raises DeepFMError for a name that is not
    one of auto/cpu/cuda/cuda:N, or for CUDA where torch sees none."""
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else spec
    if check_device_name(spec) is not None:
        raise DeepFMError(f"unknown device {spec!r}: use {DEVICE_HELP}")
    if spec == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if spec == "auto" and not available:
        return torch.device("cpu")
    if not available:
        why = ("this torch build has no CUDA support (torch " + torch.__version__ + ")"
               if torch.version.cuda is None else "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
        raise DeepFMError(f"device {spec!r} asked for, but CUDA is not available: {why}; use --device cpu "
                          "(or auto)")
    if spec in ("auto", "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    index = int(spec.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise DeepFMError(f"device {spec!r} asked for, but this machine has {count} CUDA device(s) "
                          f"(cuda:0 .. cuda:{count - 1})")
    return torch.device("cuda", index)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any)."""
    import torch

    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def is_cuda(device: torch.device | str) -> bool:
    return (device if isinstance(device, str) else device.type).startswith("cuda")


def pin(tensors: tuple) -> tuple:
    """The tensors of a batch (None kept) in pinned (page-locked) host memory, the one host buffer per batch
    that an asynchronous copy to a GPU reads from; a loader thread calls it, off the training thread."""
    return tuple(t if t is None or t.is_pinned() else t.pin_memory() for t in tensors)


def to_device(tensors: tuple, device: torch.device) -> tuple:
    """The tensors of a batch (None kept) on ``device``; on the CPU, the very same objects (no copy).
    Towards CUDA each is copied from pinned host memory (``pin``) with ``non_blocking=True``, so the copy
    runs asynchronously, queued behind the work already on the GPU."""
    if device.type == "cpu":
        return tensors
    return tuple(t if t is None else t.to(device, non_blocking=True) for t in pin(tensors))
