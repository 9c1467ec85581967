"""Seeded synthetic CTR data in Criteo Kaggle format, with a known ("oracle") click probability per row.

Hidden model (every parameter is drawn from ``seed``; rows are i.i.d.):

* 26 categorical fields C1..C26 with Criteo-like cardinalities (3 .. 1M, times ``vocab_scale``), Zipf-like
  value frequencies (frequency rank ~ truncated power law, exponent 1.1-1.3) and Criteo-like missing rates;
  every value is a distinct random 8-char hex string. 13 count fields I1..I13 are floored lognormals
  (I2 also has -1/-2 values), with 0-45% missing.
* ``logit = bias + s1 * first_order + s2 * pairwise + s3 * mlp`` where
  ``first_order`` = a weight per categorical value plus ``a_j * tanh((log1p(x_j) - c_j) / w_j)`` per count;
  ``pairwise`` = ``sum_{i<j in S} <u_i, u_j>`` over 4-d latent vectors of a subset S of fields (FM-style;
  a count's latent vector is a smooth function of ``log1p(x)``);
  ``mlp`` = a random one-hidden-layer tanh MLP over the latent vectors of four fields (higher-order term).
  A missing value is its own value, with its own weight and latent vector. With ``tail = q > 0``, in every
  field of (unscaled) cardinality >= 10,000 a value is with probability q replaced by a one-off id (unique
  in the whole data, weight and latent vector 0): the long tail of ids that occur once in real logs, which
  makes the vocabulary large at min-count 1 (about ``q * 10 * rows`` rows) without changing the signal.
  Weights and latent vectors shrink
  with the value's frequency rank r as ``(1 + r / head) ** -decay``, so rare values barely matter and the
  signal is learnable from ~1M rows. s1, s2, s3 normalise each term to a target standard deviation and the
  bias sets the mean CTR, all calibrated on a fixed seeded sample (so they do not depend on ``rows``).
* ``label ~ Bernoulli(sigmoid(logit))``. ``oracle.json`` holds the AUC / logloss of the true probabilities.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from deepfm.train.metrics import auc, logloss

CARDINALITIES = (1460, 583, 1_000_000, 400_000, 305, 24, 12_517, 633, 3, 93_145, 5_683, 800_000, 3_194, 27,
                 14_992, 600_000, 10, 5_652, 2_173, 4, 700_000, 18, 15, 286_181, 105, 142_572)
CAT_MISSING = (0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0, 0.0, 0.03, 0.0,
               0.0, 0.44, 0.44, 0.03, 0.5, 0.0, 0.03, 0.44, 0.44)
# (mu, sigma) of the log-count and the missing rate, per count field I1..I13
INT_SPECS = ((0.5, 1.2, 0.45), (1.5, 1.8, 0.0), (2.0, 1.5, 0.21), (1.8, 1.0, 0.21), (7.5, 2.0, 0.03),
             (3.5, 1.8, 0.22), (1.5, 1.5, 0.04), (2.2, 1.0, 0.001), (3.8, 1.3, 0.04), (0.3, 0.8, 0.45),
             (1.0, 1.0, 0.04), (0.2, 1.2, 0.45), (1.8, 1.0, 0.21))
# fields as ("C", i) / ("I", i), 0-based
PAIR_FIELDS = (("C", 1), ("C", 5), ("C", 8), ("C", 10), ("C", 13), ("C", 16), ("C", 22), ("C", 25), ("I", 0),
               ("I", 8))
MLP_FIELDS = (("C", 5), ("C", 13), ("C", 16), ("I", 6))
LATENT_DIM = 4
MLP_HIDDEN = 16
COMPONENT_STD = {"first_order": 1.0, "pairwise": 0.7, "mlp": 0.5}
TARGET_CTR = 0.23
RANK_HEAD, LATENT_HEAD, RANK_DECAY = 20.0, 5.0, 1.0  # shrink (1 + r / head) ** -decay, latents faster
CALIBRATION_ROWS = 100_000
TAIL_MIN_CARD = 10_000
HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


@dataclass
class _Model:
    cards: list[int]
    zipf: np.ndarray  # [26] power-law exponents
    weights: list[np.ndarray]  # per cat field [K + 1]; index K = missing
    latents: list[np.ndarray]  # per cat field [K + 1, D]
    hex_keys: np.ndarray  # [26] per-field keys of the value -> hex-id bijection
    int_first: np.ndarray  # [13, 4]: a, c, w, missing weight
    int_latent: np.ndarray  # [13, 3, D]: a, b, missing vector
    mlp: tuple[np.ndarray, np.ndarray, np.ndarray]  # W1 [H, 4D], b1 [H], w2 [H]
    scales: np.ndarray  # [3]
    bias: float


def _hex(codes: np.ndarray, key: int) -> np.ndarray:
    """[n, 8] lowercase hex ascii of a keyed bijective 32-bit mix of codes: distinct codes, distinct ids."""
    x = codes.astype(np.uint64) ^ np.uint64(key)
    for mult, shift in ((0x7FEB352D, 16), (0x846CA68B, 15)):  # lowbias32 rounds, all bijections mod 2**32
        x = ((x ^ (x >> np.uint64(shift))) * np.uint64(mult)) & np.uint64(0xFFFFFFFF)
    return HEX[(x[:, None] >> np.arange(28, -1, -4, dtype=np.uint64)) & np.uint64(0xF)]


def _build_model(rng: np.random.Generator, vocab_scale: float) -> _Model:
    cards = [max(2, int(round(k * vocab_scale))) for k in CARDINALITIES]
    zipf = rng.uniform(1.1, 1.3, size=len(cards))
    weights, latents = [], []
    for k in cards:
        ranks = np.arange(k + 1.0)
        ranks[k] = 0.0  # missing: full size
        weights.append(rng.normal(0.0, 1.0, k + 1) * (1.0 + ranks / RANK_HEAD) ** -RANK_DECAY)
        lat_shrink = (1.0 + ranks / LATENT_HEAD) ** -RANK_DECAY
        latents.append(rng.normal(0.0, 1.0, (k + 1, LATENT_DIM)) * lat_shrink[:, None])
    mu = np.array([s[0] for s in INT_SPECS])
    int_first = np.stack([rng.normal(0, 1, 13), mu + rng.normal(0, 0.5, 13), rng.uniform(0.5, 1.5, 13),
                          rng.normal(0, 1, 13)], axis=1)
    int_latent = rng.normal(0.0, 1.0, (13, 3, LATENT_DIM))
    fan_in = LATENT_DIM * len(MLP_FIELDS)
    mlp = (rng.normal(0, 2.0 / np.sqrt(fan_in), (MLP_HIDDEN, fan_in)), rng.normal(0, 0.5, MLP_HIDDEN),
           rng.normal(0, 1.0, MLP_HIDDEN))
    hex_keys = rng.integers(0, 2**32, size=len(cards), dtype=np.uint64)
    return _Model(cards, zipf, weights, latents, hex_keys, int_first, int_latent, mlp, np.ones(3), 0.0)


def _sample(model: _Model, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cat codes [26, n] (frequency rank; K = missing), counts [13, n] int64, count-missing mask [13, n]."""
    cats = np.empty((len(model.cards), n), dtype=np.int32)
    for f, (k, a) in enumerate(zip(model.cards, model.zipf, strict=True)):
        u = rng.random(n)  # inverse CDF of a power law on [1, k + 1), floored to a rank
        x = (1.0 - u * (1.0 - (k + 1.0) ** (1.0 - a))) ** (1.0 / (1.0 - a))
        cats[f] = np.minimum(x.astype(np.int64) - 1, k - 1)
        cats[f][rng.random(n) < CAT_MISSING[f]] = k
    ints = np.empty((13, n), dtype=np.int64)
    imiss = np.empty((13, n), dtype=bool)
    for j, (mu, sigma, miss) in enumerate(INT_SPECS):
        ints[j] = np.floor(np.exp(rng.normal(mu, sigma, n)) - 1.0).clip(0, 2**40)
        imiss[j] = rng.random(n) < miss
    neg = rng.random(n)
    ints[1][neg < 0.09] = -1
    ints[1][neg < 0.01] = -2
    return cats, ints, imiss


def _add_tail(model: _Model, cats: np.ndarray, tail: float, rng: np.random.Generator) -> None:
    """Replace values by one-off ids k + 1 + row (disjoint from the k head values and the missing code k)."""
    if tail <= 0:
        return
    n = cats.shape[1]
    for f, k in enumerate(model.cards):
        if CARDINALITIES[f] >= TAIL_MIN_CARD:
            hit = rng.random(n) < tail
            cats[f][hit] = k + 1 + np.flatnonzero(hit)


def _head(table: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """table[codes] with one-off tail codes (> k) reading zeros."""
    out = table[np.minimum(codes, k)]
    tail = codes > k
    if tail.any():
        out[tail] = 0
    return out


def _int_latent(model: _Model, j: int, ints: np.ndarray, imiss: np.ndarray) -> np.ndarray:
    t = np.log1p(np.maximum(ints[j], 0))
    _, c, w, _ = model.int_first[j]
    a, b, m = model.int_latent[j]
    lat = np.tanh((t - c) / w)[:, None] * a + b
    lat[imiss[j]] = m
    return lat


def _latent(model: _Model, field: tuple[str, int], cats: np.ndarray, ints: np.ndarray,
            imiss: np.ndarray) -> np.ndarray:
    kind, i = field
    return _head(model.latents[i], cats[i], model.cards[i]) if kind == "C" else _int_latent(model, i, ints, imiss)


def _components(model: _Model, cats: np.ndarray, ints: np.ndarray, imiss: np.ndarray) -> np.ndarray:
    """Unscaled [3, n] logit components: first-order, FM pairwise, MLP."""
    n = cats.shape[1]
    first = np.zeros(n)
    for f, w in enumerate(model.weights):
        first += _head(w, cats[f], model.cards[f])
    for j in range(13):
        a, c, w, m = model.int_first[j]
        first += np.where(imiss[j], m, a * np.tanh((np.log1p(np.maximum(ints[j], 0)) - c) / w))
    total, sq = np.zeros((n, LATENT_DIM)), np.zeros(n)
    for field in PAIR_FIELDS:
        lat = _latent(model, field, cats, ints, imiss)
        total += lat
        sq += (lat * lat).sum(axis=1)
    pair = 0.5 * ((total * total).sum(axis=1) - sq)
    w1, b1, w2 = model.mlp
    x = np.concatenate([_latent(model, f, cats, ints, imiss) for f in MLP_FIELDS], axis=1)
    mlp = np.tanh(x @ w1.T + b1) @ w2
    return np.stack([first, pair, mlp])


def _calibrate(model: _Model, rng: np.random.Generator) -> None:
    """Scale each component to its target std, then bisect the bias so that the mean CTR is TARGET_CTR."""
    parts = _components(model, *_sample(model, CALIBRATION_ROWS, rng))
    model.scales = np.array(list(COMPONENT_STD.values())) / parts.std(axis=1)
    z = model.scales @ parts
    z -= z.mean()
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(1.0 / (1.0 + np.exp(-(z + mid)))) < TARGET_CTR else (lo, mid)
    model.bias = float((lo + hi) / 2 - (model.scales @ parts).mean())


def _table(model: _Model, y: np.ndarray, cats: np.ndarray, ints: np.ndarray, imiss: np.ndarray) -> pa.Table:
    n = y.size
    cols = [pa.array(y.astype(np.int8))]
    cols += [pa.array(ints[j], mask=imiss[j]) for j in range(13)]
    for f, k in enumerate(model.cards):
        present = cats[f] != k
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(np.where(present, 8, 0), out=offsets[1:])
        data = _hex(cats[f][present], int(model.hex_keys[f]))
        cols.append(pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data)))
    names = ["label"] + [f"I{j}" for j in range(1, 14)] + [f"C{f}" for f in range(1, 27)]
    return pa.Table.from_arrays(cols, names=names)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def generate(out_dir: str | Path, rows: int = 1_000_000, seed: int = 0, valid_fraction: float = 0.1,
             test_fraction: float = 0.1, vocab_scale: float = 1.0, tail: float = 0.0) -> dict:
    """Write train.tsv / valid.tsv / test.tsv (Criteo Kaggle format, no header) and oracle.json to out_dir.

    Returns the oracle.json dict: seed, rows, per-split rows / ctr / oracle_auc / oracle_logloss (of the true
    click probabilities), and the generator parameters.
    """
    if rows < 1 or valid_fraction < 0 or test_fraction < 0 or valid_fraction + test_fraction >= 1:
        raise ValueError("need rows >= 1 and non-negative fractions with valid_fraction + test_fraction < 1")
    if vocab_scale <= 0:
        raise ValueError("vocab_scale must be positive")
    if not 0 <= tail <= 1:
        raise ValueError("tail must be in [0, 1]")
    if rows + max(CARDINALITIES) * vocab_scale >= 2**31 - 2:
        raise ValueError("rows + the largest cardinality must stay below 2**31")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_ss, calib_ss, data_ss = np.random.SeedSequence(seed).spawn(3)
    model = _build_model(np.random.default_rng(model_ss), vocab_scale)
    _calibrate(model, np.random.default_rng(calib_ss))

    data_rng = np.random.default_rng(data_ss)
    cats, ints, imiss = _sample(model, rows, data_rng)
    if tail > 0:
        _add_tail(model, cats, tail, np.random.default_rng(np.random.SeedSequence([seed, 7])))
    p = 1.0 / (1.0 + np.exp(-(model.bias + model.scales @ _components(model, cats, ints, imiss))))
    y = (data_rng.random(rows) < p).astype(np.int8)

    n_valid, n_test = int(round(rows * valid_fraction)), int(round(rows * test_fraction))
    bounds = {"train": (0, rows - n_valid - n_test), "valid": (rows - n_valid - n_test, rows - n_test),
              "test": (rows - n_test, rows)}
    opts = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    splits = {}
    for name, (lo, hi) in bounds.items():
        table = _table(model, y[lo:hi], cats[:, lo:hi], ints[:, lo:hi], imiss[:, lo:hi])
        _atomic_write(out / f"{name}.tsv", lambda tmp, t=table: pacsv.write_csv(t, tmp, write_options=opts))
        ys, ps = y[lo:hi], p[lo:hi]
        figures = {"ctr": float(ys.mean()) if hi > lo else None, "oracle_auc": auc(ys, ps),
                   "oracle_logloss": logloss(ys, ps)}  # None (strict JSON) where undefined, e.g. no rows
        splits[name] = {"rows": hi - lo} | {k: None if v is None or np.isnan(v) else v
                                             for k, v in figures.items()}
    oracle = {
        "seed": seed, "rows": rows, "splits": splits,
        "generator": {
            "valid_fraction": valid_fraction, "test_fraction": test_fraction, "vocab_scale": vocab_scale, "tail": tail,
            "cardinalities": model.cards, "cat_missing_rates": list(CAT_MISSING),
            "zipf_exponents": [round(float(a), 4) for a in model.zipf],
            "int_specs": [{"log_mu": m, "log_sigma": s, "missing_rate": r} for m, s, r in INT_SPECS],
            "latent_dim": LATENT_DIM, "pair_fields": [f"{k}{i + 1}" for k, i in PAIR_FIELDS],
            "mlp_fields": [f"{k}{i + 1}" for k, i in MLP_FIELDS], "mlp_hidden": MLP_HIDDEN,
            "component_std": COMPONENT_STD, "rank_head": RANK_HEAD, "latent_head": LATENT_HEAD,
            "rank_decay": RANK_DECAY,
            "target_ctr": TARGET_CTR, "bias": model.bias, "scales": model.scales.tolist(),
        },
    }
    _atomic_write(out / "oracle.json", lambda tmp: tmp.write_text(json.dumps(oracle, indent=2) + "\n"))
    return oracle
