"""The DeepFM paper's baselines (Table 2): each model's equations by hand, training, serving and export."""

import itertools

import numpy as np
import pyarrow as pa
import pytest
import torch

from deepfm.data import readers
from deepfm.data.preprocess import Preprocessor
from deepfm.data.store import Batcher, layout
from deepfm.errors import BundleError
from deepfm.models import build_model
from deepfm.models.baselines import FMDNN, FNN, init_from_fm
from deepfm.models.ctr import MODEL_NAMES, CTRModel, ModelConfig
from deepfm.models.layers import fm_second_order
from deepfm.schema import Field, Schema
from deepfm.serve.bundle import Bundle
from deepfm.serve.fastpath import NUMPY_KINDS, NumpyForward
from deepfm.serve.predictor import Predictor
from deepfm.train.trainer import TrainConfig, fit
from tests.test_model import FIELDS, _inputs  # F = 5 fields, S = 7 slots

ALL = ("lr", "fm", "dnn", "deepfm", "wdl", "fnn", "ipnn", "opnn", "pnnstar", "fmdnn")
OFFSETS = [0, 5, 12, 14, 16]  # first row of each field in the fused tables
SLOT_FIELD = [0, 1, 2, 3, 4, 4, 4]
F, K = 5, 4


def _model(name, **kw):
    torch.manual_seed(0)
    cfg = {"model": name, "embed_dim": K, "hidden": [8], "dropout": 0.0, "init_std": 0.3, **kw}
    m = build_model(FIELDS, ModelConfig(**cfg))
    with torch.no_grad():
        if m.w is not None:
            m.w.weight.normal_()
        m.bias.fill_(0.1)
    return m.eval()


def _by_hand(table, idx, val):
    """[B, F, dim]: x_i * row_i per field from the raw table, the multi field's slots summed by a loop."""
    B = idx.shape[0]
    out = torch.zeros(B, F, table.shape[1])
    for s, f in enumerate(SLOT_FIELD):
        out[:, f] += val[:, s, None] * table[OFFSETS[f] + idx[:, s]]
    return out


def _inner_by_loops(e):
    """[B, F(F-1)/2]: sum_k e_ik e_jk for i < j, written as loops."""
    return torch.tensor([[sum(e[b, i, k] * e[b, j, k] for k in range(K)).item()
                          for i, j in itertools.combinations(range(F), 2)] for b in range(e.shape[0])])


def _mlp_by_hand(m, z):
    """The one-hidden-layer MLP written out: W2 act(W1 z + b1) + b2."""
    (l1, act, l2) = list(m.dnn.net)
    h = act(z @ l1.weight.T + l1.bias)
    return (h @ l2.weight.T + l2.bias)[:, 0]


# ------------------------------------------------------------------ every model: contract and gradients
@pytest.mark.parametrize("name", ALL)
def test_forward_shape_finite_gradients_and_pooling(name):
    assert set(ALL) == set(MODEL_NAMES)
    m = _model(name).train()
    assert isinstance(m, CTRModel) and ModelConfig.from_dict(m.cfg.to_dict()) == m.cfg
    idx, val = _inputs(B=12)
    out = m(idx, val)
    assert out.shape == (12,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.nn.functional.binary_cross_entropy_with_logits(out, (torch.arange(12) % 2).float()).backward()
    assert m.tables(), name
    for tname, table in m.tables().items():  # gradients reach exactly the rows the batch uses
        touched = set((idx + table.slot_offsets).flatten().tolist())
        with_grad = set(torch.nonzero(table.weight.grad.abs().sum(1)).flatten().tolist())
        assert with_grad and with_grad <= touched, (name, tname)
    if m.dnn is not None:
        for layer in m.dnn.net:
            if isinstance(layer, torch.nn.Linear):
                assert layer.weight.grad.abs().sum() > 0, name
    # multi-valued slots are pooled into their field before any product: their order does not matter
    m.eval()
    perm = [0, 1, 2, 3, 6, 4, 5]
    with torch.no_grad():
        torch.testing.assert_close(m(idx[:, perm], val[:, perm]), m(idx, val))


def test_config_names_defaults_and_errors():
    assert ModelConfig(model="ipnn").activation == "tanh"  # DeepFM paper Sec. 3.1: tanh for IPNN
    assert ModelConfig.from_dict({"model": "ipnn"}).activation == "tanh"
    assert ModelConfig(model="ipnn", activation="relu").activation == "relu"  # an explicit value wins
    assert ModelConfig.from_dict({"model": "ipnn", "activation": "relu"}).activation == "relu"
    for name in ("deepfm", "opnn", "pnnstar", "fnn", "wdl", "fmdnn"):
        assert ModelConfig(model=name).activation == "relu"
    acts = {type(layer).__name__ for layer in _model("ipnn").dnn.net}
    assert "Tanh" in acts and "ReLU" not in acts
    assert "ReLU" in {type(layer).__name__ for layer in _model("opnn").dnn.net}
    with pytest.raises(ValueError, match="pnnstar"):
        ModelConfig.from_dict({"model": "pnn"})
    with pytest.raises(ValueError, match="build_model"):
        CTRModel(FIELDS, ModelConfig(model="ipnn"))


# ------------------------------------------------------------------ each model's equations
def test_ipnn_product_layer_is_z_and_pairwise_inner_products():
    m = _model("ipnn")
    idx, val = _inputs(B=3)
    e = _by_hand(m.v.weight, idx, val)
    torch.testing.assert_close(m.v(idx, val), e)
    with torch.no_grad():
        p = m.product_layer(e)
        torch.testing.assert_close(p, torch.cat([e.flatten(1), _inner_by_loops(e)], 1))
        assert m.dnn.net[0].in_features == F * K + F * (F - 1) // 2
        torch.testing.assert_close(m(idx, val), 0.1 + _mlp_by_hand(m, p))


@pytest.mark.parametrize("name", ["opnn", "pnnstar"])
def test_opnn_product_layer_is_z_and_sum_of_outer_products(name):
    m = _model(name)
    idx, val = _inputs(B=3)
    e = _by_hand(m.v.weight, idx, val)
    outer = torch.zeros(3, K, K)
    for b, i, j in itertools.product(range(3), range(F), range(F)):
        outer[b] += torch.outer(e[b, i], e[b, j])
    parts = [e.flatten(1), *([_inner_by_loops(e)] if name == "pnnstar" else []), outer.flatten(1)]
    with torch.no_grad():
        p = m.product_layer(e)
        torch.testing.assert_close(p, torch.cat(parts, 1))
        assert m.dnn.net[0].in_features == p.shape[1]
        torch.testing.assert_close(m(idx, val), 0.1 + _mlp_by_hand(m, p))


def test_wdl_logit_is_bias_plus_first_order_plus_dnn_by_hand():
    m = _model("wdl")
    idx, val = _inputs()
    w = m.w.weight[:, 0]
    first = sum(w[OFFSETS[f] + idx[:, s]] * val[:, s] for s, f in enumerate(SLOT_FIELD))
    with torch.no_grad():
        deep = _mlp_by_hand(m, _by_hand(m.v.weight, idx, val).flatten(1))
        torch.testing.assert_close(m(idx, val), 0.1 + first + deep)
    assert not m.use_fm and m.dnn.net[0].in_features == F * K


def test_fmdnn_has_separate_fm_and_dnn_tables():
    m = _model("fmdnn")
    assert isinstance(m, FMDNN) and list(m.tables()) == ["w", "v", "v_dnn"]
    assert m.v.weight.data_ptr() != m.v_dnn.weight.data_ptr()
    idx, val = _inputs()

    def parts():
        fm = m.bias + m.w(idx, val).sum((1, 2)) + fm_second_order(_by_hand(m.v.weight, idx, val))
        return fm, _mlp_by_hand(m, _by_hand(m.v_dnn.weight, idx, val).flatten(1))

    with torch.no_grad():
        fm0, deep0 = parts()
        torch.testing.assert_close(m(idx, val), fm0 + deep0)
        m.v_dnn.weight.add_(torch.randn_like(m.v_dnn.weight))  # the DNN's table moves, the FM term does not
        fm1, deep1 = parts()
        torch.testing.assert_close(fm1, fm0)
        assert not torch.allclose(deep1, deep0)
        torch.testing.assert_close(m(idx, val), fm1 + deep1)
        m.v.weight.mul_(2.0)  # and the FM's table moves the FM term only
        fm2, deep2 = parts()
        torch.testing.assert_close(deep2, deep1)
        assert not torch.allclose(fm2, fm1)
    m.embedding_penalty(idx).backward()  # the penalty covers the DNN's table too
    assert m.v_dnn.weight.grad is not None and m.v_dnn.weight.grad.abs().sum() > 0


def test_fnn_reads_first_order_and_embeddings_and_init_from_fm_copies_them():
    fm = _model("fm")
    with torch.no_grad():
        fm.bias.fill_(-0.7)
    fnn = _model("fnn")
    assert isinstance(fnn, FNN) and fnn.dnn.net[0].in_features == F * (K + 1)
    assert init_from_fm(fnn, fm) is fnn
    assert torch.equal(fnn.v.weight, fm.v.weight) and torch.equal(fnn.w.weight, fm.w.weight)
    assert fnn.bias.item() == pytest.approx(-0.7)
    assert fnn.v.weight.data_ptr() != fm.v.weight.data_ptr()  # copied, not shared
    idx, val = _inputs()
    z = torch.cat([_by_hand(fnn.w.weight, idx, val), _by_hand(fnn.v.weight, idx, val)], 2)  # (w_i, v_i) x_i
    with torch.no_grad():
        torch.testing.assert_close(fnn(idx, val), -0.7 + _mlp_by_hand(fnn, z.flatten(1)))
    with pytest.raises(ValueError, match="FM term"):
        init_from_fm(fnn, _model("dnn"))
    with pytest.raises(ValueError, match="differ"):
        init_from_fm(fnn, build_model(FIELDS, ModelConfig(model="fm", embed_dim=K + 1)))
    with pytest.raises(TypeError):
        init_from_fm(_model("dnn"), fm)


# ------------------------------------------------------------------ training, serving, export
SCHEMA = Schema(fields=(Field("c1", "categorical"), Field("c2", "categorical"),
                        Field("n", "numeric", transform="standardize"),
                        Field("tags", "multi", sep="|", max_len=3, pooling="mean")), label="click")


def _table(n, seed=0):
    rng = np.random.default_rng(seed)
    c1, c2 = rng.integers(0, 20, n), rng.integers(0, 8, n)
    num = rng.normal(0, 1, n)
    tags = [rng.choice(list("abcdef"), rng.integers(1, 4), replace=False) for _ in range(n)]
    logit = np.where(c1 % 2 == 0, 1.5, -1.5) + 0.8 * num + np.array([1.0 if "a" in t else -0.5 for t in tags])
    logit += np.where((c2 % 2) == (c1 % 3 == 0), 1.0, -1.0)  # an interaction
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return pa.table({"c1": [f"u{k}" for k in c1], "c2": [f"i{k}" for k in c2], "n": num,
                     "tags": ["|".join(t) for t in tags], "click": click})


@pytest.fixture(scope="module")
def data():
    table = _table(2000)
    read = readers.from_arrow(table.drop(["click"]), SCHEMA, table["click"].to_numpy())
    pre = Preprocessor(SCHEMA).fit(read)
    enc = pre.transform(read)
    return table, pre, enc, layout(pre)


def _loss(model, batcher):
    idx, val, y = batcher(slice(0, batcher.rows))
    model.eval()
    with torch.no_grad():
        return torch.nn.functional.binary_cross_entropy_with_logits(model(idx, val), y).item()


@pytest.mark.parametrize("name, update", [(n, "dense") for n in ALL] + [("fmdnn", "sparse"), ("ipnn", "sparse")])
def test_fit_reduces_the_training_loss(data, name, update):
    _, _, enc, fields = data
    torch.manual_seed(0)
    model = build_model(fields, ModelConfig(model=name, embed_dim=4, hidden=[16, 16], dropout=0.1, init_std=0.01,
                                            embedding_l2=1e-4))
    batcher = Batcher(enc, fields)
    before = _loss(model, batcher)
    cfg = TrainConfig(epochs=2, batch_size=128, lr=0.01, threads=1, prefetch=False, embedding_update=update)
    hist = fit(model, batcher, cfg, progress=False)
    assert len(hist) == 2 and np.isfinite(hist[-1]["train_logloss"])
    assert _loss(model, batcher) < before - 0.03, name


def _randomised(model):
    """Non-trivial weights (the defaults are ~0 first order and 1e-4 embeddings)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for table in model.tables().values():
            table.weight.normal_(0, 0.3)
        model.bias.fill_(-0.4)
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0, 2 / mod.in_features ** 0.5)
                mod.bias.normal_(0, 0.1)
    return model.eval()


def _kind_model(fields, name, **kw):
    torch.manual_seed(0)
    cfg = {"model": name, "embed_dim": 4, "hidden": [16, 8], "dropout": 0.3, **kw}
    return _randomised(build_model(fields, ModelConfig(**cfg)))


@pytest.mark.parametrize("name", ALL)
def test_predictor_serves_every_kind(data, name):
    table, pre, enc, fields = data
    model = _kind_model(fields, name)
    p = Predictor(Bundle(model, pre, None, {}, {}, {}), threads=1)
    assert (p.small is not None) == (name in NUMPY_KINDS)  # the numpy path only for the kinds it implements
    if name not in NUMPY_KINDS:
        with pytest.raises(ValueError, match="model kind"):
            NumpyForward(model)
    idx, val, _ = Batcher(enc, fields)(slice(0, 400))
    with torch.no_grad():
        ref = torch.sigmoid(model(idx, val).double()).numpy()
    small = p.predict_records(table.slice(0, 40).drop(["click"]).to_pylist())  # <= SMALL_BATCH rows
    np.testing.assert_allclose(small, ref[:40], rtol=0, atol=1e-6)
    big = p.predict_table(table.slice(0, 400))  # the torch path
    np.testing.assert_allclose(big, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_onnx_export_matches_torch_for_every_kind(tmp_path, name):
    pytest.importorskip("onnxruntime")
    from deepfm.serve.export import check_export, export_onnx

    model = _kind_model(FIELDS, name, batch_norm=True)
    path = export_onnx(model, tmp_path / "m.onnx")
    assert check_export(model, path, "onnx", rows=2000) <= 1e-5


def test_torchscript_and_onnx_engine_for_baselines_and_refusal_of_unknown_kinds(tmp_path, data):
    pytest.importorskip("onnxruntime")
    from deepfm.serve.export import check_export, export_onnx, export_torchscript

    model = _kind_model(FIELDS, "fmdnn")
    assert check_export(model, export_torchscript(model, tmp_path / "m.pt"), "torchscript", rows=500) <= 1e-5
    table, pre, _, fields = data
    pnn = _kind_model(fields, "pnnstar")
    got = Predictor(Bundle(pnn, pre, None, {}, {}, {}), threads=1, engine="onnxruntime").predict_table(table)
    ref = Predictor(Bundle(pnn, pre, None, {}, {}, {}), threads=1).predict_table(table)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    odd = _kind_model(FIELDS, "deepfm")
    odd.cfg.model = "mystery"
    with pytest.raises(BundleError, match="mystery"):
        export_onnx(odd, tmp_path / "odd.onnx")
    assert not (tmp_path / "odd.onnx").exists()


def test_cli_model_names_match_the_models():
    from deepfm.config import MODEL_NAMES
    from deepfm.models.baselines import BASELINE_CLASSES
    from deepfm.models.ctr import BASELINES, MODELS

    assert MODEL_NAMES == (*MODELS, *BASELINES) and set(BASELINES) == set(BASELINE_CLASSES)
