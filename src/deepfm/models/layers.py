"""The blocks DeepFM is made of, each a few lines to check against the paper (Guo et al. 2017, eq. 1-4).

Inputs everywhere: ``idx`` [B, S] int64 per-field local indices and ``val`` [B, S] float32 values, one
slot per categorical/numeric field and ``max_len`` slots per multi-valued field (see data.store.Batcher).
"""

from __future__ import annotations

import collections

import numpy as np
import torch
from torch import nn

from deepfm.data.store import FieldSpec
from deepfm.models import kernels


class FusedTable(nn.Module):
    """One ``[sum(field sizes), dim]`` table for all fields; slot i reads rows ``offset[field(i)] + idx``."""

    def __init__(self, fields: list[FieldSpec], dim: int, std: float) -> None:
        super().__init__()
        sizes = torch.tensor([f.size for f in fields])
        field_offsets = torch.cumsum(sizes, 0) - sizes
        slot_field = torch.repeat_interleave(torch.arange(len(fields)), torch.tensor([f.slots for f in fields]))
        self.register_buffer("slot_offsets", field_offsets[slot_field], persistent=False)
        self.register_buffer("slot_field", slot_field, persistent=False)
        self.n_fields = len(fields)
        self.sizes = [f.size for f in fields]  # rows per field, in order
        self.pooled = len(slot_field) != len(fields)
        self.weight = nn.Parameter(torch.empty(int(sizes.sum()), dim))
        nn.init.normal_(self.weight, std=std) if std > 0 else nn.init.zeros_(self.weight)
        # Set by train.sparse for one step: (inv [B, S] into leaf, leaf [U, dim] = weight[unique rows]), so
        # that autograd produces a [U, dim] gradient instead of a dense [sum(sizes), dim] one.
        self.gathered: tuple[torch.Tensor, torch.Tensor] | None = None
        self.slot_field_i32: torch.Tensor | None = None  # for the C kernels, made on first use

    def global_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, S] local indices -> [B, S] row numbers in the fused table."""
        return idx + self.slot_offsets

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, S] -> [B, S, dim]: the table rows each slot uses."""
        if self.gathered is not None:
            inv, leaf = self.gathered
            return gather_rows(leaf, inv)
        return gather_rows(self.weight, self.global_rows(idx))

    def source(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(table [R, dim], rows [B, S] into it): the whole table, or this step's gathered leaf."""
        if self.gathered is not None:
            inv, leaf = self.gathered
            return leaf, inv
        return self.weight, self.global_rows(idx)

    def fused(self, idx: torch.Tensor, val: torch.Tensor, fm: bool, first: FusedTable | None = None,
              penalty: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """With the C kernels (see ``fusable``), in one pass: (``forward(idx, val)``, its FM term
        ``fm_second_order`` [B] if ``fm``, ``first(idx, val).sum((1, 2))`` [B] if ``first`` (a dim-1 table over
        the same fields), and, if ``penalty``, the sum of squares of the rows used in both tables (per use;
        None if ``first`` could not share the pass))."""
        if self.slot_field_i32 is None:
            self.slot_field_i32 = self.slot_field.to(torch.int32)
        table, rows = self.source(idx)
        w = None
        if first is not None and first.sizes == self.sizes:
            mine, theirs = self.gathered, first.gathered
            if (mine is None and theirs is None) or (mine is not None and theirs is not None and mine[0] is theirs[0]):
                w = first.source(idx)[0]  # the same rows: same fields, gathered alike
        shared = first is None or w is not None
        e, y_fm, y_first, pen = _FieldEmbed.apply(table, w, rows.contiguous(), val.contiguous(),
                                                  self.slot_field_i32, self.n_fields, fm, penalty and shared)
        if first is not None and w is None:
            y_first = first(idx, val).sum(dim=(1, 2))
        return e, y_fm, y_first, pen

    def fusable(self, idx: torch.Tensor, val: torch.Tensor) -> bool:
        """Whether :meth:`fused` can run (training or scoring): CPU float32 without autocast, no gradient
        wanted for ``val``, not being traced or exported, kernels built."""
        return (idx.device.type == "cpu" and val.dtype == torch.float32 and not val.requires_grad
                and self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and not kernels.capturing() and kernels.library() is not None)

    def forward(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        """[B, S] x2 -> [B, F, dim]: x_i * v_i per field (multi-valued slots summed into their field)."""
        e = self.rows(idx) * val.unsqueeze(-1)
        if self.pooled:
            e = e.new_zeros(e.shape[0], self.n_fields, e.shape[2]).index_add_(1, self.slot_field, e)
        return e


class _FieldEmbed(torch.autograd.Function):
    """(e, fm, first, penalty) = (v(idx, val), fm_second_order(e), w(idx, val).sum((1, 2)), the sum of
    squares of the rows used in v and w) from the two tables and their shared rows, with the C kernels: one
    pass over the batch forward; backward one pass for dL/de (the DNN's plus the FM's, S_k - e_fk) and one
    race-free scatter-add into both dense table gradients, L2 penalty included (each thread owns a range of
    table rows)."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, w: torch.Tensor | None, rows: torch.Tensor, val: torch.Tensor,  # type: ignore[override]
                slot_field: torch.Tensor, n_fields: int, fm: bool, penalty: bool):
        e, y_fm, y_first, pen = kernels.embed_forward(v, w, rows, val, slot_field, n_fields, fm, penalty)
        ctx.save_for_backward(e, rows, val, slot_field, v, w)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: the kernel skips it
        return e, y_fm, y_first, pen

    @staticmethod
    def backward(ctx, grad_e: torch.Tensor | None, grad_fm: torch.Tensor | None,  # type: ignore[override]
                 grad_first: torch.Tensor | None, grad_pen: torch.Tensor | None):
        e, rows, val, slot_field, v, w = ctx.saved_tensors
        gv, gw = kernels.embed_backward(grad_e, grad_fm, grad_first, grad_pen, v, w, e, rows, val, slot_field,
                                        ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gv, gw, None, None, None, None, None, None


def fm_second_order(e: torch.Tensor) -> torch.Tensor:
    """[B, F, K] -> [B]: sum_{i<j} <e_i, e_j> = 0.5 * sum_k ((sum_i e_ik)^2 - sum_i e_ik^2) (paper eq. 2)."""
    square_of_sum = e.sum(dim=1).pow(2)
    sum_of_square = e.pow(2).sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)


class InnerProducts(nn.Module):
    """[B, F, K] -> [B, F(F-1)/2]: <e_i, e_j> for every pair i < j, in row-major pair order (0,1), (0,2), ...,
    (1,2), ... (the inner product layer of IPNN, Qu et al. 2016; no parameters). Computed as the Gram matrix
    ``e e^T`` [B, F, F] and its strict upper triangle."""

    def __init__(self, n_fields: int) -> None:
        super().__init__()
        i, j = torch.triu_indices(n_fields, n_fields, offset=1)
        self.register_buffer("pairs", i * n_fields + j, persistent=False)  # flat (i, j) positions in e e^T

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return torch.bmm(e, e.transpose(1, 2)).flatten(1).index_select(1, self.pairs)


def outer_product_sum(e: torch.Tensor) -> torch.Tensor:
    """[B, F, K] -> [B, K*K]: sum_i sum_j e_i e_j^T = f f^T with f = sum_i e_i, flattened row-major (the
    outer product layer of OPNN with Qu et al.'s sum-pooling ("superposition") trick)."""
    f = e.sum(dim=1)
    return (f.unsqueeze(2) * f.unsqueeze(1)).flatten(1)


class FastDropout(nn.Module):
    """Inverted dropout (keep with probability 1 - p, scale by 1 / (1 - p)), as ``nn.Dropout``, with masks
    drawn from numpy's PCG64 raw stream (over 10x cheaper than torch's CPU bernoulli_, which costs as much
    as a third of a DeepFM training step). ``p`` is applied with 1/65536 resolution, using only as many
    random bits per element as that needs: p = 0.5 takes 1 bit (64 elements per raw draw), p = 0.25 2 bits,
    p = 0.1 16 bits. The stream is seeded from torch's RNG on first use, so ``torch.manual_seed`` makes runs
    reproducible."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        threshold = int(round(p * 65536))
        # fewest bits k with threshold / 65536 = t / 2**k exactly: an element is kept when its k bits >= t
        self.bits = next(k for k in (1, 2, 4, 8, 16) if threshold % (1 << (16 - k)) == 0)
        self.threshold = threshold >> (16 - self.bits)
        self.rng: np.random.Generator | None = None
        # (shape, bits) made ahead by a loader thread
        self.pending: collections.deque[tuple[torch.Size, np.ndarray]] = collections.deque()

    def premake(self, shape: tuple[int, ...]) -> None:
        """Draw the mask bits of a coming step now (from the loader thread, which then is the only one
        drawing: masks stay in step order, so runs stay reproducible)."""
        self.pending.append((torch.Size(shape), self.draw(torch.Size(shape), fresh=True)))

    def draw(self, shape: torch.Size, fresh: bool = False) -> np.ndarray:
        """The raw bits of one mask: uint64 [rows, words], rows = prod(shape[:-1]), each row starting on a
        word (so the fused kernel and :meth:`mask` read row r at the same place); element j of a row is kept
        when its ``bits``-wide field (bits j*k .. j*k+k-1, little-endian) is >= ``threshold``."""
        if not fresh and self.pending:
            made, raw = self.pending.popleft()
            if made == shape:
                return raw
            raise RuntimeError(f"premade dropout mask {tuple(made)} does not fit {tuple(shape)}")
        if self.rng is None:
            self.rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        cols = shape[-1]
        rows = int(np.prod(shape[:-1]))
        words = (cols * self.bits + 63) // 64
        return self.rng.bit_generator.random_raw(rows * words).reshape(rows, words)

    def mask(self, shape: torch.Size, fresh: bool = False) -> torch.Tensor:
        """float32 [shape]: 1 / (1 - p) where kept, 0 where dropped (made in numpy: its bool -> float cast
        is 2-3x cheaper than torch's on CPU)."""
        raw = self.draw(shape, fresh)
        cols, k = shape[-1], self.bits
        b = raw.view(np.uint8)  # [rows, words * 8], little-endian bytes
        if k == 1:  # p = 0.5: each bit is one element's draw
            keep = np.unpackbits(b, axis=1, count=cols, bitorder="little").view(bool)
        elif k < 8:
            r = (b[:, :, None] >> np.arange(0, 8, k, dtype=np.uint8)) & np.uint8((1 << k) - 1)
            keep = r.reshape(b.shape[0], -1)[:, :cols] >= self.threshold
        else:
            keep = raw.view(np.uint8 if k == 8 else np.uint16)[:, :cols] >= self.threshold
        return torch.from_numpy(np.multiply(keep, np.float32(1.0 / (1.0 - self.p)), dtype=np.float32)
                                ).view(shape)

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        if not self.training or self.p == 0:
            if relu and not torch.is_grad_enabled():
                return x.relu_()  # scoring: x is the Linear's fresh output, used by nothing else
            return torch.relu(x) if relu else x
        c = self.mask(x.shape)
        return _ReLUDropout.apply(x, c, 1.0 / (1.0 - self.p)) if relu else _MaskScale.apply(x, c)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _ReLUDropout(torch.autograd.Function):
    """y = relu(x * c), c in {0, scale}: one pass each way; saves only y (which the next Linear keeps
    anyway), since dy/dx = scale where y > 0, else 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, c: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        y = torch.mul(x, c).relu_()
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, y, 0).mul_(ctx.scale), None, None


class _MaskScale(torch.autograd.Function):
    """y = x * c with c in {0, scale} (dropout after a non-ReLU activation); saves only c."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(c)
        return x * c

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (c,) = ctx.saved_tensors
        return grad * c, None


def _take_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[1])


class _Gather(torch.autograd.Function):
    """rows = table[index] with the backward as one flat ``index_add_`` (4-5x faster on CPU than
    ``embedding_dense_backward``); the gradient is dense over ``table``'s rows."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return _take_rows(table, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (index,) = ctx.saved_tensors
        k = grad.shape[-1]
        src = grad.reshape(-1).contiguous()
        if k == 1:
            flat_index = index.reshape(-1)
        else:  # a 1-D index_add_ over row * k + column is 2x faster on CPU than the [rows, k] one
            wide = ctx.rows * k >= 2**31  # int32 halves the index's memory traffic where it fits
            dtype = torch.int64 if wide else torch.int32
            flat_index = (index.reshape(-1, 1).to(dtype) * k + torch.arange(k, dtype=dtype, device=index.device)
                          ).reshape(-1)
        out = src.new_zeros(ctx.rows * k).index_add_(0, flat_index, src)
        return out.view(ctx.rows, k), None


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[R, K] table, [...] int64 index -> [..., K]."""
    if torch.is_grad_enabled() and table.requires_grad:
        return _Gather.apply(table, index)
    return _take_rows(table, index)


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


class _LinearReLUDropout(torch.autograd.Function):
    """y = dropout(relu(x W^T + b)) for training on CPU, with the fused C passes of ``kernels``: forward is
    the GEMM (without the bias copy of ``addmm``) then one in-place pass (bias, ReLU, mask, scale) reading
    the raw mask bits; backward one pass (mask, scale, bias gradient) and the two GEMMs. Eager PyTorch
    needs 5-6 passes over the activations for the same (plus a float mask). Saves x, W and y (the next
    layer's x: no extra memory). Same mask, same math as the eager path (tested)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, drop: FastDropout  # type: ignore[override]
                ) -> torch.Tensor:
        y = torch.mm(x, weight.t())
        scale = 1.0 / (1.0 - drop.p)
        kernels.relu_dropout_forward(y, bias, drop.draw(y.shape), drop.bits, drop.threshold, scale)
        ctx.save_for_backward(x, weight, y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight, y = ctx.saved_tensors
        gz, gb = kernels.relu_dropout_backward(grad, y, ctx.scale)
        gx = _grad_input(gz, weight) if ctx.needs_input_grad[0] else None
        gw = gz.t().mm(x) if ctx.needs_input_grad[1] else None
        return gx, gw, gb if ctx.needs_input_grad[2] else None, None


class _LinearBNReLUDropout(torch.autograd.Function):
    """y = dropout(relu(bn(x W^T + b))) for training on CPU (``nn.BatchNorm1d`` with batch statistics, as
    the ``default`` and ``bars`` presets use), with the C kernels: after the GEMM, one pass for the column
    statistics and one for normalise + affine + ReLU + mask; backward two passes (the sums of batch norm's
    gradient, then dL/dz with the bias gradient). The bias is left out of the GEMM's output: batch norm
    subtracts the batch mean, so it only moves the running mean, which gets it added (as nn.BatchNorm1d's
    would). Running statistics and ``num_batches_tracked`` are updated as nn.BatchNorm1d does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,  # type: ignore[override]
                beta: torch.Tensor, bn: nn.BatchNorm1d, drop: FastDropout) -> torch.Tensor:
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
        dz, dgamma, dbeta, gb = kernels.bn_relu_dropout_backward(grad, y, z, mean, invstd, gamma.float(), ctx.scale)
        gx = _grad_input(dz, weight) if ctx.needs_input_grad[0] else None
        gw = dz.t().mm(x) if ctx.needs_input_grad[1] else None
        return gx, gw, gb, dgamma, dbeta, None, None


def _fusable_bn(layer: nn.Linear, bn: nn.BatchNorm1d, drop: FastDropout, x: torch.Tensor) -> bool:
    """Whether Linear -> BatchNorm1d -> ReLU -> ``drop`` runs as :class:`_LinearBNReLUDropout`: as
    :func:`_fusable`, with batch statistics (training, affine, tracked running statistics, 2+ rows)."""
    return (bn.training and bn.affine and bn.track_running_stats and bn.running_mean is not None
            and x.shape[0] > 1 and bn.weight.dtype == torch.float32 and _fusable(layer, drop, x))


def _fusable(layer: nn.Linear, drop: FastDropout, x: torch.Tensor) -> bool:
    """Whether Linear -> ReLU -> ``drop`` runs as :class:`_LinearReLUDropout`: training with gradients, on
    CPU in float32 without autocast, dropout on, and the kernels built (``kernels.status()``)."""
    return (layer.training and drop.training and drop.p > 0 and layer.bias is not None and x.dim() == 2
            and x.device.type == "cpu" and x.dtype == torch.float32 and layer.weight.dtype == torch.float32
            and torch.is_grad_enabled() and layer.weight.requires_grad and layer.bias.requires_grad
            and not torch.is_autocast_enabled("cpu") and not kernels.capturing() and kernels.library() is not None)


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, through :class:`_AlignedLinear` when training (train mode, gradients on) a layer whose
    input width is not a multiple of 16, on CPU (where the padding pays; export and scoring see plain
    ``nn.Linear``)."""
    if (layer.training and layer.in_features % 16 and layer.bias is not None and x.dim() == 2
            and x.device.type == "cpu" and torch.is_grad_enabled() and layer.weight.requires_grad
            and not torch.is_autocast_enabled("cpu")):  # bf16 autocast: keep torch's own casting
        return _AlignedLinear.apply(x, layer.weight, layer.bias)
    return layer(x)


class MLP(nn.Module):
    """Hidden layers (Linear -> [BatchNorm] -> activation -> Dropout) and a 1-unit output (paper eq. 3-4)."""

    ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "prelu": nn.PReLU, "gelu": nn.GELU}

    def __init__(self, d_in: int, hidden: list[int], dropout: float, batch_norm: bool, activation: str) -> None:
        super().__init__()
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r} (expected one of {sorted(self.ACTIVATIONS)})")
        layers: list[nn.Module] = []
        for h in hidden:
            layers.append(nn.Linear(d_in, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(self.ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(FastDropout(dropout))
            d_in = h
        layers.append(nn.Linear(d_in, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self.net)
        i = 0
        while i < len(layers):
            layer = layers[i]
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if (isinstance(layer, nn.Linear) and isinstance(nxt, nn.ReLU) and i + 2 < len(layers)
                    and isinstance(layers[i + 2], FastDropout) and _fusable(layer, layers[i + 2], x)):
                x, i = _LinearReLUDropout.apply(x, layer.weight, layer.bias, layers[i + 2]), i + 3
            elif (isinstance(layer, nn.Linear) and isinstance(nxt, nn.BatchNorm1d) and i + 3 < len(layers)
                  and isinstance(layers[i + 2], nn.ReLU) and isinstance(layers[i + 3], FastDropout)
                  and _fusable_bn(layer, nxt, layers[i + 3], x)):
                x = _LinearBNReLUDropout.apply(x, layer.weight, layer.bias, nxt.weight, nxt.bias, nxt, layers[i + 3])
                i += 4
            elif isinstance(layer, nn.ReLU) and isinstance(nxt, FastDropout):
                x, i = nxt(x, relu=True), i + 2  # ReLU then dropout in one pass
            elif isinstance(layer, nn.Linear):
                x, i = linear(layer, x), i + 1
            else:
                x, i = layer(x), i + 1
        return x.squeeze(-1)
