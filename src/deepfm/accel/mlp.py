"""The fused CPU versions of the MLP's layers for training: Linear -> ReLU -> dropout (and Linear ->
BatchNorm1d -> ReLU -> dropout) as one GEMM plus one C pass each way, and a Linear whose input gradient runs
on a 16-aligned weight. Scoring takes ReLU in place.

Applied by :func:`deepfm.accel.accelerate` (:class:`FusedMLP`); the same masks and the same math as the plain
``MLP`` (tests compare both), which it falls back to where the kernels do not apply.

Under bf16 autocast (``train.precision`` bf16/auto) the same blocks keep their activations in bfloat16: the
GEMMs take bf16 inputs and write bf16, the C passes read and write bf16 (math, parameters and statistics in
float32), so each direction is still one memory pass over half the bytes, and the only casts are the
weights' (small) and the first layer's input and gradient (the fp32 embedding output). Eager autocast instead
turns each block's output back into float32 (dropout's float mask promotes it) for the next GEMM to cast again.
"""

from __future__ import annotations

import torch
from torch import nn

from deepfm.accel import kernels
from deepfm.models.layers import MLP, FastDropout


def _grad_input(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad [B, out] @ weight [out, in] -> [B, in], with W's columns zero-padded to a multiple of 16 first
    when they are not (see :class:`_AlignedLinear`)."""
    n = weight.shape[1]
    if n % 16 == 0:
        return grad.mm(weight)
    padded = weight.new_zeros(weight.shape[0], -(-n // 16) * 16)
    padded[:, :n] = weight
    return grad.mm(padded)[:, :n]


class _AlignedLinear(torch.autograd.Function):
    """``F.linear`` whose input gradient ``g @ W`` runs with W's columns zero-padded to a multiple of 16.

    MKL's sgemm is slower (about 1.35x here, ``grad_input_ms`` of ``benchmarks/gemm.py``) when that
    product's output width (the layer's input width, e.g. DeepFM's 39 x 10 = 390) is not a multiple of 16;
    padding a copy of W (KBs) and slicing the result costs far less. Same math; the forward is ``addmm``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return torch.addmm(bias, x, weight.t())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _grad_input(grad, weight)
        if ctx.needs_input_grad[1]:
            gw = grad.t().mm(x)
        if ctx.needs_input_grad[2]:
            gb = grad.sum(0)
        return gx, gw, gb


def _low(x: torch.Tensor, weight: torch.Tensor, half: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, W) as the GEMM takes them: bf16 under bf16 autocast (``half``), else as they are."""
    if not half:
        return x, weight
    return x.to(torch.bfloat16), weight.to(torch.bfloat16)


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class _LinearReLUDropout(torch.autograd.Function):
    """y = dropout(relu(x W^T + b)) for training on CPU, with the fused C passes of ``kernels``: forward is
    the GEMM (without the bias copy of ``addmm``) then one in-place pass (bias, ReLU, mask, scale) reading
    the raw mask bits; backward one pass (mask, scale, bias gradient) and the two GEMMs. Eager PyTorch
    needs 5-6 passes over the activations for the same (plus a float mask). Saves x, W and y (the next
    layer's x: no extra memory). Same mask, same math as the eager path (tested). ``half``: bf16 autocast
    (x and W cast to bf16, y and the gradients of x and z bf16; see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, drop: FastDropout,  # type: ignore[override]
                half: bool = False) -> torch.Tensor:
        ctx.x_dtype = x.dtype
        x, w = _low(x, weight, half)
        y = torch.mm(x, w.t())
        scale = 1.0 / (1.0 - drop.p)
        kernels.relu_dropout_forward(y, bias, drop.draw(y.shape), drop.bits, drop.threshold, scale)
        ctx.save_for_backward(x, w, y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight, y = ctx.saved_tensors
        gz, gb = kernels.relu_dropout_backward(grad.to(y.dtype), y, ctx.scale)
        gx = _grad_input(gz, weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        gw = gz.t().mm(x).float() if ctx.needs_input_grad[1] else None
        return gx, gw, gb if ctx.needs_input_grad[2] else None, None, None


class _LinearBNReLUDropout(torch.autograd.Function):
    """y = dropout(relu(bn(x W^T + b))) for training on CPU (``nn.BatchNorm1d`` with batch statistics, as
    the ``default`` and ``bars`` presets use), with the C kernels: after the GEMM, one pass for the column
    statistics and one for normalise + affine + ReLU + mask; backward two passes (the sums of batch norm's
    gradient, then dL/dz with the bias gradient). The bias is left out of the GEMM's output: batch norm
    subtracts the batch mean, so it only moves the running mean, which gets it added (as nn.BatchNorm1d's
    would). Running statistics and ``num_batches_tracked`` are updated as nn.BatchNorm1d does. ``half``: as
    :class:`_LinearReLUDropout` (z, y and the activation gradients bf16; statistics from the bf16 z, as
    autocast's batch norm of the bf16 GEMM output)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,  # type: ignore[override]
                beta: torch.Tensor, bn: nn.BatchNorm1d, drop: FastDropout, half: bool = False) -> torch.Tensor:
        ctx.x_dtype = x.dtype
        x, weight = _low(x, weight, half)
        z = torch.mm(x, weight.t())
        n = z.shape[0]
        mean, var = kernels.column_stats(z)  # float64
        invstd = (var + bn.eps).rsqrt()
        a = gamma.double() * invstd
        scale = 1.0 / (1.0 - drop.p)
        y = kernels.affine_relu_dropout_forward(z, a.float(), (beta.double() - mean * a).float(),
                                                drop.draw(z.shape), drop.bits, drop.threshold, scale)
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - f).add_((mean + bias.double()).float(), alpha=f)
            bn.running_var.mul_(1 - f).add_((var * (n / (n - 1))).float(), alpha=f)
        ctx.save_for_backward(x, weight, z, y, mean.float(), invstd.float(), gamma)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight, z, y, mean, invstd, gamma = ctx.saved_tensors
        dz, dgamma, dbeta, gb = kernels.bn_relu_dropout_backward(grad.to(y.dtype), y, z, mean, invstd, gamma.float(),
                                                                 ctx.scale)
        gx = _grad_input(dz, weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        gw = dz.t().mm(x).float() if ctx.needs_input_grad[1] else None
        return gx, gw, gb, dgamma, dbeta, None, None, None


def _fusable_bn(layer: nn.Linear, bn: nn.BatchNorm1d, drop: FastDropout, x: torch.Tensor) -> bool:
    """Whether Linear -> BatchNorm1d -> ReLU -> ``drop`` runs as :class:`_LinearBNReLUDropout`: as
    :func:`_fusable`, with batch statistics (training, affine, tracked running statistics, 2+ rows)."""
    return (bn.training and bn.affine and bn.track_running_stats and bn.running_mean is not None
            and x.shape[0] > 1 and bn.weight.dtype == torch.float32 and _fusable(layer, drop, x))


def _fusable(layer: nn.Linear, drop: FastDropout, x: torch.Tensor) -> bool:
    """Whether Linear -> ReLU -> ``drop`` runs as :class:`_LinearReLUDropout`: training with gradients, on
    CPU with float32 weights, float32 x without autocast or float32/bf16 x under bf16 autocast, dropout on,
    and the kernels built (``kernels.status()``)."""
    if torch.is_autocast_enabled("cpu"):
        if not _bf16_autocast() or x.dtype not in (torch.float32, torch.bfloat16):
            return False
    elif x.dtype != torch.float32:
        return False
    return (layer.training and drop.training and drop.p > 0 and layer.bias is not None and x.dim() == 2
            and x.device.type == "cpu" and layer.weight.dtype == torch.float32
            and torch.is_grad_enabled() and layer.weight.requires_grad and layer.bias.requires_grad
            and not kernels.capturing() and kernels.library() is not None)


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, through :class:`_AlignedLinear` when training (train mode, gradients on) a layer whose
    input width is not a multiple of 16, on CPU (where the padding pays; export and scoring see plain
    ``nn.Linear``)."""
    if (layer.training and layer.in_features % 16 and layer.bias is not None and x.dim() == 2
            and x.device.type == "cpu" and torch.is_grad_enabled() and layer.weight.requires_grad
            and not torch.is_autocast_enabled("cpu")):  # bf16 autocast: keep torch's own casting
        return _AlignedLinear.apply(x, layer.weight, layer.bias)
    return layer(x)


class FusedMLP(MLP):
    """:class:`MLP` whose ``net`` runs through the fused passes above where they apply (the same layers, so
    the same ``dnn.net.<i>`` weights): consecutive layers are matched and each group runs as one step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self.net)
        half = _bf16_autocast()
        i = 0
        while i < len(layers):
            layer = layers[i]
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if (isinstance(layer, nn.Linear) and isinstance(nxt, nn.ReLU) and i + 2 < len(layers)
                    and isinstance(layers[i + 2], FastDropout) and _fusable(layer, layers[i + 2], x)):
                x, i = _LinearReLUDropout.apply(x, layer.weight, layer.bias, layers[i + 2], half), i + 3
            elif (isinstance(layer, nn.Linear) and isinstance(nxt, nn.BatchNorm1d) and i + 3 < len(layers)
                  and isinstance(layers[i + 2], nn.ReLU) and isinstance(layers[i + 3], FastDropout)
                  and _fusable_bn(layer, nxt, layers[i + 3], x)):
                x = _LinearBNReLUDropout.apply(x, layer.weight, layer.bias, nxt.weight, nxt.bias, nxt, layers[i + 3],
                                               half)
                i += 4
            elif isinstance(layer, nn.ReLU) and isinstance(nxt, FastDropout):
                x, i = nxt(x, relu=True), i + 2  # ReLU then dropout in one pass
            elif isinstance(layer, nn.Linear):
                x, i = linear(layer, x), i + 1
            else:
                x, i = layer(x), i + 1
        return x.squeeze(-1)
