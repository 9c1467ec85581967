"""What a trained model learned, per field and per field pair: the FM interaction map and field importances.

With e_i = x_i v_i the pooled embedding of field i (``model.v(idx, val)``, [B, F, K]: a numeric field's value
times its vector, a multi-valued field's slots summed with their pooling weights) and w_i x_i its pooled
first-order term (``model.w(idx, val)``), over the N rows of the data:

- interaction map  M[i, j] = mean_rows |<e_i, e_j>|                    for i != j, M[i, i] = 0      [F, F]
  (the size of each pairwise term of the FM part, paper eq. 2; the terms are signed, the map is not);
- first order      I1[i]   = mean_rows |w_i x_i|                                                    [F]
  (only where the logit adds the first-order term: lr, fm, deepfm, wdl, fmdnn; not fnn, whose MLP reads it);
- FM               I2[i]   = mean_rows |sum_{j != i} <e_i, e_j>| = mean_rows |<e_i, sum_j e_j - e_i>|  [F]
  (field i's share of the FM term: sum_i of the signed values is twice the FM term);
- permutation      P[i]    = AUC(data) - AUC(data with field i's column shuffled across rows)        [F]
  through the whole model (DNN included), on a seeded uniform sample of up to ``--permutation-rows``
  labelled rows; a multi-valued field's slots move together as one column (whole rows of its slots).

The interaction map and I2 need an FM part (``use_fm`` and a ``v`` table: fm, deepfm, fmdnn); for the other
kinds ``interaction_map`` raises DeepFMError, and ``deepfm explain`` writes the importances it can (first
order, permutation) with a note instead of the map. For deepfm, I2 and M describe the FM part only: what
the DNN does with the same embeddings shows in P.

CLI: ``deepfm explain BUNDLE DATA --out DIR`` (deepfm.commands.explain). Python::

    from deepfm.explain import interaction_map, field_importance
    m = interaction_map(bundle.model, Batcher(enc, fields), fields)        # [F, F]
    imp = field_importance(bundle.model, Batcher(enc, fields), fields)     # {"first_order": [F], ...}
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfm.data.store import Batcher, FieldSpec
from deepfm.errors import DeepFMError
from deepfm.models.ctr import CTRModel
from deepfm.train.metrics import auc

# kinds whose logit has an FM part (pairwise <e_i, e_j> over the ``v`` table); for the docs and messages
FM_KINDS = ("fm", "deepfm", "fmdnn")
# rows per Gram-matrix chunk: [B, F, F] float32 stays about 64 MB whatever F
GRAM_ELEMENTS = 1 << 24

Data = Batcher | tuple[Any, ...]


def has_fm(model: CTRModel) -> bool:
    """True when the model's logit has the FM term sum_{i<j} <e_i, e_j> over its ``v`` table."""
    return bool(getattr(model, "use_fm", False)) and getattr(model, "v", None) is not None


def has_first_order(model: CTRModel) -> bool:
    """True when the logit adds sum_i w_i x_i directly (FNN feeds w_i x_i to its MLP instead)."""
    return getattr(model, "w", None) is not None and bool(getattr(model, "FIRST_ORDER_TERM", False))


def _table(model: CTRModel):
    tables = model.tables()
    if not tables:
        raise DeepFMError(f"model kind {model.cfg.model!r} has no embedding table")
    return next(iter(tables.values()))


def n_fields(model: CTRModel) -> int:
    return _table(model).n_fields


def field_names(model: CTRModel, fields: Sequence[FieldSpec | str] | None) -> list[str]:
    """Names of the model's F fields (``fields``: FieldSpecs in layout order, or names; None: f0, f1, ...)."""
    f = n_fields(model)
    if fields is None:
        return [f"f{i}" for i in range(f)]
    names = [x.name if isinstance(x, FieldSpec) else str(x) for x in fields]
    if len(names) != f:
        raise DeepFMError(f"{len(names)} field names for a model of {f} fields")
    return names


def _as_tensor(a: Any, dtype: torch.dtype) -> torch.Tensor:
    return a.to(dtype) if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def _batches(data: Data, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(idx [B, S] int64, val [B, S] float32, y [B] or None) chunks of a Batcher or of (idx, val[, y]) arrays."""
    if isinstance(data, tuple):
        idx, val = _as_tensor(data[0], torch.int64), _as_tensor(data[1], torch.float32)
        y = _as_tensor(data[2], torch.float32) if len(data) > 2 and data[2] is not None else None
        for s in range(0, idx.shape[0], batch_size):
            yield idx[s: s + batch_size], val[s: s + batch_size], None if y is None else y[s: s + batch_size]
        return
    for s in range(0, data.rows, batch_size):
        yield data(slice(s, min(data.rows, s + batch_size)))


def _gram_batch(f: int) -> int:
    return max(256, GRAM_ELEMENTS // max(1, f * f))


# ------------------------------------------------------------------------------------------- accumulation
class Accumulator:
    """Running sums of the row-mean statistics (interaction map, first-order and FM importance), fed batch
    by batch, so a file of any size streams through in blocks.

    update(idx [B, S] int64, val [B, S] float32); then ``interactions()`` [F, F], ``first_order()`` [F],
    ``fm()`` [F] (each None where the model lacks that part)."""

    def __init__(self, model: CTRModel) -> None:
        self.model = model
        self.f = n_fields(model)
        self.fm_part, self.first = has_fm(model), has_first_order(model)
        self.rows = 0
        self.pair = np.zeros((self.f, self.f))  # float64 sums: float32 would lose digits over millions of rows
        self.fm_sum = np.zeros(self.f)
        self.first_sum = np.zeros(self.f)

    @torch.no_grad()
    def update(self, idx: torch.Tensor, val: torch.Tensor) -> None:
        step = _gram_batch(self.f)
        for s in range(0, idx.shape[0], step):
            i, v = idx[s: s + step], val[s: s + step]
            tables = self.model.embed(i, v)  # {table: [B, F, dim]} exactly as the model computes them
            if self.fm_part:
                e = tables["v"].float()  # [B, F, K]
                gram = torch.bmm(e, e.transpose(1, 2))  # [B, F, F]: <e_i, e_j>
                self.pair += gram.abs().sum(0).double().numpy()
                others = (e * (e.sum(1, keepdim=True) - e)).sum(-1)  # [B, F]: <e_i, sum_{j != i} e_j>
                self.fm_sum += others.abs().sum(0).double().numpy()
            if self.first:
                self.first_sum += tables["w"].float()[..., 0].abs().sum(0).double().numpy()
            self.rows += i.shape[0]

    def _mean(self, total: np.ndarray) -> np.ndarray:
        if self.rows == 0:
            raise DeepFMError("no rows to explain")
        return total / self.rows

    def interactions(self) -> np.ndarray | None:
        if not self.fm_part:
            return None
        m = self._mean(self.pair)
        np.fill_diagonal(m, 0.0)  # |<e_i, e_i>| is no pair term of the FM
        return m

    def fm(self) -> np.ndarray | None:
        return self._mean(self.fm_sum) if self.fm_part else None

    def first_order(self) -> np.ndarray | None:
        return self._mean(self.first_sum) if self.first else None


def _no_fm(model: CTRModel) -> DeepFMError:
    return DeepFMError(f"the interaction map is defined for models with an FM part ({', '.join(FM_KINDS)}); "
                       f"model kind {model.cfg.model!r} has no <e_i, e_j> terms (its field importance by "
                       "permutation is still available: field_importance / deepfm explain)")


def interaction_map(model: CTRModel, data: Data, fields: Sequence[FieldSpec | str] | None = None,
                    batch_size: int = 65536) -> np.ndarray:
    """float64 [F, F]: M[i, j] = mean over the rows of |<e_i, e_j>| (e_i = x_i v_i), symmetric, zero diagonal.

    data: a Batcher, or (idx [N, S] int64, val [N, S] float32) arrays/tensors. fields: checks F (optional).
    Raises DeepFMError for a model without an FM part."""
    if not has_fm(model):
        raise _no_fm(model)
    field_names(model, fields)
    acc = Accumulator(model)
    for idx, val, _ in _batches(data, batch_size):
        acc.update(idx, val)
    out = acc.interactions()
    assert out is not None
    return out


# ------------------------------------------------------------------------------------------- permutation
@torch.no_grad()
def _logits(model: CTRModel, idx: torch.Tensor, val: torch.Tensor, batch_size: int) -> np.ndarray:
    out = np.empty(idx.shape[0], dtype=np.float32)
    for s in range(0, idx.shape[0], batch_size):
        out[s: s + batch_size] = model(idx[s: s + batch_size], val[s: s + batch_size]).float().numpy()
    return out


def field_slots(model: CTRModel) -> list[np.ndarray]:
    """Per field, its input slot columns (one, or ``max_len`` for a multi-valued field)."""
    slot_field = _table(model).slot_field.numpy()
    return [np.flatnonzero(slot_field == i) for i in range(n_fields(model))]


def permutation_importance(model: CTRModel, idx: Any, val: Any, y: Any, repeats: int = 1, seed: int = 0,
                           batch_size: int = 65536) -> tuple[float, np.ndarray]:
    """(AUC of the model on the rows, AUC drops float64 [repeats, F]): for each field, its slot columns are
    permuted across rows (all of a multi-valued field's slots with the same permutation) and the rows are
    scored again: one batched forward pass per field and repeat. idx [N, S] int64, val [N, S] float32,
    y [N] in {0, 1}; idx and val are modified while scoring and restored. Seeded: the same seed, the same
    permutations."""
    idx, val = _as_tensor(idx, torch.int64), _as_tensor(val, torch.float32)
    y = np.asarray(y, dtype=np.float64)
    if np.unique(y).size < 2:
        raise DeepFMError("permutation importance needs both labels (0 and 1) among the sampled rows")
    was_training = model.training
    model.eval()
    try:
        base = auc(y, _logits(model, idx, val, batch_size))
        rng = np.random.default_rng(seed)
        slots = field_slots(model)
        drops = np.zeros((repeats, len(slots)))
        for r in range(repeats):
            for i, cols in enumerate(slots):
                perm = torch.from_numpy(rng.permutation(idx.shape[0]))
                c = torch.from_numpy(cols)
                keep_i, keep_v = idx[:, c], val[:, c]  # copies: restored after scoring (no full-table clone)
                # idx and val move together: a numeric value keeps its missing flag, a pooled field its weights
                idx[:, c], val[:, c] = keep_i[perm], keep_v[perm]
                try:
                    drops[r, i] = base - auc(y, _logits(model, idx, val, batch_size))
                finally:
                    idx[:, c], val[:, c] = keep_i, keep_v
    finally:
        model.train(was_training)
    return float(base), drops


def field_importance(model: CTRModel, data: Data, fields: Sequence[FieldSpec | str] | None = None,
                     permutation_rows: int = 100_000, repeats: int = 1, seed: int = 0,
                     batch_size: int = 65536) -> dict[str, Any]:
    """Per-field importances (float64 [F] arrays; None where not defined):

    first_order: mean |w_i x_i|; fm: mean |sum_{j != i} <e_i, e_j>|; permutation: mean AUC drop over
    ``repeats`` shuffles of the field (on a seeded sample of up to ``permutation_rows`` rows; needs labels:
    a Batcher over labelled data, or (idx, val, y)); permutation_std; base_auc; fields (names).
    """
    names = field_names(model, fields)
    acc = Accumulator(model)
    for idx, val, _ in _batches(data, batch_size):
        acc.update(idx, val)
    out: dict[str, Any] = {"fields": names, "first_order": acc.first_order(), "fm": acc.fm(),
                           "permutation": None, "permutation_std": None, "base_auc": None}
    sample = _sample(data, permutation_rows, seed)
    if sample is not None:
        base, drops = permutation_importance(model, *sample, repeats=repeats, seed=seed, batch_size=batch_size)
        out.update(base_auc=base, permutation=drops.mean(0), permutation_std=drops.std(0))
    return out


def _sample(data: Data, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray] | None:
    """A seeded uniform sample of up to n labelled rows of ``data``, or None when it has no labels."""
    if n <= 0:
        return None
    if isinstance(data, tuple):
        if len(data) < 3 or data[2] is None:
            return None
        idx, val, y = _as_tensor(data[0], torch.int64), _as_tensor(data[1], torch.float32), np.asarray(data[2])
        rows = np.sort(np.random.default_rng(seed).permutation(idx.shape[0])[:n])
        return idx[rows], val[rows], y[rows]
    if data.labels() is None:
        return None
    rows = np.sort(np.random.default_rng(seed).permutation(data.rows)[:n])
    idx, val, y = data(rows)
    return idx, val, y.numpy()


class Reservoir:
    """A uniform sample without replacement of up to n rows of a stream of blocks (each row keeps the
    smallest n of seeded random keys), for permutation importance over files larger than memory."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.rng = n, np.random.default_rng(seed)
        self.keys = np.empty(0)
        self.parts: tuple[torch.Tensor, torch.Tensor, np.ndarray] | None = None

    def add(self, idx: torch.Tensor, val: torch.Tensor, y: np.ndarray) -> None:
        keys = np.concatenate([self.keys, self.rng.random(idx.shape[0])])
        if self.parts is not None:
            idx, val, y = (torch.cat([self.parts[0], idx]), torch.cat([self.parts[1], val]),
                           np.concatenate([self.parts[2], y]))
        if keys.size > self.n:
            keep = torch.from_numpy(np.sort(np.argpartition(keys, self.n - 1)[: self.n]))
            keys, idx, val, y = keys[keep.numpy()], idx[keep], val[keep], y[keep.numpy()]
        self.keys, self.parts = keys, (idx, val, y)


# ------------------------------------------------------------------------------------------- files + plots
@dataclass
class Explanation:
    """Everything ``deepfm explain`` computes (what explain.json holds)."""

    fields: list[str]
    kinds: list[str]
    model: str
    rows: int
    interactions: np.ndarray | None
    first_order: np.ndarray | None
    fm: np.ndarray | None
    permutation: np.ndarray | None = None
    permutation_std: np.ndarray | None = None
    base_auc: float | None = None
    permutation_rows: int = 0
    notes: list[str] = field(default_factory=list)

    def top_pairs(self, k: int = 10) -> list[tuple[str, str, float]]:
        if self.interactions is None:
            return []
        i, j = np.triu_indices(len(self.fields), 1)
        v = self.interactions[i, j]
        order = np.argsort(-v, kind="stable")[:k]
        return [(self.fields[i[o]], self.fields[j[o]], float(v[o])) for o in order]

    def to_dict(self) -> dict[str, Any]:
        def arr(a: np.ndarray | None) -> Any:
            return None if a is None else _jsonable(a.tolist())

        return {"model": self.model, "rows": self.rows, "fields": self.fields, "kinds": self.kinds,
                "interactions": arr(self.interactions), "top_pairs": [list(p) for p in self.top_pairs(20)],
                "importance": {"first_order": arr(self.first_order), "fm": arr(self.fm),
                               "permutation_auc_drop": arr(self.permutation),
                               "permutation_std": arr(self.permutation_std)},
                "base_auc": _jsonable(self.base_auc), "permutation_rows": self.permutation_rows,
                "notes": self.notes}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DeepFMError("plots need matplotlib: pip install 'deepfm[report]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(m: np.ndarray, names: list[str], path: Path, title: str) -> None:
    """F x F heatmap with field names on both axes and a colorbar (diagonal greyed out: no pair term)."""
    plt = _pyplot()
    f = len(names)
    side = max(6.0, 0.26 * f + 3.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    masked = np.ma.masked_where(np.eye(f, dtype=bool), m)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    im = ax.imshow(masked, cmap=cmap, interpolation="nearest")
    font = 10 if f <= 20 else 8 if f <= 45 else 6
    ax.set_xticks(range(f), names, rotation=90, fontsize=font)
    ax.set_yticks(range(f), names, fontsize=font)
    ax.set_xlabel("field j")
    ax.set_ylabel("field i")
    ax.set_title(title, fontsize=11)
    if f <= 12:  # small maps: the values too
        hi = float(m.max()) or 1.0
        for a in range(f):
            for b in range(f):
                if a != b:
                    ax.text(b, a, f"{m[a, b]:.2g}", ha="center", va="center", fontsize=8,
                            color="white" if m[a, b] < 0.6 * hi else "black")
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label("mean |<e_i, e_j>|")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_importance(ex: Explanation, path: Path) -> None:
    """One horizontal bar panel per computed importance (permutation, FM, first order), the fields in one
    order (by the first panel's measure, largest on top) so the panels line up."""
    plt = _pyplot()
    panels = [(name, v, err) for name, v, err in (
        ("permutation: AUC drop", ex.permutation, ex.permutation_std),
        ("FM: mean |sum_j<e_i, e_j>|", ex.fm, None),
        ("first order: mean |w_i x_i|", ex.first_order, None)) if v is not None]
    f = len(ex.fields)
    order = np.argsort(panels[0][1], kind="stable")  # ascending: the largest ends on top
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.5, max(3.5, 0.24 * f + 1.5)),
                             sharey=True, squeeze=False)
    font = 10 if f <= 20 else 8 if f <= 45 else 6
    for ax, (title, v, err) in zip(axes[0], panels, strict=True):
        xerr = err[order] if err is not None and np.any(err > 0) else None
        ax.barh(range(f), v[order], xerr=xerr, color="#4c72b0")
        ax.set_title(title, fontsize=10)
        ax.axvline(0, color="black", lw=0.6)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(f), [ex.fields[i] for i in order], fontsize=font)
    axes[0][0].set_ylim(-0.6, f - 0.4)
    fig.suptitle(f"{ex.model}: field importance over {ex.rows:,} rows", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(ex: Explanation, out: Path) -> list[Path]:
    """interactions.csv + interactions.png (FM models), importance.csv + importance.png, explain.json."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if ex.interactions is not None:
        with open(out / "interactions.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["field_i", "field_j", "mean_abs"])
            for a, b, v in ex.top_pairs(len(ex.fields) ** 2):  # every pair i < j, largest first
                w.writerow([a, b, f"{v:.6g}"])
        plot_heatmap(ex.interactions, ex.fields, out / "interactions.png",
                     f"{ex.model} FM interactions: mean |<e_i, e_j>| over {ex.rows:,} rows")
        written += [out / "interactions.csv", out / "interactions.png"]
    cols = {"first_order": ex.first_order, "fm": ex.fm, "permutation_auc_drop": ex.permutation,
            "permutation_std": ex.permutation_std}
    cols = {k: v for k, v in cols.items() if v is not None}
    with open(out / "importance.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["field", "kind", *cols])
        for i, (name, kind) in enumerate(zip(ex.fields, ex.kinds, strict=True)):
            w.writerow([name, kind, *(f"{v[i]:.6g}" for v in cols.values())])
    written.append(out / "importance.csv")
    if any(k != "permutation_std" for k in cols):
        plot_importance(ex, out / "importance.png")
        written.append(out / "importance.png")
    (out / "explain.json").write_text(json.dumps(ex.to_dict(), indent=1))
    written.append(out / "explain.json")
    return written


def explain_file(bundle: str | Path, data: str | Path, fmt: str | None = None, rows: int | None = None,
                 permutation_rows: int = 100_000, repeats: int = 1, seed: int = 0, on_bad_rows: str = "error",
                 threads: int = 0, block_bytes: int = 16 << 20) -> Explanation:
    """Stream DATA through a bundle's preprocessing in blocks (as ``Predictor.iter_file``): accumulate the
    row means over the first ``rows`` rows (all by default) and keep a seeded uniform sample of up to
    ``permutation_rows`` of them for the permutation importance."""
    from deepfm.data import readers
    from deepfm.serve.predictor import Predictor

    pred = Predictor(bundle, threads=threads)
    model, fields = pred.bundle.model.eval(), pred.fields
    fmt = pred.read_format(data, fmt)
    acc = Accumulator(model)
    reservoir = Reservoir(permutation_rows, seed) if permutation_rows > 0 else None
    labelled = True
    for block in readers.iter_read(data, fmt, pred.pre.schema, on_bad_rows, block_bytes=block_bytes):
        take = block.rows if rows is None else min(block.rows, rows - acc.rows)
        enc = pred.pre.transform(block)
        b = Batcher(enc, fields)
        labelled = labelled and enc.label is not None
        for s in range(0, take, 65536):
            idx, val, y = b(slice(s, min(take, s + 65536)))
            acc.update(idx, val)
            if reservoir is not None and labelled and y is not None:
                reservoir.add(idx, val, y.numpy())
        if rows is not None and acc.rows >= rows:
            break
    if acc.rows == 0:
        raise DeepFMError(f"{data}: no rows to explain")
    ex = Explanation(fields=[f.name for f in fields], kinds=[f.kind for f in fields], model=model.cfg.model,
                     rows=acc.rows, interactions=acc.interactions(), first_order=acc.first_order(), fm=acc.fm())
    if not has_fm(model):
        ex.notes.append(f"model kind {model.cfg.model!r} has no FM part (only {', '.join(FM_KINDS)} do): "
                        "no interaction map and no FM importance")
    if not has_first_order(model):
        ex.notes.append(f"model kind {model.cfg.model!r} adds no first-order term w_i x_i to its logit: "
                        "no first-order importance")
    if reservoir is None:
        ex.notes.append("permutation importance skipped (--permutation-rows 0)")
    elif not labelled:
        ex.notes.append(f"{data} has no label column: permutation importance (an AUC drop) skipped")
    elif reservoir.parts is not None:
        idx, val, y = reservoir.parts
        if np.unique(y).size < 2:
            ex.notes.append("the sampled rows have a single label: permutation importance skipped")
        else:
            ex.base_auc, drops = permutation_importance(model, idx, val, y, repeats=repeats, seed=seed)
            ex.permutation, ex.permutation_std = drops.mean(0), drops.std(0)
            ex.permutation_rows = int(idx.shape[0])
    if ex.first_order is None and ex.fm is None and ex.permutation is None:
        raise DeepFMError(f"nothing to explain: model kind {model.cfg.model!r} has no FM part and no first-order "
                          "term, and the permutation importance needs labelled data " + "; ".join(ex.notes))
    return ex
