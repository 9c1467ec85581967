"""The model against the paper's equations, term by term."""

import itertools

import numpy as np
import pyarrow as pa
import torch

from deepfm.data.preprocess import Preprocessor
from deepfm.data.readers import from_arrow
from deepfm.data.store import Batcher, FieldSpec, layout
from deepfm.models.ctr import CTRModel, ModelConfig
from deepfm.models.layers import fm_second_order
from deepfm.schema import Field, Schema

FIELDS = [FieldSpec("a", "cat", 5, 1), FieldSpec("b", "cat", 7, 1), FieldSpec("x", "num", 2, 1),
          FieldSpec("y", "num", 2, 1), FieldSpec("tags", "multi", 6, 3, "mean")]


def _inputs(B=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randint(0, 5, (B,), generator=g), torch.randint(0, 7, (B,), generator=g),
                       torch.randint(0, 2, (B,), generator=g), torch.zeros(B, dtype=torch.long),
                       *[torch.randint(0, 6, (B,), generator=g) for _ in range(3)]], 1)
    val = torch.ones(B, 7)
    val[:, 2] = torch.where(idx[:, 2] == 0, torch.randn(B, generator=g), 1.0)
    val[:, 3] = torch.randn(B, generator=g)
    lens = torch.randint(1, 4, (B,), generator=g)
    w = (torch.arange(3)[None] < lens[:, None]).float() / lens[:, None]
    val[:, 4:] = w
    return idx, val


def _model(name="deepfm", **kw):
    torch.manual_seed(0)
    m = CTRModel(FIELDS, ModelConfig(model=name, embed_dim=4, hidden=[8], dropout=0.0, init_std=0.3, **kw))
    with torch.no_grad():
        if m.w is not None:
            m.w.weight.normal_()
        m.bias.fill_(0.1)
    return m.eval()


def _field_vectors(m, idx, val):
    """Brute force: x_i * v_i per field, with the multi field pooled by hand."""
    offsets = [0, 5, 12, 14, 16]
    V = m.v.weight
    out = []
    for f in range(4):
        out.append(val[:, f, None] * V[offsets[f] + idx[:, f]])
    out.append(sum(val[:, 4 + k, None] * V[offsets[4] + idx[:, 4 + k]] for k in range(3)))
    return out


def test_fm_second_order_equals_pairwise_brute_force_including_numeric_fields():
    m = _model("fm")
    idx, val = _inputs()
    e = m.v(idx, val)
    vecs = _field_vectors(m, idx, val)
    brute = sum((vecs[i] * vecs[j]).sum(-1) for i, j in itertools.combinations(range(5), 2))
    torch.testing.assert_close(fm_second_order(e), brute, rtol=1e-5, atol=1e-6)
    # numeric fields really take part: changing a numeric value changes the interaction term
    val2 = val.clone()
    val2[:, 3] += 1.0
    assert not torch.allclose(fm_second_order(m.v(idx, val2)), fm_second_order(e))


def test_first_order_is_sum_of_value_times_weight():
    m = _model("lr")
    idx, val = _inputs()
    offsets = torch.tensor([0, 5, 12, 14, 16, 16, 16])
    w = m.w.weight[:, 0]
    expected = 0.1 + (w[offsets + idx] * val).sum(1)
    torch.testing.assert_close(m(idx, val), expected)


def test_deepfm_logit_is_bias_plus_first_plus_fm_plus_dnn_with_shared_embeddings():
    m = _model("deepfm")
    idx, val = _inputs()
    e = m.v(idx, val)
    first = (m.w(idx, val)).sum((1, 2))
    expected = m.bias + first + fm_second_order(e) + m.dnn(e.flatten(1))
    torch.testing.assert_close(m(idx, val), expected)
    assert m.dnn.net[0].in_features == 5 * 4  # the DNN reads the same field embeddings
    assert sum(1 for n, _ in m.named_parameters() if n.startswith("v.")) == 1  # one fused table


def test_models_output_shape_and_components():
    idx, val = _inputs(B=9)
    for name in ("lr", "fm", "deepfm", "dnn"):
        assert _model(name)(idx, val).shape == (9,)
    assert _model("lr").v is None and _model("fm").dnn is None


def test_embedding_penalty_uses_only_batch_rows():
    m = _model("deepfm")
    idx, val = _inputs(B=4)
    p = m.embedding_penalty(idx)
    p.backward()
    touched = set((idx + m.v.slot_offsets).flatten().tolist())
    rows_with_grad = set(torch.nonzero(m.v.weight.grad.abs().sum(1)).flatten().tolist())
    assert rows_with_grad == touched


def test_encoded_numeric_field_feeds_value_times_vector_and_missing_vector():
    schema = Schema(fields=(Field("c", "categorical"), Field("x", "numeric")), label="label")
    t = pa.table({"c": ["a", "b", None], "x": [2.0, None, -1.5]})
    data = from_arrow(t, schema)
    pre = Preprocessor(schema).fit(data)
    idx, val, _ = Batcher(pre.transform(data), layout(pre))(slice(0, 3))
    assert idx[:, 1].tolist() == [0, 1, 0] and val[:, 1].tolist() == [2.0, 1.0, -1.5]
    assert idx[2, 0].item() == 1  # missing categorical -> MISSING index
    np.testing.assert_array_equal(val[:, 0].numpy(), [1, 1, 1])
