"""deepfm.explain: the interaction map and field importances against brute force, and `deepfm explain`."""

import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch
from click.testing import CliRunner

from deepfm import pipeline
from deepfm.commands.explain import explain_command
from deepfm.data.store import FieldSpec
from deepfm.errors import DeepFMError
from deepfm.explain import (
    field_importance,
    field_slots,
    interaction_map,
    permutation_importance,
)
from deepfm.models.ctr import CTRModel, ModelConfig
from deepfm.schema import Field, Schema
from deepfm.serve import bundle as bundle_mod

# two categorical fields, two numeric fields and a mean-pooled multi-valued field (3 slots): F = 5, S = 7
FIELDS = [FieldSpec("a", "cat", 5, 1), FieldSpec("b", "cat", 7, 1), FieldSpec("x", "num", 2, 1),
          FieldSpec("y", "num", 2, 1), FieldSpec("tags", "multi", 6, 3, "mean")]
OFFSETS = [0, 5, 12, 14, 16]  # first row of each field in the fused tables
SLOTS = [[0], [1], [2], [3], [4, 5, 6]]


def _inputs(B=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randint(0, 5, (B,), generator=g), torch.randint(0, 7, (B,), generator=g),
                       torch.randint(0, 2, (B,), generator=g), torch.zeros(B, dtype=torch.long),
                       *[torch.randint(0, 6, (B,), generator=g) for _ in range(3)]], 1)
    val = torch.ones(B, 7)
    val[:, 2] = torch.where(idx[:, 2] == 0, 3 * torch.randn(B, generator=g), 1.0)  # values != 1 (or missing)
    val[:, 3] = 2.5 * torch.randn(B, generator=g)
    lens = torch.randint(1, 4, (B,), generator=g)
    val[:, 4:] = (torch.arange(3)[None] < lens[:, None]).float() / lens[:, None]  # mean pooling weights
    return idx, val


def _model(name="deepfm"):
    torch.manual_seed(0)
    m = CTRModel(FIELDS, ModelConfig(model=name, embed_dim=4, hidden=[8], dropout=0.0, init_std=0.5))
    with torch.no_grad():
        if m.w is not None:
            m.w.weight.normal_()
    return m.eval()


def _row_vectors(table, idx, val, b):
    """Field f's pooled row vector x_f * table_row for row b, by hand (the multi field's slots summed)."""
    return [sum(float(val[b, s]) * table[OFFSETS[f] + int(idx[b, s])].double() for s in SLOTS[f])
            for f in range(5)]


def test_interaction_map_equals_brute_force_double_loop():
    m, (idx, val) = _model("deepfm"), _inputs()
    got = interaction_map(m, (idx.numpy(), val.numpy()), FIELDS, batch_size=5)  # several chunks
    want = np.zeros((5, 5))
    V = m.v.weight.detach()
    for b in range(idx.shape[0]):
        e = _row_vectors(V, idx, val, b)
        for i, j in itertools.combinations(range(5), 2):
            want[i, j] += abs(float(e[i] @ e[j])) / idx.shape[0]
            want[j, i] = want[i, j]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    assert np.all(np.diag(got) == 0) and np.array_equal(got, got.T)
    assert got[2, 3] > 0 and got[3, 4] > 0  # numeric and multi-valued fields take part


def test_field_importance_first_order_and_fm_by_hand():
    m, (idx, val) = _model("deepfm"), _inputs()
    imp = field_importance(m, (idx, val), FIELDS)
    W, V = m.w.weight.detach(), m.v.weight.detach()
    first, fm = np.zeros(5), np.zeros(5)
    for b in range(idx.shape[0]):
        w = _row_vectors(W, idx, val, b)
        e = _row_vectors(V, idx, val, b)
        for i in range(5):
            first[i] += abs(float(w[i][0])) / idx.shape[0]
            fm[i] += abs(sum(float(e[i] @ e[j]) for j in range(5) if j != i)) / idx.shape[0]
    np.testing.assert_allclose(imp["first_order"], first, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(imp["fm"], fm, rtol=1e-5, atol=1e-9)
    assert imp["permutation"] is None  # no labels given
    assert imp["fields"] == [f.name for f in FIELDS]


def test_model_without_fm_part_has_no_interaction_map():
    m, (idx, val) = _model("dnn"), _inputs()
    with pytest.raises(DeepFMError, match="FM part"):
        interaction_map(m, (idx, val))
    imp = field_importance(m, (idx, val, (torch.arange(12) % 2).float()), permutation_rows=12)
    assert imp["fm"] is None and imp["first_order"] is None and imp["permutation"].shape == (5,)


def test_permutation_moves_multi_valued_slots_together_and_restores_inputs():
    m, (idx, val) = _model("fm"), _inputs(B=64)
    assert [list(s) for s in field_slots(m)] == SLOTS
    y = (torch.arange(64) % 2).float()
    i0, v0 = idx.clone(), val.clone()
    base, drops = permutation_importance(m, idx, val, y, repeats=2, seed=3)
    assert drops.shape == (2, 5) and np.isfinite(base)
    assert torch.equal(idx, i0) and torch.equal(val, v0)
    _, again = permutation_importance(m, idx, val, y, repeats=2, seed=3)
    np.testing.assert_array_equal(drops, again)  # seeded


# ------------------------------------------------------------------ a tiny trained model with a planted signal
SCHEMA = Schema(fields=(Field("signal"), Field("noise"), Field("x", "numeric", transform="standardize"),
                        Field("tags", "multi", sep="|", max_len=3, pooling="mean")), label="click")


def _csv(path, n, seed):
    rng = np.random.default_rng(seed)
    sig, noise, x = rng.integers(0, 8, n), rng.integers(0, 8, n), rng.normal(0, 1, n)
    tags = ["|".join(rng.choice(list("abcde"), rng.integers(1, 4), replace=False)) for _ in range(n)]
    logit = np.array([-2.0, -1.5, -1.0, -0.5, 0.5, 1.0, 1.5, 2.0])[sig] + 0.3 * x
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    pacsv.write_csv(pa.table({"signal": [f"s{k}" for k in sig], "noise": [f"n{k}" for k in noise], "x": x,
                              "tags": tags, "click": click}), path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain")
    SCHEMA.save(d / "schema.yaml")
    train = _csv(d / "train.csv", 3000, 0)
    prep = pipeline.prepare(train, "csv", SCHEMA, valid_fraction=0.2, seed=0, use_cache=False)
    mc, tc = pipeline.resolve_config("default", ["model.embed_dim=4", "model.hidden=[16]", "train.epochs=3",
                                                 "train.batch_size=256", "train.threads=1"])
    model, _ = pipeline.train(prep, mc, tc, d / "bundle", "csv", progress=False)
    return d, model, prep


def test_permutation_importance_finds_the_planted_signal(trained):
    d, model, prep = trained
    data = pipeline.batcher(pipeline.encode_file(_csv(d / "test.csv", 2000, 1), "csv", prep.pre), prep.fields)
    imp = field_importance(model, data, prep.fields, permutation_rows=2000, repeats=2, seed=0)
    p = dict(zip(imp["fields"], imp["permutation"], strict=True))
    assert imp["base_auc"] > 0.7
    assert p["signal"] > 0.1 and p["signal"] > 5 * abs(p["noise"]), p
    assert p["signal"] > p["x"] > abs(p["noise"])


def _png(path):
    from PIL import Image  # comes with matplotlib

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_cli_writes_maps_importance_and_json(trained, tmp_path):
    pytest.importorskip("matplotlib")
    d, _, _ = trained
    test = _csv(d / "test.csv", 2000, 1)
    out = tmp_path / "ex"
    res = CliRunner().invoke(explain_command, [str(d / "bundle"), str(test), "--out", str(out),
                                               "--permutation-rows", "1500", "--repeats", "2", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "strongest FM interactions" in res.output and "signal" in res.output
    for name in ("interactions.csv", "interactions.png", "importance.csv", "importance.png", "explain.json"):
        assert (out / name).exists(), name
    assert min(_png(out / "interactions.png")) > 300 and min(_png(out / "importance.png")) > 200
    pairs = (out / "interactions.csv").read_text().splitlines()
    assert pairs[0] == "field_i,field_j,mean_abs" and len(pairs) == 1 + 4 * 3 // 2
    rows = (out / "importance.csv").read_text().splitlines()
    assert rows[0] == "field,kind,first_order,fm,permutation_auc_drop,permutation_std" and len(rows) == 5
    ex = json.loads((out / "explain.json").read_text())
    assert ex["model"] == "deepfm" and ex["rows"] == 2000 and ex["permutation_rows"] == 1500
    assert np.array(ex["interactions"]).shape == (4, 4) and ex["base_auc"] > 0.7
    assert ex["fields"] == ["signal", "noise", "x", "tags"]  # layout order: categorical, numeric, multi


def test_cli_unlabelled_data_and_rows_limit(trained, tmp_path):
    pytest.importorskip("matplotlib")
    d, _, _ = trained
    t = pacsv.read_csv(_csv(d / "test.csv", 2000, 1)).drop(["click"])
    pacsv.write_csv(t, tmp_path / "nolabel.csv")
    res = CliRunner().invoke(explain_command, [str(d / "bundle"), str(tmp_path / "nolabel.csv"), "--rows", "300",
                                               "--out", str(tmp_path / "ex")])
    assert res.exit_code == 0, res.output
    ex = json.loads((tmp_path / "ex" / "explain.json").read_text())
    assert ex["rows"] == 300 and ex["importance"]["permutation_auc_drop"] is None
    assert any("no label column" in n for n in ex["notes"])


def test_cli_model_without_fm_part(trained, tmp_path):
    pytest.importorskip("matplotlib")
    d, _, prep = trained
    torch.manual_seed(0)
    dnn = CTRModel(prep.fields, ModelConfig(model="dnn", embed_dim=4, hidden=[8], init_std=0.1)).eval()
    bundle_mod.save(tmp_path / "dnn", dnn, prep.pre, "csv", {}, {})
    res = CliRunner().invoke(explain_command, [str(tmp_path / "dnn"), str(d / "test.csv"), "--out",
                                               str(tmp_path / "ex"), "--permutation-rows", "500"])
    assert res.exit_code == 0, res.output
    assert "no FM part" in res.output
    assert not (tmp_path / "ex" / "interactions.csv").exists() and (tmp_path / "ex" / "importance.png").exists()
    # and with nothing computable: a clear error, exit status 2
    pacsv.write_csv(pacsv.read_csv(d / "test.csv").drop(["click"]), tmp_path / "nolabel.csv")
    res = CliRunner().invoke(explain_command, [str(tmp_path / "dnn"), str(tmp_path / "nolabel.csv"), "--out",
                                              str(tmp_path / "ex2")])
    assert res.exit_code == 2 and "nothing to explain" in res.output
