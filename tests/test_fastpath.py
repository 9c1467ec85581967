"""The training fast paths against their reference: fused ReLU+dropout, the index_add gather, the sparse
(lazy Adam) embedding update, and the background prefetcher."""

import numpy as np
import pytest
import torch

from deepfm.accel import accelerate
from deepfm.accel.embedding import gather_rows
from deepfm.data.store import FieldSpec
from deepfm.models.ctr import CTRModel, ModelConfig
from deepfm.models.layers import MLP, FastDropout
from deepfm.train.sparse import SparseEmbeddings, UniqueRows
from deepfm.train.trainer import Prefetcher, TrainConfig

FIELDS = [FieldSpec("a", "cat", 50, 1), FieldSpec("b", "cat", 70, 1), FieldSpec("x", "num", 2, 1),
          FieldSpec("tags", "multi", 30, 3, "sum")]


@pytest.fixture
def kernels():
    """The fused CPU kernels module; the test is skipped where they could not be built."""
    from deepfm.accel import kernels as k

    if k.library() is None:
        pytest.skip(f"fused kernels unavailable: {k.status()}")
    return k


def _batch(B=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randint(0, 50, (B,), generator=g), torch.randint(0, 70, (B,), generator=g),
                       torch.zeros(B, dtype=torch.long), *[torch.randint(0, 30, (B,), generator=g)
                                                           for _ in range(3)]], 1)
    val = torch.ones(B, 6)
    val[:, 2] = torch.randn(B, generator=g)
    y = (torch.rand(B, generator=g) < 0.3).float()
    return idx, val, y


def test_fast_dropout_keeps_expected_fraction_scales_and_gradient_matches_mask():
    torch.manual_seed(0)
    d = FastDropout(0.3).train()
    x = torch.randn(400, 500, requires_grad=True)
    y = d(x, relu=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7 * (x > 0).float().mean().item()) < 0.01
    assert torch.allclose(y[kept], x[kept] / 0.7)
    assert bool((x[kept] > 0).all())  # ReLU folded in
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.7)
    d.eval()
    assert torch.equal(d(x, relu=True), torch.relu(x))


@pytest.mark.parametrize("p, bits", [(0.5, 1), (0.25, 2), (0.75, 2), (0.125, 4), (0.1, 16), (0.3, 16)])
def test_fast_dropout_draws_the_fewest_bits_that_give_p_exactly(p, bits):
    torch.manual_seed(0)
    d = FastDropout(p)
    assert d.bits == bits and d.threshold / 2**bits == round(p * 65536) / 65536
    m = d.mask(torch.Size((1000, 1001)))  # an odd element count: the last raw draw is partly used
    assert m.shape == (1000, 1001)
    assert m.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    dropped = (m == 0).float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / m.numel()) ** 0.5 + 1e-4  # within 4 sigma


def test_fast_dropout_is_reproducible_under_manual_seed():
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        outs.append(FastDropout(0.5).train()(torch.ones(10, 10)))
    assert torch.equal(*outs)


@pytest.mark.parametrize("k", [1, 4])
def test_gather_rows_gradient_equals_embedding_gradient(k):
    w = torch.randn(20, k, requires_grad=True)
    idx = torch.randint(0, 20, (8, 5))
    g = torch.randn(8, 5, k)
    (gather_rows(w, idx) * g).sum().backward()
    ref = w.detach().clone().requires_grad_()
    (torch.nn.functional.embedding(idx, ref) * g).sum().backward()
    assert torch.allclose(w.grad, ref.grad, atol=1e-6)


def test_unique_rows_matches_numpy_unique_across_calls():
    u, rng = UniqueRows(1000), np.random.default_rng(0)
    for _ in range(10):
        flat = rng.integers(0, 1000, rng.integers(1, 3000))
        uniq, inv = u(flat)
        assert np.array_equal(uniq[inv], flat)
        assert np.array_equal(np.sort(uniq), np.unique(flat))


def _models():
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=4, hidden=[16], dropout=0.0, init_std=0.1)
    a = CTRModel(FIELDS, cfg)
    b = CTRModel(FIELDS, cfg)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a.w.weight.normal_(0, 0.1)
        b.w.weight.copy_(a.w.weight)
    return a, b


def _dense_step(model, opt, idx, val, y):
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(idx, val), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _sparse_step(model, sp, opt, idx, val, y):
    sp.begin(*sp.prepare(idx))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(idx, val), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sp.step()


def test_sparse_update_equals_dense_adam_on_touched_rows_and_leaves_others():
    dense, sparse = _models()
    opt_d = torch.optim.Adam(dense.parameters(), lr=0.01)
    sp = SparseEmbeddings(sparse, lr=0.01)
    opt_s = torch.optim.Adam([p for n, p in sparse.named_parameters() if n not in ("w.weight", "v.weight")],
                             lr=0.01)
    idx, val, y = _batch()
    before = sparse.v.weight.detach().clone()
    _dense_step(dense, opt_d, idx, val, y)
    _sparse_step(sparse, sp, opt_s, idx, val, y)
    # first step: Adam moves exactly the touched rows, identically in both
    for name in ("w.weight", "v.weight", "bias", "dnn.net.0.weight"):
        assert torch.allclose(dict(dense.named_parameters())[name], dict(sparse.named_parameters())[name],
                              atol=1e-6), name
    touched = np.unique((idx + sparse.v.slot_offsets).numpy())
    untouched = np.setdiff1d(np.arange(before.shape[0]), touched)
    assert torch.equal(sparse.v.weight[untouched], before[untouched])
    assert not torch.equal(sparse.v.weight[touched], before[touched])
    # second step on other rows: dense Adam moves step-1 rows by stale momentum, lazy Adam does not
    idx2 = idx.clone()
    idx2[:, 0] = 49
    after1 = sparse.v.weight.detach().clone()
    _sparse_step(sparse, sp, opt_s, idx2, val, y)
    only1 = np.setdiff1d(touched, (idx2 + sparse.v.slot_offsets).numpy())
    assert torch.equal(sparse.v.weight[only1], after1[only1])
    assert all(t.gathered is None for t in sp.tables)


def test_prefetcher_yields_in_order_and_propagates_errors():
    assert list(Prefetcher(lambda s: s * 2, 50)) == [2 * s for s in range(50)]
    assert list(Prefetcher(lambda s: s, 5, threaded=False)) == list(range(5))

    def bad(s):
        if s == 3:
            raise ValueError("boom")
        return s

    with pytest.raises(ValueError, match="boom"):
        list(Prefetcher(bad, 10))
    it = iter(Prefetcher(lambda s: s, 1000, depth=2))
    assert next(it) == 0
    it.close()  # early exit stops the thread


def test_train_config_rejects_unknown_update_and_precision():
    with pytest.raises(ValueError, match="embedding_update"):
        TrainConfig.from_dict({"embedding_update": "lazy"})
    with pytest.raises(ValueError, match="precision"):
        TrainConfig.from_dict({"precision": "fp16"})


@pytest.mark.parametrize("opts", [{"embedding_update": "sparse"}, {"precision": "bf16", "prefetch": False}])
def test_fit_runs_with_fast_options_and_learns(opts):
    from deepfm.data.preprocess import Encoded
    from deepfm.data.store import Batcher
    from deepfm.train.trainer import fit

    rng = np.random.default_rng(0)
    n = 4000
    cat = np.stack([rng.integers(2, 50, n), rng.integers(2, 70, n)], 1).astype(np.int32)
    logit = np.where(cat[:, 0] % 2 == 0, 1.5, -1.5)
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    enc = Encoded(cat=cat, num=np.zeros((n, 0), np.float32), multi={}, label=label)
    fields = [FieldSpec("a", "cat", 50, 1), FieldSpec("b", "cat", 70, 1)]
    torch.manual_seed(0)
    model = CTRModel(fields, ModelConfig(embed_dim=4, hidden=[16], dropout=0.2))
    cfg = TrainConfig(epochs=3, batch_size=256, lr=0.01, **opts)
    hist = fit(model, Batcher(enc, fields), cfg, train_rows=np.arange(3000), valid=Batcher(enc, fields),
               valid_rows=np.arange(3000, n), progress=False)
    assert hist[-1]["valid_auc"] > 0.75


def test_fast_dropout_without_relu_scales_kept_and_gradient_is_the_mask():
    torch.manual_seed(1)
    d = FastDropout(0.5).train()
    x = torch.randn(300, 200, requires_grad=True)
    y = d(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    assert torch.allclose(y[kept], 2 * x[kept])
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() * 2)


def test_premade_masks_give_the_same_training_as_inline_masks():
    from deepfm.data.preprocess import Encoded
    from deepfm.data.store import Batcher
    from deepfm.train.trainer import fit

    rng = np.random.default_rng(0)
    n = 2000
    cat = np.stack([rng.integers(2, 50, n), rng.integers(2, 70, n)], 1).astype(np.int32)
    enc = Encoded(cat=cat, num=np.zeros((n, 0), np.float32), multi={},
                  label=(rng.random(n) < 0.3).astype(np.float32))
    fields = [FieldSpec("a", "cat", 50, 1), FieldSpec("b", "cat", 70, 1)]
    states = []
    for prefetch in (True, False):
        torch.manual_seed(0)
        model = CTRModel(fields, ModelConfig(embed_dim=4, hidden=[16, 16], dropout=0.3))
        fit(model, Batcher(enc, fields), TrainConfig(epochs=2, batch_size=300, prefetch=prefetch), progress=False)
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_auto_embedding_update_switches_on_table_size(monkeypatch):
    from deepfm.train import trainer

    model = CTRModel(FIELDS, ModelConfig(embed_dim=4, hidden=[8]))
    assert not trainer.uses_sparse_update(model, "dense")
    assert trainer.uses_sparse_update(model, "sparse")
    assert not trainer.uses_sparse_update(model, "auto")  # 155 rows
    monkeypatch.setattr(trainer, "AUTO_SPARSE_ROWS", 100)
    assert trainer.uses_sparse_update(model, "auto")


def test_aligned_linear_matches_nn_linear_and_is_used_only_when_training():
    from deepfm.accel.mlp import _AlignedLinear, linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(390, 24)  # 390 % 16 != 0: the padded grad-input path
    x = torch.randn(32, 390, requires_grad=True)
    y = linear(layer, x)
    assert y.grad_fn is not None and "AlignedLinear" in type(y.grad_fn).__name__
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    want = torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), g)
    for a, b in zip(grads, want, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    args = [torch.randn(*shape, dtype=torch.double, requires_grad=True) for shape in ((4, 21), (3, 21), (3,))]
    assert torch.autograd.gradcheck(_AlignedLinear.apply, args)
    layer.eval()  # scoring and export see the plain module
    assert "AlignedLinear" not in type(linear(layer, x).grad_fn).__name__
    assert "AlignedLinear" not in type(linear(torch.nn.Linear(400, 3), x[:, :1].expand(32, 400)).grad_fn).__name__


def _mlp_step(hidden, p, seed=0):
    torch.manual_seed(seed)
    mlp = accelerate(MLP(37, hidden, p, False, "relu")).train()
    x = torch.randn(70, 37, requires_grad=True)
    out = mlp(x)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *mlp.parameters()], g)
    return out, grads, out.grad_fn


@pytest.mark.parametrize("p", [0.5, 0.25, 0.125, 0.1, 0.3])
def test_fused_linear_relu_dropout_kernels_match_the_eager_path(p, monkeypatch, kernels):
    hidden = [45, 33]  # widths that are not multiples of 8: the kernels' row tails
    out, grads, _ = _mlp_step(hidden, p)
    monkeypatch.setattr(kernels, "library", lambda: None)
    want, want_grads, _ = _mlp_step(hidden, p)  # the same seed: the same mask bits
    assert torch.allclose(out, want, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads, want_grads, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_fused_path_is_used_when_training_and_eager_otherwise(kernels):
    mlp = accelerate(MLP(16, [8], 0.5, False, "relu")).train()
    x = torch.randn(4, 16)

    def fns(y):  # the autograd nodes of the graph, by name
        seen, todo = set(), [y.grad_fn]
        while todo:
            f = todo.pop()
            if f is not None and f not in seen:
                seen.add(f)
                todo.extend(n for n, _ in f.next_functions)
        return {type(f).__name__ for f in seen}

    assert any("LinearReLUDropout" in n for n in fns(mlp(x)))
    with_bn = accelerate(MLP(16, [8], 0.5, True, "relu")).train()
    assert not any("LinearReLUDropout" in n for n in fns(with_bn(x)))  # BN between
    with torch.no_grad():
        assert mlp.eval()(x).grad_fn is None


def test_kernels_can_be_turned_off(monkeypatch, tmp_path):
    from deepfm.accel import kernels

    monkeypatch.setenv("DEEPFM_KERNELS", "0")
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.library() is None and kernels.status().startswith("off (DEEPFM_KERNELS=0)")
    monkeypatch.delenv("DEEPFM_KERNELS")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.library() is None and "no C compiler" in kernels.status()


@pytest.mark.parametrize("kind", ["deepfm", "fm", "dnn", "wdl", "lr"])
def test_fused_embedding_and_fm_kernels_match_the_eager_path(kind, monkeypatch, kernels):
    idx, val, y = _batch(B=57)

    def step():
        torch.manual_seed(3)
        cfg = ModelConfig(model=kind, embed_dim=5, hidden=[24, 16], init_std=0.1)
        model = accelerate(CTRModel(FIELDS, cfg)).train()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(idx, val), y)
        names, params = zip(*[(n, p) for n, p in model.named_parameters()], strict=True)
        return loss, dict(zip(names, torch.autograd.grad(loss, params), strict=True))

    def scores():
        torch.manual_seed(3)
        cfg = ModelConfig(model=kind, embed_dim=5, hidden=[24, 16], init_std=0.1)
        model = accelerate(CTRModel(FIELDS, cfg)).eval()
        with torch.no_grad():
            return model(idx, val)

    loss, grads, scored = *step(), scores()
    monkeypatch.setattr(kernels, "library", lambda: None)
    want_loss, want = step()
    assert torch.allclose(scored, scores(), atol=1e-6)  # scoring takes the kernels too
    assert torch.allclose(loss, want_loss, atol=1e-6)
    assert grads.keys() == want.keys()
    for name in want:
        assert torch.allclose(grads[name], want[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_fused_batch_norm_path_matches_eager_including_running_statistics(p, monkeypatch, kernels):
    def step():
        torch.manual_seed(1)
        mlp = accelerate(MLP(37, [45, 33], p, True, "relu")).train()
        with torch.no_grad():
            for m in mlp.net:
                if isinstance(m, torch.nn.BatchNorm1d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        x = torch.randn(70, 37, requires_grad=True) * 3 + 1
        out = mlp(x)
        grads = torch.autograd.grad(out, [x, *mlp.parameters()], torch.randn_like(out))
        return out, grads, [b.clone() for b in mlp.buffers()], out.grad_fn

    out, grads, buffers, _ = step()
    monkeypatch.setattr(kernels, "library", lambda: None)
    want, want_grads, want_buffers, _ = step()
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads, want_grads, strict=True):  # the Linear biases' gradients are ~0 both ways
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-3)
    for a, b in zip(buffers, want_buffers, strict=True):  # running mean/var and num_batches_tracked
        assert torch.allclose(a.double(), b.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["deepfm", "dnn"])
def test_fused_embedding_l2_penalty_matches_the_eager_path(kind, monkeypatch, kernels):
    idx, val, y = _batch(B=57)

    def step():
        torch.manual_seed(3)
        model = accelerate(CTRModel(FIELDS, ModelConfig(model=kind, embed_dim=5, hidden=[24], init_std=0.1,
                                                        embedding_l2=0.05))).train()
        logit = model(idx, val)
        pen = model.embedding_penalty(idx)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y) + 0.05 * pen
        names, params = zip(*model.named_parameters(), strict=True)
        return pen, dict(zip(names, torch.autograd.grad(loss, params), strict=True)), model._penalty

    pen, grads, left = step()
    assert left is None  # handed over by embedding_penalty
    monkeypatch.setattr(kernels, "library", lambda: None)
    want_pen, want, _ = step()
    assert torch.allclose(pen, want_pen, rtol=1e-5)
    for name in want:
        assert torch.allclose(grads[name], want[name], atol=1e-6, rtol=1e-4), name
