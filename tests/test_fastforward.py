"""The numpy small-batch forward equals the torch model's eval forward."""

import numpy as np
import pytest
import torch

from deepfm.data.store import FieldSpec
from deepfm.models.ctr import CTRModel, ModelConfig
from deepfm.serve.fastpath import NumpyForward

FIELDS = [FieldSpec("a", "cat", 50, 1), FieldSpec("b", "cat", 70, 1), FieldSpec("x", "num", 2, 1),
          FieldSpec("tags", "multi", 30, 3, "mean"), FieldSpec("y", "num", 2, 1)]


def _inputs(B):
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randint(0, 50, (B,), generator=g), torch.randint(0, 70, (B,), generator=g),
                       torch.zeros(B, dtype=torch.long), *[torch.randint(0, 30, (B,), generator=g)
                                                           for _ in range(3)],
                       torch.randint(0, 2, (B,), generator=g)], 1)
    val = torch.rand(B, 7, generator=g)
    return idx, val


@pytest.mark.parametrize("kw", [
    {"model": "deepfm"}, {"model": "deepfm", "batch_norm": True}, {"model": "lr"}, {"model": "fm"},
    {"model": "dnn", "activation": "tanh"}, {"model": "deepfm", "activation": "prelu", "batch_norm": True},
    {"model": "deepfm", "activation": "sigmoid"}])
@pytest.mark.parametrize("B", [1, 33])
def test_numpy_forward_matches_torch(kw, B):
    torch.manual_seed(0)
    m = CTRModel(FIELDS, ModelConfig(embed_dim=4, hidden=[16, 8], dropout=0.3, init_std=0.3, **kw))
    with torch.no_grad():  # non-trivial first order and batch-norm statistics
        if m.w is not None:
            m.w.weight.normal_()
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2)
                mod.weight.normal_()
                mod.bias.normal_()
    m.eval()
    idx, val = _inputs(B)
    with torch.no_grad():
        ref = m(idx, val).numpy()
    got = NumpyForward(m)(idx.numpy(), val.numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_unsupported_activation_raises():
    m = CTRModel(FIELDS, ModelConfig(embed_dim=4, hidden=[8], activation="gelu"))
    with pytest.raises(ValueError, match="GELU"):
        NumpyForward(m)
