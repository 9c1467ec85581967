"""The quality harness (issue 15): deepfm's presets against LR, FM and the peers' DeepFM on every data set
held here, over several seeds, with one split protocol per set. Writes docs/quality.md.

    python scripts/quality.py --seeds 3 --out docs/quality.md            # every set, deepfm + LR + FM
    python scripts/quality.py --sets criteo,avazu --candidates default,lr --seeds 3
    python scripts/quality.py --peers deepctr,torchfm                    # + the peers (benchmarks/.peers-venv)
    python scripts/quality.py --synth-1m                                 # + deepfm synth at 1M rows (slow)

Protocol (scripts/datasets.py): each set has a fixed test split (the file the set ships, or a seeded 80/20
split of its one file, seed 2017); validation is the synthetic set's valid file or a 10% split of train
drawn with the run's seed. Every choice (early stopping, the kept epoch) is made on validation; test is
only reported. Seeds 1..N change the validation split, the initialisation, the order and dropout.

Every finished run is appended to a JSONL cache (``--cache``), keyed by set, candidate, its overrides and
the seed, so a rerun trains only what is missing. ``--levers`` reports validation metrics of the lever
candidates (LEVERS below) instead of writing the doc: the choice of defaults is made from that table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import datasets  # noqa: E402

from deepfm import outputs, pipeline  # noqa: E402
from deepfm.data import readers  # noqa: E402
from deepfm.utils import digest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PEER_PY = REPO / "benchmarks" / ".peers-venv" / "bin" / "python"
PEER_RUNNER = REPO / "benchmarks" / "peers" / "quality_peer.py"
# name -> (preset, overrides). LR and FM use the default preset with only the model swapped.
CANDIDATES: dict[str, tuple[str, list[str]]] = {
    "default": ("default", []),
    "paper": ("paper", []),
    "lr": ("default", ["model.model=lr"]),
    "fm": ("default", ["model.model=fm"]),
}


def opts(base: list[str], *extra: str) -> list[str]:
    """``base`` overrides with ``extra`` ones replacing the same keys."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [o for o in base if o.split("=", 1)[0] not in keys] + list(extra)


# The levers measured for the default preset (validation metrics; see docs/quality.md), each spelled out in full
# on top of the default preset, so that a later change of the preset does not change what a lever means.
# OLD = the default preset before issue 15 (batch norm on at every size, no wide start).
OLD = ["train.evals_per_epoch=1", "model.init_std=1.0e-4", "model.embedding_l2=1.0e-3", "model.batch_norm=true",
       "train.wide_start=false", "train.wide_lr_scale=1.0", "model.embed_dim=10", "model.hidden=[400,400,400]",
       "model.net_l2=0.0", "train.reduce_lr_on_plateau=false"]
NOBN = opts(OLD, "model.batch_norm=false")
LEVERS: dict[str, tuple[str, list[str]]] = {
    "old-default": ("default", OLD),
    "nobn": ("default", NOBN),
    "nobn-e4": ("default", opts(NOBN, "train.evals_per_epoch=4")),
    "nobn-init-l2": ("default", opts(NOBN, "model.init_std=1.0e-2", "model.embedding_l2=1.0e-2")),
    "nobn-e4-init-l2": ("default", opts(NOBN, "train.evals_per_epoch=4", "model.init_std=1.0e-2",
                                        "model.embedding_l2=1.0e-2")),
    "nobn-d0.5": ("default", opts(NOBN, "model.dropout=0.5")),
    "nobn-h200": ("default", opts(NOBN, "model.hidden=[200,200]")),
    "nobn-lr3e-3": ("default", opts(NOBN, "train.lr=3.0e-3")),
    "nobn-bs512": ("default", opts(NOBN, "train.batch_size=512")),
    "nobn-w10": ("default", opts(NOBN, "train.wide_lr_scale=10")),
    "nobn-w30": ("default", opts(NOBN, "train.wide_lr_scale=30")),
    "ws": ("default", opts(NOBN, "train.wide_start=true")),
    "ws-e4": ("default", opts(NOBN, "train.wide_start=true", "train.evals_per_epoch=4")),
    "bn-bs2048": ("default", opts(OLD, "train.batch_size=2048")),
    "bn-init1e-2": ("default", opts(OLD, "model.init_std=1.0e-2")),
    "bn-bs2048-init1e-2": ("default", opts(OLD, "train.batch_size=2048", "model.init_std=1.0e-2")),
    "bn-e16": ("default", opts(OLD, "model.embed_dim=16")),
    "bn-l2e-2": ("default", opts(OLD, "model.embedding_l2=1.0e-2")),
    "bn-netl2e-3": ("default", opts(OLD, "model.net_l2=1.0e-3")),
    "bn-l2e-2-init1e-2": ("default", opts(OLD, "model.embedding_l2=1.0e-2", "model.init_std=1.0e-2")),
    "lr": ("default", ["model.model=lr"]),
    "lr-lr1e-2": ("default", ["model.model=lr", "train.lr=1.0e-2"]),
    "fm-w10": ("default", ["model.model=fm", "train.wide_lr_scale=10", "train.wide_start=false"]),
}
PEER_NAMES = {"deepctr": "DeepCTR-Torch DeepFM", "torchfm": "pytorch-fm DeepFM", "rechub": "torch-rechub DeepFM",
              "fuxictr": "FuxiCTR DeepFM"}
NAMES = {"default": "deepfm default", "paper": "deepfm paper", "lr": "LR", "fm": "FM"}


def key_of(ds: str, name: str, preset: str, overrides: list[str], seed: int, extra: str = "") -> str:
    return json.dumps([ds, name, preset, sorted(overrides), seed, extra])


def config_digest(preset: str, overrides: list[str]) -> str:
    """What a deepfm run trains, resolved (preset file + overrides): the cache key, so that a run is reused
    by every candidate with the same configuration and redone when a preset file changes."""
    m, t = pipeline.resolve_config(preset, overrides)
    return digest({"model": dataclasses.asdict(m), "train": dataclasses.asdict(t)})


def deepfm_key(ds: str, preset: str, overrides: list[str], seed: int) -> str:
    return json.dumps([ds, "deepfm-config", config_digest(preset, overrides), seed])


def load_cache(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                out[rec["key"]] = rec
            except (ValueError, KeyError):
                continue
    return out


def append_cache(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


_PREP: dict[tuple[str, int, int | None], Any] = {}
MIN_COUNT: int | None = None  # --min-count: every field's min_count (None: each format's default schema)


def schema_for(ds: dict) -> Any:
    """The set's default schema with every field's min_count set to MIN_COUNT (None: the default schema)."""
    if MIN_COUNT is None:
        return None
    s = readers.default_schema(ds["fmt"])
    if s is None:  # libfm: one field per token position
        with open(ds["train"]) as fh:
            s = readers.libfm_schema(len(fh.readline().split()) - 1)
    return s.with_overrides(min_count=MIN_COUNT)


def prepared(ds: dict, seed: int) -> tuple[Any, Any]:
    """(Prepared, encoded test) of a set for a seed (the validation split depends on the seed)."""
    k = (ds["name"], seed, MIN_COUNT)
    if k not in _PREP:
        _PREP.clear()  # one set/seed at a time in memory
        prep = pipeline.prepare(ds["train"], ds["fmt"], schema_for(ds), ds["valid"], seed=seed)
        _PREP[k] = (prep, pipeline.encode_file(ds["test"], ds["fmt"], prep.pre))
    return _PREP[k]


def run_deepfm(ds: dict, preset: str, overrides: list[str], seed: int, threads: int) -> dict[str, Any]:
    model_cfg, train_cfg = pipeline.resolve_config(preset, overrides + [f"train.threads={threads}"], seed=seed)
    prep, test = prepared(ds, seed)
    t0 = time.perf_counter()
    _, res = pipeline.train(prep, model_cfg, train_cfg, test=test, progress=False)
    hist = res["training"]["history"]
    rows_s = [h["train_rows_per_s"] for h in hist if "train_rows_per_s" in h]
    return {"test": res["metrics"]["test"], "valid": res["metrics"].get("valid", {}),
            "epochs": len(hist), "best_epoch": res["training"].get("best_epoch"),
            "seconds": time.perf_counter() - t0, "rows_per_s": float(np.median(rows_s)) if rows_s else None}


def export_encoded(ds: dict, seed: int, work: Path) -> Path:
    """The set's encoded train/valid/test (deepfm's preprocessing, so every peer sees the same features) as
    one .npz for benchmarks/peers/quality_peer.py: idx/val per split, labels, and the field sizes."""
    out = work / f"enc-{ds['name']}-mc{MIN_COUNT}-seed{seed}.npz"
    if out.exists():
        return out
    prep, test = prepared(ds, seed)
    fields = prep.fields
    tb = pipeline.batcher(prep.train, fields)
    vb = pipeline.batcher(prep.valid, fields)
    eb = pipeline.batcher(test, fields)
    arrays: dict[str, np.ndarray] = {}
    for split, b, rows in (("train", tb, prep.train_rows), ("valid", vb, prep.valid_rows), ("test", eb, None)):
        sel = np.arange(b.rows) if rows is None else np.asarray(rows)
        idx, val, y = b(np.sort(sel))
        arrays[f"{split}_idx"] = idx.numpy()
        arrays[f"{split}_val"] = val.numpy()
        arrays[f"{split}_y"] = y.numpy()
    # slot -> field, per-field sizes and offsets of the fused index space
    arrays["field_sizes"] = np.array([f.size for f in fields], dtype=np.int64)
    arrays["field_slots"] = np.array([f.slots for f in fields], dtype=np.int64)
    arrays["field_kinds"] = np.array([f.kind for f in fields])
    with outputs.atomic_file(out, suffix=".npz") as tmp:  # np.savez would append .npz to another name
        np.savez(tmp, **arrays)
    return out


def run_peer(system: str, ds: dict, seed: int, threads: int, work: Path, timeout: int) -> dict[str, Any]:
    data = export_encoded(ds, seed, work)
    res_path = work / f"peer-{system}-{ds['name']}-mc{MIN_COUNT}-seed{seed}.json"
    cmd = [str(PEER_PY), str(PEER_RUNNER), "--system", system, "--data", str(data), "--out", str(res_path),
           "--seed", str(seed), "--threads", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-400:]}
    r = json.loads(res_path.read_text())
    return {"test": {"auc": r["test_auc"], "logloss": r["test_logloss"]},
            "valid": {"auc": r.get("valid_auc"), "logloss": r.get("valid_logloss")},
            "epochs": r.get("epochs"), "best_epoch": r.get("best_epoch"), "seconds": time.perf_counter() - t0,
            "notes": r.get("notes", []), "version": r.get("version")}


def stats(recs: list[dict[str, Any]], split: str, metric: str) -> tuple[float, float]:
    v = np.array([r[split][metric] for r in recs if r.get(split) and r[split].get(metric) is not None], float)
    return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "quality.md")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sets", default="criteo,avazu,frappe,movielens,ipinyou,synth")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--peers", default="",
                    help="comma-separated: deepctr,torchfm,rechub (needs benchmarks/.peers-venv)")
    ap.add_argument("--synth-rows", type=int, default=100_000)
    ap.add_argument("--synth-1m", action="store_true", help="also deepfm synth at 1M rows (about 1 h on 2 cores)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--levers", action="store_true", help="measure LEVERS (validation) instead of CANDIDATES")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "deepfm-quality" / "runs.jsonl")
    ap.add_argument("--peer-timeout", type=int, default=1800)
    ap.add_argument("--min-count", type=int, default=None, help="every field's min_count (default: the format's)")
    ap.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "OVERRIDES"),
                    help="an extra candidate: the default preset with ';'-separated overrides, e.g. "
                         "--variant bs1024 'train.batch_size=1024;model.embedding_l2=0.01' (run like --candidates)")
    args = ap.parse_args()
    global MIN_COUNT
    MIN_COUNT = args.min_count
    work = args.cache.parent
    table = {**CANDIDATES, **LEVERS} if args.levers else dict(CANDIDATES)
    names = list(LEVERS) if args.levers and args.candidates == ",".join(CANDIDATES) else args.candidates.split(",")
    for vname, vov in args.variant:
        table[vname] = ("default", [o.strip() for o in vov.split(";") if o.strip()])
        names = [n for n in names if n != vname] + [vname]
    names = [n for n in names if n]
    peers = [p for p in args.peers.split(",") if p]
    sets = datasets(work / "data", args.synth_rows, args.sets.split(","))
    if args.synth_1m and "synth" in args.sets.split(","):
        big = datasets(work / "data1m", 1_000_000, ["synth"])[0]
        big["name"] = "synth1m"
        sets.append(big)
    cache = load_cache(args.cache)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    t0 = time.time()
    for ds in sets:
        tag = f"{ds['name']}:{args.synth_rows}" if ds["name"] == "synth" else ds["name"]
        if MIN_COUNT is not None:
            tag += f":mc{MIN_COUNT}"
        for seed in range(1, args.seeds + 1):
            for name in names + peers:
                if name in peers:
                    k = key_of(tag, name, "peer", [], seed)
                else:
                    preset, ov = table[name]
                    k = deepfm_key(tag, preset, ov, seed)
                if k not in cache:
                    if name in peers:
                        if not PEER_PY.exists():
                            rec = {"error": "benchmarks/.peers-venv missing (benchmarks/peers/setup_peers.sh)"}
                        else:
                            rec = run_peer(name, ds, seed, args.threads, work, args.peer_timeout)
                    else:
                        rec = run_deepfm(ds, preset, ov, seed, args.threads)
                    rec = {"key": k, "set": ds["name"], "name": name, "seed": seed, **rec}
                    if name not in peers:
                        rec["preset"], rec["overrides"] = table[name]
                    append_cache(args.cache, rec)
                    cache[k] = rec
                rec = cache[k]
                results.setdefault((ds["name"], name), []).append(rec)
                if "error" in rec:
                    print(f"{ds['name']:>9} {name:>22} seed {seed}: ERROR {rec['error']}", flush=True)
                else:
                    print(f"{ds['name']:>9} {name:>22} seed {seed}: valid AUC {rec['valid'].get('auc') or 0:.4f} "
                          f"ll {rec['valid'].get('logloss') or 0:.4f} | test AUC {rec['test']['auc']:.4f} "
                          f"ll {rec['test']['logloss']:.4f} | ep {rec['epochs']} ({time.time() - t0:.0f}s)",
                          flush=True)
    cmd = "python scripts/quality.py " + " ".join(a for a in sys.argv[1:])
    if args.levers:
        print(lever_table(sets, names, results))
        return
    write_doc(args.out, cmd, sets, names, peers, results, args.seeds, cache)


def fmt(m: float, s: float, digits: int = 4) -> str:
    return "–" if not np.isfinite(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def lever_table(sets: list[dict], names: list[str], results: dict) -> str:
    lines = ["| set | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for ds in sets:
        cells = []
        for n in names:
            recs = [r for r in results.get((ds["name"], n), []) if "error" not in r]
            a, sa = stats(recs, "valid", "auc")
            ll, sll = stats(recs, "valid", "logloss")
            ta, _ = stats(recs, "test", "auc")
            tl, _ = stats(recs, "test", "logloss")
            cells.append(f"{a:.4f} ± {sa:.4f} / {ll:.4f} (test {ta:.4f} / {tl:.4f}, n={len(recs)})")
        lines.append(f"| {ds['name']} | " + " | ".join(cells) + " |")
    return ("Validation AUC (mean ± std) / mean validation logloss (test AUC / logloss, for information)\n"
            + "\n".join(lines))


def lever_section(cache: dict[str, dict[str, Any]]) -> list[str]:
    """The lever runs found in the cache (``--levers``): validation AUC / logloss (what the choice was made on)
    and, for information only, test AUC, mean over the seeds run."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    keys = {name: config_digest(*LEVERS[name]) for name in LEVERS}
    for k, rec in cache.items():
        ds, kind, dig = json.loads(k)[:3]
        if "error" not in rec and ":" not in ds and kind == "deepfm-config":
            for name in (n for n, d in keys.items() if d == dig):  # every lever with this configuration
                groups.setdefault((ds, name), []).append(rec)
    if not groups:
        return []
    order = ["criteo", "avazu", "frappe", "movielens", "ipinyou"]
    sets = sorted({d for d, _ in groups}, key=lambda d: (order.index(d) if d in order else len(order), d))
    lines = ["## Levers (validation)", "",
             "Each lever is the default preset with the listed options (LEVERS in scripts/quality.py), on the "
             "same splits and seeds. Cells: validation AUC / validation logloss (mean over seeds; the choice of "
             "defaults was made on these), then the test AUC for information. `n` = seeds run.", "",
             "| lever | options | " + " | ".join(sets) + " |", "|---|---|" + "---|" * len(sets)]
    for name, (_, ov) in LEVERS.items():
        cells = []
        for d in sets:
            recs = groups.get((d, name), [])
            if not recs:
                cells.append("")
                continue
            va, _ = stats(recs, "valid", "auc")
            vl, _ = stats(recs, "valid", "logloss")
            ta, _ = stats(recs, "test", "auc")
            cells.append(f"{va:.4f} / {vl:.4f} (test {ta:.4f}, n={len(recs)})")
        if any(cells):
            delta = [o for o in ov if o not in OLD] if name != "old-default" else ["batch norm on, no wide start"]
            lines.append(f"| {name} | {', '.join(delta).replace('model.', '').replace('train.', '')} | "
                         + " | ".join(cells) + " |")
    return [*lines, ""]


def write_doc(out: Path, cmd: str, sets: list[dict], names: list[str], peers: list[str], results: dict,
              seeds: int, cache: dict[str, dict[str, Any]] | None = None) -> None:
    rows = names + peers
    lines = ["# Quality: deepfm against LR, FM and the peers' DeepFM, over seeds", "",
             f"Produced by `{cmd}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{lscpu_model()} ({os.cpu_count()} cores, shared), Python {platform.python_version()}, "
             "1 training thread per run.", "",
             f"Cells: test AUC and test logloss, mean ± std (population) over seeds 1..{seeds}. Bold: the best "
             "mean of the set among the rows. `target` checks deepfm `default` against max(LR, FM, peers' DeepFM): "
             "AUC >= best - 0.002 and logloss <= best + 0.002 (issue 15).", "",
             "Protocol: " + protocol_text(), ""]
    failures: list[str] = []
    for ds in sets:
        cell = {}
        for n in rows:
            recs = [r for r in results.get((ds["name"], n), []) if "error" not in r]
            errs = [r["error"] for r in results.get((ds["name"], n), []) if "error" in r]
            if errs and not recs:
                failures.append(f"{n} on {ds['name']}: {errs[0]}")
            cell[n] = (*stats(recs, "test", "auc"), *stats(recs, "test", "logloss"),
                       np.mean([r["epochs"] or 0 for r in recs]) if recs else float("nan"), len(recs))
        valid_rows = [n for n in rows if np.isfinite(cell[n][0])]
        best_auc = max((cell[n][0] for n in valid_rows), default=float("nan"))
        best_ll = min((cell[n][2] for n in valid_rows), default=float("nan"))
        title = ds["name"] + (" (1M rows)" if ds["name"] == "synth1m" else "")
        lines += [f"### {title}", "", f"{ds['note']}.", "",
                  "| model | test AUC | test logloss | epochs | seeds |", "|---|---|---|---|---|"]
        for n in rows:
            a, sa, ll, sll, ep, k = cell[n]
            if not k:
                lines.append(f"| {NAMES.get(n, PEER_NAMES.get(n, n))} | not run | not run | | 0 |")
                continue
            ac = f"**{fmt(a, sa)}**" if a == best_auc else fmt(a, sa)
            lc = f"**{fmt(ll, sll)}**" if ll == best_ll else fmt(ll, sll)
            lines.append(f"| {NAMES.get(n, PEER_NAMES.get(n, n))} | {ac} | {lc} | {ep:.1f} | {k} |")
        if "oracle" in ds:
            o = ds["oracle"]
            lines.append(f"| oracle (true probabilities) | {o['oracle_auc']:.4f} | {o['oracle_logloss']:.4f} | | |")
        ref = [n for n in valid_rows if n in ("lr", "fm") or n in peers]
        if "default" in valid_rows and ref:
            ra, rl = max(cell[n][0] for n in ref), min(cell[n][2] for n in ref)
            da, dl = cell["default"][0], cell["default"][2]
            ok = da >= ra - 0.002 and dl <= rl + 0.002
            lines += ["", f"target: default AUC {da:.4f} vs best reference {ra:.4f} ({da - ra:+.4f}); logloss "
                      f"{dl:.4f} vs {rl:.4f} ({dl - rl:+.4f}): **{'met' if ok else 'missed'}**"]
            if "oracle" in ds:
                lines.append(f"; AUC gap to the oracle {ds['oracle']['oracle_auc'] - da:.4f}")
        lines.append("")
    if failures:
        lines += ["## Runs that failed", "", *[f"- {f}" for f in failures], ""]
    lines += lever_section(cache or {})
    lines += NOTES
    outputs.write_text(out, "\n".join(lines))
    print("\n".join(lines))


# the hand-written part of docs/quality.md (decisions, targets), appended as is
NOTES: list[str] = """The levers measured on 2026-12-02, on which the batch-norm and wide-start rules were
chosen, are in
[levers-2026-12-02.md](levers-2026-12-02.md).

## What changed in the default, and why

**2026-12-03: embedding 16, MLP 256-128, net L2 1e-3, one learning-rate cut before stopping.** Measured as the
candidate `cand` (`--variant cand 'model.embed_dim=16;model.hidden=[256,128];model.net_l2=1e-3;`
`train.reduce_lr_on_plateau=true'`) against the previous default, 3 seeds, the same splits, chosen on
validation (mean validation AUC / logloss, previous -> new): Frappe 0.9298 / 0.3011 -> 0.9424 / 0.2873,
MovieLens 0.8513 / 0.3881 -> 0.8584 / 0.3824, synthetic 100k 0.7659 / 0.4609 -> 0.7664 / 0.4590, Criteo
0.7474 / 0.4582 -> 0.7471 / 0.4577 and Avazu 0.7039 / 0.4262 -> 0.7042 / 0.4263 (level: below 20k rows both
start from LR), iPinYou 0.6103 -> 0.6274 AUC with logloss 0.0571 -> 0.0651 (50 test clicks; not tuned for).
What each part does: torch-rechub's embedding 16 and 256-128 MLP (its example settings) were the largest single
effect on Frappe/MovieLens; the AUC - logloss monitor with patience 2 stopped the previous default at epoch 4-5
while validation AUC was still rising, and one cut of the learning rate by 10 at the first plateau (then
patience 2 again) lets it converge (about 2-4 more epochs); L2 1e-3 on the MLP weights keeps the logloss from
drifting up in those epochs. The new MLP costs 192k multiply-adds per sample in the forward pass against 476k
for 400-400-400 (embedding 16 x 39 fields in), so the step is cheaper at every size. The earlier choices below
(batch norm and wide start by data size) are unchanged.

Measured first (this harness, 3 seeds): the previous default (batch norm, dropout 0.2, embedding L2 1e-3,
AUC - logloss monitor) lost to LR by 0.021 test AUC on the Criteo sample and 0.033 on the Avazu sample, and by
0.027 ± 0.007 on an 8k-row `deepfm synth` set (tests/test_quality.py). The levers table above holds the
validation figures every choice was made on. What they show:

- **Batch norm is what hurts on 8-9k rows.** Turning it off (`nobn`) gains 0.017 (Criteo) and 0.013 (Avazu)
  validation AUC and 0.02 test AUC; on Frappe (41k training rows) batch norm is better (+0.0025 validation,
  +0.002 test over 3 seeds), on MovieLens (72k) even (2 seeds), and it was the only variant that beat LR on the 200k-row
  synthetic set (docs/presets.md). Rule: `batch_norm: auto`, on from 20k training rows
  (`deepfm.models.ctr.AUTO_BATCH_NORM_ROWS`, midway on a log scale between the sets where it hurts and helps).
- **Without batch norm DeepFM still trailed LR** on validation (Criteo 0.7350 vs 0.7433, Avazu 0.6924 vs
  0.7035): the MLP overfits within 2-4 epochs of ~60 steps, and early stopping then ends training while the
  first-order weights (Adam at 1e-3, starting from 0) are far from LR's solution (LR itself runs all 20
  epochs). Embedding init N(0, 0.01), embedding L2 1e-2, dropout 0.5, a 200-200 MLP, lr 3e-3, batch 512, a 10x
  learning rate for the first-order weights (`train.wide_lr_scale`) and 4 validations per epoch with the best
  weights kept at that granularity (`train.evals_per_epoch`) all stay within noise of `nobn` on validation or
  trade one set for the other; 4 validations per epoch, with patience counted in validations, stop too early
  on the noisy 800-900-row validation splits (Avazu test AUC -0.02 on one seed).
- **Wide start closes it** (`ws`): below 20k training rows, fit LR first with the same options and early
  stopping, start DeepFM from its first-order weights with the MLP's output layer at zero, and validate that
  starting point before the first epoch, so the FM and MLP terms are kept only where they beat LR on
  validation (the "shrink toward the wide part" lever; `best_epoch` 0 in training.json = LR's weights kept).
  Validation AUC: Criteo 0.7474 (LR 0.7433), Avazu 0.7039 (LR 0.7035). Rule: `train.wide_start: auto`
  (`deepfm.pipeline.AUTO_WIDE_START_ROWS` = 20k). It costs one LR fit, which on fewer than 20k rows takes
  seconds.
- (2026-12-02) From 20k training rows up these rules leave batch norm on and the wide start off.
- `paper` and `bars` presets are unchanged.

## Targets

Figures from the tables above (3 seeds, test; the choices were made on validation):

- **Met** on Avazu (AUC level with the best reference, LR/FM at 0.7364; logloss +0.0001), Frappe (0.9401 against
  torch-rechub's 0.9411, -0.0010; logloss 0.2867, the best by 0.013), MovieLens (0.8501 against torch-rechub's
  0.8489; logloss +0.0019 against its 0.3886) and the synthetic 100k set (+0.0073 AUC over DeepCTR-Torch, logloss
  the best).
- **Criteo sample: missed** by 0.0059 AUC against DeepCTR-Torch (logloss +0.0017, met). The gap does not show
  on validation (DeepCTR-Torch's validation AUC 0.7403 against our 0.7471 on the same splits): the Criteo test
  rows come later in time than the train rows the validation split is drawn from, and the peers see the 13
  integer fields as 16 equal-frequency bins. Bucketizing them (`transform: bucketize`) gives +0.010 test AUC for
  both LR and DeepFM on Criteo but -0.004 / -0.005 on validation (2026-12-02), so it was not chosen.
- **iPinYou: missed**, but its test split has 50 clicks (AUC noise about ±0.04, seed std 0.05 here): reported,
  not tuned for. The new default has the best validation AUC there (0.6274 against 0.6103 before).
- **1M rows** (`python scripts/quality.py --sets synth --synth-1m --candidates '' --variant old ... --variant
  cand ... --seeds 2`, 2026-12-03, same machine, 1 thread, alternating): previous default test AUC 0.7925 ±
  0.0005 / logloss 0.4384, new default 0.7915 ± 0.0005 / 0.4388 (validation AUC 0.7950 against 0.7949, level);
  oracle 0.8087, so the gap to the oracle is 0.017 (the 0.01 target is missed, as before: 0.016). Training speed
  at 1M rows: 34.6k against 28.4k rows/s on the first seed's runs (1 thread, machine loaded by other jobs: a
  ratio, not a figure), the smaller MLP being cheaper per sample; the default therefore does not lose speed.
  The -0.0010 test AUC at 1M is twice the seed std but level on validation: a loss of that size at 1M rows
  remains possible, and is stated here.

## Peers

Each peer trains on the same encoded features (deepfm's preprocessing and vocabularies, exported to arrays;
numeric fields as 16 equal-frequency bins, multi-valued positions as separate fields) with its own DeepFM and
its documented example settings, early stopping on validation AUC with patience 2 and the best epoch's
weights (benchmarks/peers/quality_peer.py has each library's settings). pytorch-fm's documented settings
(N(0, 1) first-order init, MLP 16-16) do not converge in 20 epochs on the small sets. FuxiCTR was not run: its
DeepFM lives in its model_zoo (not in the wheel) and its input pipeline (polars + Ray to parquet) needs its
own preprocessing; benchmarks/peers/run_peer.py rebuilds it for the speed benchmark only.

## min_count (issue 20 item 2)

`python scripts/quality.py --sets criteo,avazu --candidates default,lr --min-count K` for K = 1, 2, 5, 10
(3 seeds; validation AUC, default / LR): Criteo 0.7392 / 0.7362, 0.7406 / 0.7391, 0.7379 / 0.7361,
0.7474 / 0.7433; Avazu 0.7077 / 0.7065, 0.7039 / 0.7035, 0.7024 / 0.7014, 0.7042 / 0.7018. The sum over both
sets is highest at 10 for both models, so 10 is the one rule for inferred schemas (`deepfm schema infer`,
which states it, and `DeepFMClassifier` without a schema), the same as the criteo format. libFM and MovieLens
files, whose ids are already a curated vocabulary, keep 1; avazu keeps BARS' 2 (10 measured within noise of
it on validation).
""".splitlines()


def protocol_text() -> str:
    return ("each set has one fixed test split (Criteo/Avazu/iPinYou: the test file the sample ships; "
            "Frappe/MovieLens: a seeded 80/20 split of the one file, seed 2017; synthetic: `deepfm synth --seed 0`'s "
            "test.tsv); validation = the synthetic set's valid.tsv, otherwise 10% of train drawn with the run's "
            "seed. Early stopping and the kept weights are chosen on validation only; test is only reported. "
            "Every model uses each format's default schema. LR and FM use the default preset with only "
            "`model.model` changed. Peers train on the same encoded features (deepfm's preprocessing, exported "
            "to arrays) with their own DeepFM and their documented defaults (benchmarks/peers/quality_peer.py).")


if __name__ == "__main__":
    main()
