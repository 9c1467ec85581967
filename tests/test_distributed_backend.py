"""torchrun on a machine with CUDA must still use gloo: training tensors live on the CPU."""
from __future__ import annotations

import torch

from deepfm.train import distributed


def test_backend_is_gloo_even_when_cuda_is_available(monkeypatch) -> None:
    seen: dict = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kw: seen.setdefault("backend", backend))
    assert distributed.init_from_env() is True
    assert seen["backend"] == "gloo"


def test_alone_joins_no_group(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda *a, **kw: (_ for _ in ()).throw(AssertionError("must not join")))
    assert distributed.init_from_env() is False
