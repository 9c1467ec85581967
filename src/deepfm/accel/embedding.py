"""The fused CPU versions of the embedding side: a table's row gather with a cheap backward, and DeepFM's
field terms (embeddings, first order, FM, the embedding L2 penalty) in one C pass over the batch.

Applied by :func:`deepfm.accel.accelerate`; each computes what the plain block of models/ computes (tests
compare both) and falls back to it where it does not apply.
"""

from __future__ import annotations

import torch

from deepfm.accel import kernels
from deepfm.models.ctr import CTRModel
from deepfm.models.layers import FusedTable


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


class FastTable(FusedTable):
    """:class:`FusedTable` whose row gather has the flat ``index_add_`` backward (:class:`_Gather`)."""

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return gather_rows(*self.source(idx))


def fusable(table: FusedTable, idx: torch.Tensor, val: torch.Tensor) -> bool:
    """Whether :func:`fused_embed` can run (training or scoring): CPU float32 tables, no gradient wanted for
    ``val``, not being traced or exported, kernels built. Also under bf16 autocast: autocast would leave the
    gather, FM and first-order terms in float32 anyway, and the MLP's first GEMM casts the output."""
    return (idx.device.type == "cpu" and val.dtype == torch.float32 and not val.requires_grad
            and table.weight.dtype == torch.float32
            and (not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") == torch.bfloat16)
            and not kernels.capturing() and kernels.library() is not None)


def fused_embed(v: FusedTable, idx: torch.Tensor, val: torch.Tensor, fm: bool, first: FusedTable | None = None,
                penalty: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """With the C kernels (see :func:`fusable`), in one pass: (``v(idx, val)`` [B, F, K], its FM term
    ``fm_second_order`` [B] if ``fm``, ``first(idx, val).sum((1, 2))`` [B] if ``first`` (a dim-1 table over
    the same fields), and, if ``penalty``, the sum of squares of the rows used in both tables (per use;
    None if ``first`` could not share the pass))."""
    slot_field = getattr(v, "slot_field_i32", None)
    if slot_field is None:
        slot_field = v.slot_field_i32 = v.slot_field.to(torch.int32)
    table, rows = v.source(idx)
    w = None
    if first is not None and first.sizes == v.sizes:
        mine, theirs = v.gathered, first.gathered
        if (mine is None and theirs is None) or (mine is not None and theirs is not None and mine[0] is theirs[0]):
            w = first.source(idx)[0]  # the same rows: same fields, gathered alike
    shared = first is None or w is not None
    e, y_fm, y_first, pen = _FieldEmbed.apply(table, w, rows.contiguous(), val.contiguous(), slot_field,
                                              v.n_fields, fm, penalty and shared)
    if first is not None and w is None:
        y_first = first(idx, val).sum(dim=(1, 2))
    return e, y_fm, y_first, pen


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


class FusedCTRModel(CTRModel):
    """:class:`CTRModel` (lr, fm, dnn, deepfm, wdl) whose embeddings, first-order and FM terms come from one
    C pass (:func:`fused_embed`), with the embedding L2 penalty of that pass kept for
    ``embedding_penalty``; the plain ``embed``/``head`` where the kernels do not apply. The kernel engine's
    eq. 1: the same terms, added in ``head``'s order."""

    _penalty: tuple[torch.Tensor, torch.Tensor] | None = None  # (idx, sum of squares of the rows it used)

    def forward(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        self._penalty = None
        if self.v is None or not fusable(self.v, idx, val):
            return super().forward(idx, val)
        want = self.cfg.embedding_l2 > 0 and self.training and torch.is_grad_enabled()
        e, y_fm, y_first, pen = fused_embed(self.v, idx, val, self.use_fm, self.w, penalty=want)
        if pen is not None:
            self._penalty = (idx, pen)  # embedding_penalty(idx) returns it: no second gather
        logit = self.bias.expand(idx.shape[0])
        for y in (y_first, y_fm):
            if y is not None:
                logit = logit + y
        return logit + self.dnn(e.flatten(1)) if self.dnn is not None else logit

    def embedding_penalty(self, idx: torch.Tensor) -> torch.Tensor:
        if self._penalty is not None and self._penalty[0] is idx:
            pen, self._penalty = self._penalty[1], None
            return pen / idx.shape[0]
        return super().embedding_penalty(idx)
