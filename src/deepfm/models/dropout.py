"""The MLP's dropout (paper Sec. 3.1: dropout on the hidden layers): inverted dropout as ``nn.Dropout``, with
masks drawn from numpy's PCG64 stream, reproducible under ``torch.manual_seed``. On a GPU the masks are
drawn there (``nn.functional.dropout``): the same distribution, another stream.

>>> _ = torch.manual_seed(0)
>>> FastDropout(0.5).train()(torch.ones(2, 4)).unique().tolist()
[0.0, 2.0]
"""

from __future__ import annotations

import collections
import copy

import numpy as np
import torch
from torch import nn


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

    def rng_state_dict(self) -> dict | None:
        """The mask stream's state (None before the first mask), for a checkpoint (train.state.RandomState;
        not in ``state_dict()``, which is the model's weights)."""
        return None if self.rng is None else copy.deepcopy(self.rng.bit_generator.state)

    def load_rng_state_dict(self, state: dict | None) -> None:
        """Continue the stream from ``state``; masks made ahead are dropped."""
        self.pending.clear()
        if state is None:
            self.rng = None
        else:
            self.rng = np.random.default_rng()
            self.rng.bit_generator.state = state

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
        if x.device.type != "cpu":  # a GPU draws its masks itself (torch's generator there, torch.manual_seed)
            return nn.functional.dropout(torch.relu(x) if relu else x, self.p, training=True)
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

