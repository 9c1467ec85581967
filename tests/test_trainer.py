"""The trainer's components: early stopping as an object, and the state_dict round trip of each component
and of the checkpoint (what a resumed run relies on)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from deepfm.errors import DeepFMError
from deepfm.models.ctr import CTRModel, ModelConfig
from deepfm.models.dropout import FastDropout
from deepfm.train import checkpoint as ck
from deepfm.train.early_stopping import EarlyStopping
from deepfm.train.sparse import SparseEmbeddings
from deepfm.train.state import Position, RandomState, ShardedSource, Shuffler
from deepfm.train.updater import Updater


def _metrics(auc: float, logloss: float = 0.5) -> dict[str, float]:
    return {"auc": auc, "logloss": logloss}


def test_early_stopping_patience_best_and_state_round_trip():
    model = torch.nn.Linear(2, 1)
    es = EarlyStopping("auc", patience=2)
    assert es.update(_metrics(0.7), model).action == "improved"
    with torch.no_grad():
        model.weight += 1
    assert [es.update(_metrics(a), model).action for a in (0.7 + 5e-7, 0.69)] == ["wait", "stop"]
    assert es.best == 0.7 and not torch.equal(es.best_weights["weight"], model.weight)  # the first weights
    other = EarlyStopping("auc", patience=2)
    other.load_state_dict(es.state_dict())
    assert (other.best, other.bad, other.reduced) == (es.best, es.bad, es.reduced)
    with pytest.raises(ValueError, match="monitors"):
        EarlyStopping("auc-logloss").load_state_dict(es.state_dict())


def test_early_stopping_reduces_lr_once_and_falls_back_to_logloss():
    es = EarlyStopping("auc-logloss", patience=1, reduce_lr=True)
    assert es.update(_metrics(0.8, 0.4)).value == pytest.approx(0.4)
    assert es.update(_metrics(0.7)).action == "reduce_lr" and es.bad == 0
    assert es.update(_metrics(0.7)).action == "stop"
    d = EarlyStopping("auc").update(_metrics(float("nan"), 0.3))
    assert (d.name, d.value, d.action) == ("-logloss", -0.3, "improved")


def _model() -> CTRModel:
    from deepfm.layout import FieldSpec

    torch.manual_seed(0)
    return CTRModel([FieldSpec("a", "cat", 20, 1), FieldSpec("b", "cat", 30, 1)],
                    ModelConfig(embed_dim=4, hidden=[8], dropout=0.5))


def _step(model: CTRModel, upd: Updater) -> None:
    idx = torch.randint(0, 20, (16, 2))
    val = torch.ones(16, 2)
    upd.begin(upd.prepare(idx))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(idx, val), torch.rand(16).round())
    upd.backward(loss, loss)
    upd.step()


@pytest.mark.parametrize("sparse", [False, True])
def test_updater_state_round_trip_continues_identically(sparse):
    a, b = _model(), _model()
    ua, ub = Updater(a, 0.01, sparse), Updater(b, 0.01, sparse)
    _step(a, ua)
    b.load_state_dict(a.state_dict())
    ub.load_state_dict(copy.deepcopy(ua.state_dict()))  # as from a file: not a's live moment tensors
    RandomState(b).load_state_dict(RandomState(a).state_dict())  # the dropout stream a started
    torch.manual_seed(1)
    _step(a, ua)
    torch.manual_seed(1)
    _step(b, ub)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="embedding update"):
        Updater(_model(), 0.01, not sparse).load_state_dict(ua.state_dict())


def test_sparse_embeddings_leave_no_rows_on_the_tables():
    model = _model()
    sp = SparseEmbeddings(model, 0.01)
    sp.begin(*sp.prepare(torch.randint(0, 20, (4, 2))))
    assert all(t.gathered is not None for t in sp.tables)
    sp.end()
    assert all(t.gathered is None for t in sp.tables) and sp.leaves == []


def test_random_state_and_shuffler_round_trip():
    model = _model().train()
    drop = next(m for m in model.modules() if isinstance(m, FastDropout))
    drop.mask(torch.Size([4, 8]))  # starts the stream
    rs = RandomState(model)
    assert rs.streams == [drop]
    state = json.loads(json.dumps({k: v for k, v in rs.state_dict().items() if k != "torch"}))
    want = drop.mask(torch.Size([4, 8]))
    rs.load_state_dict({"torch": torch.get_rng_state(), **state})
    assert torch.equal(drop.mask(torch.Size([4, 8])), want)

    class Rows:  # a BatchSource in memory: not sharded
        rows = 100

        def labels(self):
            return None

        def __call__(self, rows):
            raise AssertionError

    src = Rows()
    assert not isinstance(src, ShardedSource)
    sh = Shuffler(src, None, seed=3)
    first = sh.epoch(resumed=False)
    saved = json.loads(json.dumps(sh.state_dict()))
    again = Shuffler(src, None, seed=99)
    again.load_state_dict(saved)
    assert np.array_equal(again.epoch(resumed=True), first)  # resumed inside the epoch: the same order
    assert np.array_equal(again.epoch(resumed=False), sh.epoch(resumed=False))
    pos = Position(epoch=2, step=5, history=[{"epoch": 1}])
    back = Position()
    back.load_state_dict(json.loads(json.dumps(pos.state_dict())))
    assert back == pos


def test_checkpoint_round_trip_and_an_old_format_is_refused(tmp_path):
    model = _model()
    upd = Updater(model, 0.01)
    _step(model, upd)
    state = {"model": model.state_dict(), "optimizer": upd.state_dict(), "position": Position(step=3).state_dict()}
    c = ck.Checkpointer(tmp_path / "checkpoints", "fp")
    path = c.save(state, 3)
    found = c.latest()
    assert found is not None and found[0] == path
    loaded = c.load(*found)
    assert loaded["position"]["step"] == 3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded["model"].items())
    assert set(loaded["optimizer"]["adam"]["state"]) == set(upd.state_dict()["adam"]["state"])  # int keys kept
    meta = json.loads((path / "state.json").read_text())
    meta["format_version"] = 1
    meta["meta_sha256"] = ck._meta_sha256(meta)
    (path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(DeepFMError, match="incompatible checkpoint .*Start over"):
        c.latest()
