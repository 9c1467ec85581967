"""torchrun picks its backend from the training device: gloo for CPU tensors even with CUDA present, nccl on CUDA."""
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


def test_backend_follows_the_training_device(monkeypatch) -> None:
    """nccl only when the model trains on a CUDA device (one process per GPU), gloo for CPU training."""
    seen: dict = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("gpu", d))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend))
    monkeypatch.setattr(distributed, "_device", torch.device("cpu"))
    distributed.init_from_env(torch.device("cpu"))
    assert seen == {"backend": "gloo"}
    distributed.init_from_env(torch.device("cuda", 1))
    assert seen == {"backend": "nccl", "gpu": torch.device("cuda", 1)}
