"""CPU acceleration, applied explicitly: ``accelerate(model)`` swaps the fused versions of a model's blocks in.

The models (deepfm.models) are plain PyTorch, written to be checked against the paper. What runs fast on CPU
lives here, as subclasses of those blocks that compute the same thing:

=================  ====================  ===========================================================
block (models/)    accelerated (accel/)  what changes
=================  ====================  ===========================================================
``CTRModel``       ``FusedCTRModel``     embeddings, first order, FM and the embedding L2 penalty in one
                                         C pass over the batch, forward and backward (embedding.py)
``FusedTable``     ``FastTable``         the row gather's backward as one flat ``index_add_``
``MLP``            ``FusedMLP``          Linear+ReLU+dropout (and +BatchNorm) as a GEMM and one C pass
                                         each way when training; a 16-aligned input gradient (mlp.py)
=================  ====================  ===========================================================

The C file (kernels.c) is compiled on first use (kernels.py); without a compiler, off CPU float32 (or
bf16 activations under bf16 autocast, which the MLP kernels keep in bf16), under another autocast, or while
torch traces or exports, each falls back to its plain block. The swap changes each
module's class in place, as ``torch.nn.utils.parametrize`` does: the same parameters, buffers and
``state_dict`` keys, so bundles, checkpoints and optimisers are unaffected, and ``isinstance`` holds.

>>> from deepfm.layout import FieldSpec
>>> from deepfm.models import CTRModel, ModelConfig
>>> model = accelerate(CTRModel([FieldSpec("a", "cat", 10, 1)], ModelConfig(hidden=[8])))
>>> type(model).__name__, type(model.v).__name__, type(model.dnn).__name__, list(model.state_dict())[:2]
('FusedCTRModel', 'FastTable', 'FusedMLP', ['bias', 'w.weight'])
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from deepfm.accel import kernels
from deepfm.accel.embedding import FastTable, FusedCTRModel
from deepfm.accel.mlp import FusedMLP
from deepfm.models.ctr import CTRModel
from deepfm.models.layers import MLP, FusedTable

__all__ = ["accelerate", "plain", "kernels", "FusedCTRModel", "FastTable", "FusedMLP"]

# exact class -> its fused subclass (a subclass of CTRModel, e.g. a baseline, keeps its own forward)
FUSED: dict[type[nn.Module], type[nn.Module]] = {CTRModel: FusedCTRModel, FusedTable: FastTable, MLP: FusedMLP}
PLAIN: dict[type[nn.Module], type[nn.Module]] = {fused: base for base, fused in FUSED.items()}

M = TypeVar("M", bound=nn.Module)


def accelerate(module: M) -> M:
    """Swap the fused versions of ``module``'s blocks (itself included) in, in place; returns ``module``.
    Idempotent."""
    for m in module.modules():
        fused = FUSED.get(type(m))
        if fused is not None:
            m.__class__ = fused
    return module


def plain(module: M) -> M:
    """Undo ``accelerate``: the plain blocks back in, in place (for a GPU, where the C kernels do not run);
    returns ``module``. Idempotent."""
    for m in module.modules():
        base = PLAIN.get(type(m))
        if base is not None:
            m.__class__ = base
    return module
