"""The ONNX (and TorchScript) export equals the torch model's eval forward, and OnnxForward runs it."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from deepfm.data.store import FieldSpec  # noqa: E402
from deepfm.errors import BundleError  # noqa: E402
from deepfm.models.ctr import CTRModel, ModelConfig  # noqa: E402
from deepfm.schema import MISSING, OOV  # noqa: E402
from deepfm.serve.export import OnnxForward, export_onnx, export_torchscript  # noqa: E402

# categorical, numeric, a mean-pooled and a sum-pooled multi-valued field (slots: 1+1+1+4+1+3 = 11)
FIELDS = [FieldSpec("a", "cat", 50, 1), FieldSpec("b", "cat", 70, 1), FieldSpec("x", "num", 2, 1),
          FieldSpec("tags", "multi", 30, 4, "mean"), FieldSpec("y", "num", 2, 1),
          FieldSpec("kw", "multi", 20, 3, "sum")]
SLOTS = sum(f.slots for f in FIELDS)


def _inputs(B: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random rows with OOV (0) and missing (1) indices, missing numerics, zero values and multi padding."""
    rng = np.random.default_rng(seed)
    idx_parts, val_parts = [], []
    for f in FIELDS:
        if f.kind == "cat":
            idx_parts.append(rng.integers(0, f.size, (B, 1)))
            val_parts.append(np.ones((B, 1)))
        elif f.kind == "num":
            missing = rng.random((B, 1)) < 0.2
            v = np.where(rng.random((B, 1)) < 0.2, 0.0, rng.normal(0, 2, (B, 1)))
            idx_parts.append(missing.astype(np.int64))
            val_parts.append(np.where(missing, 1.0, v))
        else:
            length = rng.integers(0, f.slots + 1, B)
            live = np.arange(f.slots)[None, :] < length[:, None]
            idx_parts.append(np.where(live, rng.integers(0, f.size, (B, f.slots)), MISSING))
            w = live / np.maximum(length, 1)[:, None] if f.pooling == "mean" else live
            val_parts.append(w)
    idx = np.concatenate(idx_parts, 1).astype(np.int64)
    idx[:5] = OOV  # a few all-OOV rows
    return idx, np.concatenate(val_parts, 1).astype(np.float32)


def _model(seed: int = 0, **kw) -> CTRModel:
    torch.manual_seed(seed)
    m = CTRModel(FIELDS, ModelConfig(**{"embed_dim": 6, "hidden": [32, 16], "dropout": 0.3, **kw}))
    with torch.no_grad():  # non-trivial weights: the defaults are ~0 (first order) and 1e-4 (embeddings)
        for table in (m.w, m.v):
            if table is not None:
                table.weight.normal_(0, 0.1)
        m.bias.fill_(-1.2)
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):  # the default init makes the DNN's output nearly constant
                mod.weight.normal_(0, 2 / mod.in_features ** 0.5)
                mod.bias.normal_(0, 0.1)
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    return m.eval()


def _torch_logits(m: CTRModel, idx: np.ndarray, val: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(torch.from_numpy(idx), torch.from_numpy(val)).numpy()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


@pytest.mark.parametrize("kw, rows", [
    ({"model": "deepfm", "batch_norm": True}, 10_000), ({"model": "lr"}, 2000), ({"model": "fm"}, 2000),
    ({"model": "dnn"}, 2000), ({"model": "deepfm", "activation": "tanh"}, 2000)])
def test_onnx_matches_torch(tmp_path, kw, rows):
    m = _model(**kw)
    path = export_onnx(m, tmp_path / "model.onnx")
    assert path == tmp_path / "model.onnx" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    idx, val = _inputs(rows)
    ref = _torch_logits(m, idx, val)
    engine = OnnxForward(path, threads=1)
    got = engine(idx, val)
    assert got.dtype == np.float32 and got.shape == (rows,)
    assert np.abs(_sigmoid(got) - _sigmoid(ref)).max() <= 1e-5
    logit, prob = engine.session.run(["logit", "probability"], {"idx": idx, "val": val})
    assert np.array_equal(logit, got)
    assert np.abs(prob - _sigmoid(ref)).max() <= 1e-5
    assert ref.std() > 0.1  # the weights are not trivial: rows do differ


def test_onnx_batch_of_one_and_metadata(tmp_path):
    onnx = pytest.importorskip("onnx")
    m = _model(batch_norm=True)
    path = export_onnx(m, tmp_path / "sub" / "m.onnx")
    engine = OnnxForward(path)
    idx, val = _inputs(3, seed=7)
    for i in range(3):
        got = engine(idx[i:i + 1], val[i:i + 1])
        assert got.shape == (1,)
        assert abs(_sigmoid(got)[0] - _sigmoid(_torch_logits(m, idx[i:i + 1], val[i:i + 1]))[0]) <= 1e-5
    assert engine.slots == SLOTS
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert meta["producer"] == "deepfm" and meta["slots"] == str(SLOTS) and meta["inputs"] == "idx,val"


def test_export_restores_training_state_and_overwrites(tmp_path):
    m = _model(batch_norm=True).train()
    m.dnn.net[1].eval()  # a mixed state survives too
    before = [mod.training for mod in m.modules()]
    state = {k: v.clone() for k, v in m.state_dict().items()}
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    export_onnx(m, path)
    assert [mod.training for mod in m.modules()] == before
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())  # BN statistics not updated
    assert path.stat().st_size > 1000 and len(list(tmp_path.iterdir())) == 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load is deprecated in torch 2.13
def test_torchscript_matches_torch(tmp_path):
    m = _model(batch_norm=True)
    path = export_torchscript(m, tmp_path / "model.pt")
    ts = torch.jit.load(str(path))
    idx, val = _inputs(2000, seed=3)
    ref = _torch_logits(m, idx, val)
    for rows in (slice(None), slice(0, 1)):
        with torch.no_grad():
            logit, prob = ts(torch.from_numpy(idx[rows]), torch.from_numpy(val[rows]))
        assert np.abs(_sigmoid(logit.numpy()) - _sigmoid(ref[rows])).max() <= 1e-5
        assert np.abs(prob.numpy() - _sigmoid(ref[rows])).max() <= 1e-5


def test_onnx_forward_missing_or_invalid_file(tmp_path):
    with pytest.raises(BundleError, match="no such ONNX model file"):
        OnnxForward(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(BundleError, match="not a loadable ONNX model"):
        OnnxForward(bad)
