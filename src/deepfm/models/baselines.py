"""The baselines of the DeepFM paper's Table 2 (Guo et al. 2017, Sec. 3.1 "Model Comparison") that are not a
switch of :class:`CTRModel`: FNN, IPNN, OPNN, PNN* and FM&DNN. (LR, FM, LR&DNN = ``wdl`` and DeepFM are
CTRModel kinds; ``dnn`` is FNN's network without the first-order inputs.)

Every model reads the same input, ``idx`` [B, S] int64 and ``val`` [B, S] float32, through the same fused
tables (:class:`FusedTable`: ``w`` [rows, 1] first order, ``v`` [rows, K] embeddings), which pool the slots of
multi-valued fields into their field: ``e = v(idx, val)`` is [B, F, K] with e_i = x_i v_i. The MLP is always
``dnn`` (so ``TrainConfig``'s ``net_l2`` applies to it) and returns [B]; ``b`` is the scalar ``bias``.

- fnn:     logit = b + MLP([x_i w_i, e_i]_{i=1..F})                            (Zhang et al. 2016, z_i = (w_i, v_i))
- ipnn:    logit = b + MLP([e_1..e_F, <e_i, e_j>_{i<j}])                       (Qu et al. 2016, inner product)
- opnn:    logit = b + MLP([e_1..e_F, vec(f f^T)]), f = sum_i e_i              (outer product, sum pooling)
- pnnstar: logit = b + MLP([e_1..e_F, <e_i, e_j>_{i<j}, vec(f f^T)])           (PNN*: both)
- fmdnn:   logit = b + sum_i x_i w_i + sum_{i<j} <x_i v_i, x_j v_j> + MLP([x_i u_i]_{i=1..F}), u a SECOND table

Each subclass says what its MLP reads (``DNN_INPUT``, or ``dnn_input(e)`` from the pooled outputs of its
tables) and which terms the logit has (``BLOCKS``, ``FIRST_ORDER_TERM``); ``CTRModel.head`` adds them, for
``forward``, the ONNX export (serve/export.py) and the numpy fast path alike.
"""

from __future__ import annotations

import torch

from deepfm.layout import FieldSpec
from deepfm.models.ctr import CTRModel, ModelConfig
from deepfm.models.layers import FusedTable, InnerProducts, outer_product_sum


class Baseline(CTRModel):
    """CTRModel's blocks (``bias``, ``w`` if ``BLOCKS[0]``, ``v``, ``dnn`` of width ``dnn_width``), chosen by the
    class rather than by ``cfg.model``; the logit is ``CTRModel.head``'s."""

    BLOCKS: tuple[bool, bool, bool] = (False, False, True)  # (first-order table, FM term, MLP)

    def blocks(self, cfg: ModelConfig) -> tuple[bool, bool, bool]:
        return self.BLOCKS


class FNN(Baseline):
    """FNN (Zhang et al. 2016): an MLP over the dense vectors z_i = (w_i, v_i) of the fields, i.e. each
    field's first-order weight and its embedding (times the value), which FM pre-training initialises
    (:func:`init_from_fm`). logit = b + MLP(concat_i [x_i w_i, x_i v_i]); MLP input F*(K+1).

    Zhang et al. also feed the FM's global bias w_0 as a constant input, which only shifts the first layer's
    bias; it is left out here (``init_from_fm`` copies it into ``b`` instead). Without pre-training this is
    the ``dnn`` kind plus the first-order inputs."""

    BLOCKS = (True, False, True)
    DNN_INPUT = ("w", "v")  # [B, F, 1 + K]: (x_i w_i, x_i v_i) per field
    FIRST_ORDER_TERM = False

    def dnn_width(self, fields: list[FieldSpec]) -> int:
        return len(fields) * (self.cfg.embed_dim + 1)


class PNN(Baseline):
    """PNN (Qu et al. 2016) as the DeepFM paper describes it (Sec. 2.2, Fig. 5): a product layer between the
    embeddings and the first hidden layer. The MLP input is the concatenation of
      z = (e_1, ..., e_F)                                  [B, F*K]        (the "linear signals")
      p_inner = (<e_i, e_j>)_{i<j}                         [B, F(F-1)/2]   (IPNN, PNN*)
      p_outer = vec(f f^T), f = sum_i e_i                  [B, K*K]        (OPNN, PNN*)
    and the MLP's first Linear is the product layer's l_1 = W_z z + W_p p + b_1 (followed by the
    activation), with full weight matrices: the exact inner products, not Qu et al.'s rank-1 approximation of
    W_p; the outer products with their sum-pooling trick (sum_i sum_j e_i e_j^T = f f^T, all ordered pairs
    and i = j included), which is the "compressed" outer product the DeepFM paper (Sec. 2.2) evaluates.
    logit = b + MLP([z, p]). No first-order term: PNNs model no low-order interactions (paper Sec. 2.2)."""

    INNER = OUTER = False

    def __init__(self, fields: list[FieldSpec], cfg: ModelConfig) -> None:
        super().__init__(fields, cfg)
        self.inner = InnerProducts(len(fields)) if self.INNER else None

    def dnn_width(self, fields: list[FieldSpec]) -> int:
        f, k = len(fields), self.cfg.embed_dim
        return f * k + (f * (f - 1) // 2 if self.INNER else 0) + (k * k if self.OUTER else 0)

    def product_layer(self, e: torch.Tensor) -> torch.Tensor:
        """[B, F, K] -> [B, dnn_width]: [z, p_inner?, p_outer?]."""
        parts = [e.flatten(1)]
        if self.inner is not None:
            parts.append(self.inner(e))
        if self.OUTER:
            parts.append(outer_product_sum(e))
        return torch.cat(parts, dim=1)

    def dnn_input(self, e: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.product_layer(e["v"])


class IPNN(PNN):
    """PNN with the inner product layer; the paper's default activation is tanh (ModelConfig MODEL_DEFAULTS)."""

    INNER = True


class OPNN(PNN):
    """PNN with the (sum-pooled) outer product layer."""

    OUTER = True


class PNNStar(PNN):
    """PNN*: inner and outer products, concatenated."""

    INNER = OUTER = True


class FMDNN(Baseline):
    """FM&DNN, the paper's Wide & Deep variant with FM as the wide part (Sec. 3.1 "Model Comparison"): FM and
    DNN trained jointly (one loss, one logit) but WITHOUT a shared embedding, which is what DeepFM adds
    (Sec. 2.2, "Wide & Deep": "DeepFM shares the feature embedding between the FM and deep component").

      logit = b + sum_i x_i w_i + sum_{i<j} <x_i v_i, x_j v_j> + MLP(concat_i x_i u_i)

    ``w`` [rows, 1] and ``v`` [rows, K] are the FM's tables (first order and latent vectors, paper eq. 2);
    ``v_dnn`` [rows, K] (u above) is the DNN's own embedding table, with the same rows and slot offsets."""

    BLOCKS = (True, True, True)
    DNN_INPUT = ("v_dnn",)

    def __init__(self, fields: list[FieldSpec], cfg: ModelConfig) -> None:
        super().__init__(fields, cfg)
        self.v_dnn = FusedTable(fields, cfg.embed_dim, std=cfg.init_std)


BASELINE_CLASSES: dict[str, type[Baseline]] = {"fnn": FNN, "ipnn": IPNN, "opnn": OPNN, "pnnstar": PNNStar,
                                               "fmdnn": FMDNN}


@torch.no_grad()
def init_from_fm(fnn: FNN, fm: CTRModel) -> FNN:
    """FNN's FM pre-training (Zhang et al. 2016): copy a trained FM's first-order weights ``w`` and latent
    vectors ``v`` into ``fnn``'s (z_i = (w_i, v_i) starts at the FM's), and its global bias into ``fnn.bias``.
    ``fm``: any model with an FM term and its own ``w`` and ``v`` (normally an ``fm``) on the same fields and
    embedding size. The MLP keeps its random initialisation. Returns ``fnn``."""
    if not isinstance(fnn, FNN):
        raise TypeError(f"init_from_fm initialises an fnn model, got {type(fnn).__name__}")
    if not fm.use_fm or fm.w is None or fm.v is None:
        raise ValueError(f"init_from_fm needs a model with an FM term (an fm), got a {fm.cfg.model}")
    for name in ("w", "v"):
        src, dst = getattr(fm, name), getattr(fnn, name)
        if src.weight.shape != dst.weight.shape or not torch.equal(src.slot_offsets, dst.slot_offsets):
            raise ValueError(f"init_from_fm: the models' {name} tables differ ({tuple(src.weight.shape)} vs "
                             f"{tuple(dst.weight.shape)}): same fields and embed_dim needed")
        dst.weight.copy_(src.weight)
    fnn.bias.copy_(fm.bias)
    return fnn
