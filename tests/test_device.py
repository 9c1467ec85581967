"""--device / train.device / DeepFMClassifier(device=) (issue 19): the CPU path unchanged, clear errors, the
device plumbing through a faked CUDA where a real one is absent, and CUDA parity where one is present."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from deepfm.cli import main
from deepfm.config import RUNTIME_KEYS
from deepfm.device import resolve_device
from deepfm.errors import DeepFMError
from deepfm.serve.predictor import Predictor
from deepfm.train import distributed
from deepfm.train.trainer import TrainConfig

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
FAST = ["--epochs", "2", "--batch-size", "256", "--quiet", "--set", "model.hidden=[32,32]", "--seed", "3",
        "--precision", "fp32"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def train(synth, out, *extra):
    r = run("train", "--format", "criteo", "--train", synth / "train.tsv", "--valid", synth / "valid.tsv",
            "--test", synth / "test.tsv", "--out", out, *FAST, *extra)
    assert r.exit_code == 0, r.output
    return out


# ---------------------------------------------------------------------------------------------- resolution
def test_resolve_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "mps", ""):
        with pytest.raises(DeepFMError, match="unknown device"):
            resolve_device(bad)


def test_auto_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")  # under torchrun: this rank's GPU
    assert resolve_device("auto") == torch.device("cuda", 3)
    assert resolve_device("cuda") == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeepFMError, match="2 CUDA device"):
        resolve_device("cuda:2")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(CUDA, reason="checks the error without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_clear_error(spec):
    with pytest.raises(DeepFMError, match="CUDA is not available") as e:
        resolve_device(spec)
    assert "--device cpu" in str(e.value)


def test_train_config_device_is_checked_and_a_runtime_key():
    assert TrainConfig().device == "auto"
    assert TrainConfig.from_dict({"device": "cuda:1"}).device == "cuda:1"
    with pytest.raises(ValueError, match="train.device must be one of auto, cpu, cuda or cuda:N"):
        TrainConfig.from_dict({"device": "gpu0"})
    assert "device" in RUNTIME_KEYS  # not part of compare/tune run keys or a checkpoint's fingerprint


def test_cli_refuses_a_bad_device(synth_small, tmp_path):
    r = CliRunner().invoke(main, ["train", "--format", "criteo", "--train", str(synth_small / "train.tsv"),
                                  "--out", str(tmp_path / "m"), "--device", "gpu"])
    assert r.exit_code == 2 and "not a device" in r.output
    for cmd in ("train", "evaluate", "predict", "serve", "compare", "tune"):
        r = CliRunner().invoke(main, [cmd, "--help"])
        assert r.exit_code == 0 and "--device" in r.output, cmd


@pytest.mark.skipif(CUDA, reason="checks the error without CUDA")
def test_cli_cuda_without_cuda_is_one_line(synth_small, tmp_path):
    r = CliRunner().invoke(main, ["train", "--format", "criteo", "--train", str(synth_small / "train.tsv"),
                                  "--out", str(tmp_path / "m"), "--device", "cuda", *FAST])
    assert r.exit_code == 2 and "CUDA is not available" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "m" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- distributed
def _backend(monkeypatch, dev):
    seen: dict = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: seen.setdefault("b", backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("set_device", d))
    monkeypatch.setattr(distributed, "_device", torch.device("cpu"))
    assert distributed.init_from_env(dev) is True
    return seen


def test_nccl_only_when_training_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # CUDA present, training on the CPU: gloo
    assert _backend(monkeypatch, resolve_device("cpu"))["b"] == "gloo"
    assert _backend(monkeypatch, None)["b"] == "gloo"
    seen = _backend(monkeypatch, resolve_device("auto"))  # auto -> cuda:LOCAL_RANK -> nccl on that GPU
    assert seen["b"] == "nccl" and seen["set_device"] == torch.device("cuda", 0)
    assert distributed._device == torch.device("cuda", 0)  # the collectives' own tensors go there too
    assert distributed.backend_for(torch.device("cuda", 1)) == "nccl"
    assert distributed.backend_for(torch.device("cpu")) == "gloo"


# ---------------------------------------------------------------------------------------------- CPU end to end
@pytest.fixture(scope="module")
def pair(synth_small, tmp_path_factory):
    base = tmp_path_factory.mktemp("dev")
    return train(synth_small, base / "noflag"), train(synth_small, base / "cpu", "--device", "cpu")


def test_device_cpu_trains_the_same_bundle_as_no_flag(pair):
    a, b = pair
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    ta, tb = (json.loads((p / "training.json").read_text()) for p in (a, b))
    assert ta["device"] == tb["device"] == "cpu"
    assert ta["train"]["device"] == "auto" and tb["train"]["device"] == "cpu"
    assert [h["train_logloss"] for h in ta["history"]] == [h["train_logloss"] for h in tb["history"]]


def test_device_cpu_predict_and_evaluate_match_no_flag(pair, synth_small, tmp_path):
    a, _ = pair
    outs = []
    for i, flag in enumerate(([], ["--device", "cpu"], ["--device", "auto"])):
        out = tmp_path / f"p{i}.parquet"
        r = run("predict", a, synth_small / "test.tsv", "--out", out, "--quiet", *flag)
        assert r.exit_code == 0, r.output
        outs.append(pq.read_table(out)["probability"].to_numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    ev = []
    for flag in ([], ["--device", "cpu"]):
        r = run("evaluate", a, synth_small / "test.tsv", "--json", *flag)
        assert r.exit_code == 0, r.output
        ev.append(json.loads(r.output))
    assert ev[0] == ev[1]


def test_sparse_update_on_cpu_device_is_unchanged(synth_small, tmp_path):
    a = train(synth_small, tmp_path / "a", "--embedding-update", "sparse", "--epochs", "1")
    b = train(synth_small, tmp_path / "b", "--embedding-update", "sparse", "--epochs", "1", "--device", "cpu")
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _frame(n=1500, seed=0):
    rng = np.random.default_rng(seed)
    x = pd.DataFrame({"a": rng.choice(list("abcdefgh"), n), "b": rng.choice(list("pqrs"), n),
                      "n": rng.normal(size=n)})
    logit = (x["a"].isin(list("abc")).astype(float) * 1.5 - 0.8 + 0.7 * x["n"]).to_numpy()
    return x, (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)


def test_estimator_device_param(tmp_path):
    from sklearn.base import clone

    from deepfm.estimator import DeepFMClassifier

    x, y = _frame()
    kw = dict(epochs=2, batch_size=256, overrides=("model.hidden=[16]", "train.precision=fp32"))
    a = DeepFMClassifier(**kw).fit(x, y)
    b = DeepFMClassifier(**kw, device="cpu").fit(x, y)
    assert b.get_params()["device"] == "cpu" and clone(b).device == "cpu"
    np.testing.assert_array_equal(a.predict_proba(x), b.predict_proba(x))
    with pytest.raises(DeepFMError, match="train.device must be one of"):
        DeepFMClassifier(**kw, device="tpu").fit(x, y)
    again = pickle.loads(pickle.dumps(b))
    np.testing.assert_array_equal(again.predict_proba(x), b.predict_proba(x))
    b.save(tmp_path / "m")
    loaded = DeepFMClassifier.load(tmp_path / "m", device="cpu")
    np.testing.assert_array_equal(loaded.predict_proba(x), b.predict_proba(x))


def test_predictor_refuses_onnx_on_a_gpu(pair, monkeypatch):
    import deepfm.serve.predictor as predictor_mod

    monkeypatch.setattr(predictor_mod, "resolve_device", lambda spec: torch.device("cuda", 0))
    with pytest.raises(DeepFMError, match="onnxruntime runs on the CPU"):
        Predictor(pair[0], engine="onnxruntime", device="cuda")


def test_sparse_device_path_gives_the_same_update_as_the_numpy_path():
    """The device branch of the lazy-Adam row finding (torch.unique, sorted rows) against the host one (first
    occurrence order), run on CPU tensors: the same rows, and the same weights after a few lazy-Adam steps."""
    from deepfm.layout import FieldSpec
    from deepfm.models import CTRModel, ModelConfig
    from deepfm.train.sparse import SparseEmbeddings

    fields = [FieldSpec("a", "cat", 50, 1), FieldSpec("b", "cat", 30, 1), FieldSpec("c", "num", 2, 1)]
    torch.manual_seed(0)
    m1 = CTRModel(fields, ModelConfig(hidden=[8], dropout=0.0))
    m2 = CTRModel(fields, ModelConfig(hidden=[8], dropout=0.0))
    m2.load_state_dict(m1.state_dict())
    start = m1.v.weight.detach().clone()
    s1, s2 = SparseEmbeddings(m1, 1e-2), SparseEmbeddings(m2, 1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        idx = torch.stack([torch.randint(0, 50, (64,), generator=gen), torch.randint(0, 30, (64,), generator=gen),
                           torch.ones(64, dtype=torch.long)], 1)
        val = torch.ones(64, 3)
        for model, sp, prepared in ((m1, s1, s1.prepare(idx)), (m2, s2, s2.prepare_on_device(idx))):
            rows, inv = prepared
            assert torch.equal(rows[inv], idx + sp.device_offsets)
            sp.begin(rows, inv)
            model(idx, val).sum().backward()
            sp.step()
    assert not torch.equal(m1.v.weight, start)
    for k, t in m1.state_dict().items():
        torch.testing.assert_close(t, m2.state_dict()[k], rtol=0, atol=1e-7, msg=k)


# ---------------------------------------------------------------------------------------------- real CUDA
@needs_cuda
@pytest.mark.parametrize("update", ["dense", "sparse"])
def test_cuda_trains_and_predicts_like_cpu(synth_small, tmp_path, update):
    gpu = train(synth_small, tmp_path / "gpu", "--device", "cuda", "--embedding-update", update)
    cpu = train(synth_small, tmp_path / "cpu", "--device", "cpu", "--embedding-update", update)
    tg = json.loads((gpu / "training.json").read_text())
    assert tg["device"].startswith("cuda")
    mg, mc = (json.loads((p / "metrics.json").read_text())["test"] for p in (gpu, cpu))
    assert abs(mg["auc"] - mc["auc"]) < 0.02  # other dropout streams: close, not equal
    w = load_file(str(gpu / "model.safetensors"))
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in w.values())
    p_cpu = Predictor(gpu, device="cpu").predict_file(synth_small / "test.tsv").probabilities
    p_gpu = Predictor(gpu, device="cuda").predict_file(synth_small / "test.tsv").probabilities
    np.testing.assert_allclose(p_gpu, p_cpu, atol=1e-5)


@needs_cuda
def test_cuda_bf16_auto_and_estimator(tmp_path):
    from deepfm.estimator import DeepFMClassifier

    x, y = _frame()
    clf = DeepFMClassifier(epochs=1, batch_size=256, device="cuda", overrides=("train.precision=auto",)).fit(x, y)
    assert clf.training_["precision"]["chosen"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    state = pickle.loads(pickle.dumps(clf)).model_.state_dict()
    assert all(t.device.type == "cpu" for t in state.values())
