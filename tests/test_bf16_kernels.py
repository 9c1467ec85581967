"""The fused kernels with bf16 activations (bf16 autocast): the C passes against torch's own bf16 rounding,
and the fused bf16 MLP / model step against eager PyTorch under the same autocast."""

from __future__ import annotations

import pytest
import torch

from deepfm.accel import accelerate
from deepfm.data.store import FieldSpec
from deepfm.models.ctr import CTRModel, ModelConfig
from deepfm.models.layers import MLP, FastDropout

FIELDS = [FieldSpec("a", "cat", 50, 1), FieldSpec("b", "cat", 70, 1), FieldSpec("x", "num", 2, 1),
          FieldSpec("tags", "multi", 30, 3, "sum")]


@pytest.fixture
def kernels():
    from deepfm.accel import kernels as k

    if k.library() is None:
        pytest.skip(f"fused kernels unavailable: {k.status()}")
    return k


def _graph(y: torch.Tensor) -> set[str]:
    seen, todo = set(), [y.grad_fn]
    while todo:
        f = todo.pop()
        if f is not None and f not in seen:
            seen.add(f)
            todo.extend(n for n, _ in f.next_functions)
    return {type(f).__name__ for f in seen}


@pytest.mark.parametrize("p", [0.5, 0.25, 0.1])
def test_bf16_relu_dropout_passes_round_like_torch(p, kernels):
    torch.manual_seed(0)
    rows, cols = 67, 45  # row tails
    drop = FastDropout(p).train()
    z = (torch.randn(rows, cols) * 3).bfloat16()
    z[0, :3] = torch.tensor([float("nan"), 1e38, -1e38])
    b = torch.randn(cols)
    bits = drop.draw(torch.Size((rows, cols)))
    drop.pending.append((torch.Size((rows, cols)), bits))
    mask = drop.mask(torch.Size((rows, cols)))  # the same bits as a float mask
    scale = 1.0 / (1.0 - p)
    want = (torch.relu(z.float() + b) * mask).bfloat16()
    y = z.clone()
    kernels.relu_dropout_forward(y, b, bits, drop.bits, drop.threshold, scale)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y.view(torch.int16)[1:], want.view(torch.int16)[1:])  # bit for bit
    assert torch.isnan(y[0, 0]) and torch.equal(y[0, 1:], want[0, 1:])
    g = torch.randn(rows, cols).bfloat16()
    gz, gb = kernels.relu_dropout_backward(g, y, scale)
    exact = g.float() * (y.float() > 0) * scale
    assert gz.dtype == torch.bfloat16 and gb.dtype == torch.float32
    assert torch.equal(gz.view(torch.int16), exact.bfloat16().view(torch.int16))
    assert torch.allclose(gb, exact.double().sum(0).float(), atol=1e-5, rtol=1e-5)


def test_bf16_batch_norm_passes_match_float_math(kernels):
    torch.manual_seed(1)
    rows, cols = 70, 33
    drop = FastDropout(0.2).train()
    z = (torch.randn(rows, cols) * 2 + 1).bfloat16()
    mean, var = kernels.column_stats(z)
    zf = z.double()
    assert torch.allclose(mean, zf.mean(0), atol=1e-6) and torch.allclose(var, zf.var(0, unbiased=False), atol=1e-5)
    a, c = torch.rand(cols) + 0.5, torch.randn(cols) * 0.1
    bits = drop.draw(torch.Size((rows, cols)))
    drop.pending.append((torch.Size((rows, cols)), bits))
    mask = drop.mask(torch.Size((rows, cols)))
    y = kernels.affine_relu_dropout_forward(z, a, c, bits, drop.bits, drop.threshold, 1.25)
    want = (torch.relu(a * z.float() + c) * mask).bfloat16()
    assert y.dtype == torch.bfloat16 and torch.equal(y.view(torch.int16), want.view(torch.int16))
    gy = torch.randn(rows, cols).bfloat16()
    m, invstd, gamma = mean.float(), (var + 1e-5).rsqrt().float(), torch.rand(cols) + 0.5
    dz, dgamma, dbeta, gb = kernels.bn_relu_dropout_backward(gy, y, z, m, invstd, gamma, 1.25)
    ff = kernels.bn_relu_dropout_backward(gy.float(), y.float(), z.float(), m, invstd, gamma, 1.25)  # float32 reference
    assert dz.dtype == torch.bfloat16
    assert torch.allclose(dz.float(), ff[0], atol=1e-2, rtol=1e-2)  # bf16 rounding of the same float math
    for got, ref in zip((dgamma, dbeta, gb), ff[1:], strict=True):
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


def _mlp_step(bn: bool, p: float, bf16: bool = True):
    torch.manual_seed(0)
    mlp = accelerate(MLP(37, [45, 33], p, bn, "relu")).train()
    x = torch.randn(1024, 37, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = mlp(x)
    g = torch.randn(out.shape)
    grads = torch.autograd.grad(out.float(), [x, *mlp.parameters()], g)
    names = ["x", *(n for n, _ in mlp.named_parameters())]
    return out, dict(zip(names, grads, strict=True)), _graph(out), [b.clone() for b in mlp.buffers()]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("p", [0.5, 0.2])
def test_fused_bf16_mlp_is_as_close_to_fp32_as_eager_autocast(bn, p, monkeypatch, kernels):
    """Against the fp32 step, the fused bf16 step is as close as torch's own autocast (bf16 GEMM inputs and
    the ReLU decisions they flip dominate both; a wrong mask or a wrong pass would be ~100% off)."""
    ref, ref_grads, _, ref_buffers = _mlp_step(bn, p, bf16=False)
    out, grads, nodes, buffers = _mlp_step(bn, p)
    assert any(("BNReLUDropout" if bn else "LinearReLUDropout") in n for n in nodes), nodes
    monkeypatch.setattr(kernels, "library", lambda: None)
    eager, eager_grads, eager_nodes, eager_buffers = _mlp_step(bn, p)  # the same seed: the same mask bits
    assert not any("LinearReLUDropout" in n or "BNReLUDropout" in n for n in eager_nodes)
    assert out.dtype == eager.dtype == torch.bfloat16
    assert _err(out, ref) <= 1.5 * _err(eager, ref) + 5e-3
    for name, want in ref_grads.items():
        got = grads[name]
        assert got.shape == want.shape and got.dtype == torch.float32
        if bn and name.endswith(("0.bias", "4.bias")):  # the Linear biases before batch norm: gradient ~0
            assert got.abs().max() < 1e-3 * grads["x"].abs().max()
            continue
        assert _err(got, want) <= 1.5 * _err(eager_grads[name], want) + 0.02, name
    for a, b, c in zip(buffers, eager_buffers, ref_buffers, strict=True):  # running statistics
        assert torch.allclose(a.double(), c.double(), atol=1e-2, rtol=1e-2)
        assert torch.allclose(b.double(), c.double(), atol=1e-2, rtol=1e-2)


def test_fused_embedding_runs_under_bf16_autocast_and_matches_eager(monkeypatch, kernels):
    g = torch.Generator().manual_seed(0)
    B = 1024
    idx = torch.stack([torch.randint(0, 50, (B,), generator=g), torch.randint(0, 70, (B,), generator=g),
                       torch.zeros(B, dtype=torch.long),
                       *[torch.randint(0, 30, (B,), generator=g) for _ in range(3)]], 1)
    val = torch.ones(B, 6)
    val[:, 2] = torch.randn(B, generator=g)
    y = (torch.rand(B, generator=g) < 0.3).float()

    def step(bf16=True):
        torch.manual_seed(3)
        model = accelerate(CTRModel(FIELDS, ModelConfig(embed_dim=5, hidden=[24, 16], dropout=0.2, batch_norm=True,
                                                        init_std=0.1))).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logit = model(idx, val).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y)
        names, params = zip(*model.named_parameters(), strict=True)
        return loss, dict(zip(names, torch.autograd.grad(loss, params), strict=True)), _graph(logit)

    ref_loss, ref, _ = step(bf16=False)
    loss, grads, nodes = step()
    assert any("FieldEmbed" in n for n in nodes) and any("BNReLUDropout" in n for n in nodes)
    monkeypatch.setattr(kernels, "library", lambda: None)
    eager_loss, eager, eager_nodes = step()
    assert not any("FieldEmbed" in n for n in eager_nodes)
    assert abs(loss.item() - ref_loss.item()) <= 1.5 * abs(eager_loss.item() - ref_loss.item()) + 2e-3
    assert sorted(grads) == sorted(ref)
    for name, want in ref.items():
        assert grads[name].dtype == torch.float32
        if name in ("dnn.net.0.bias", "dnn.net.4.bias"):  # before batch norm: gradient ~0 (eager bf16: noise)
            continue
        assert _err(grads[name], want) <= 1.5 * _err(eager[name], want) + 0.02, name
