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

from deepfm import pipeline  # noqa: E402
from deepfm.data import readers  # noqa: E402

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
       "train.wide_start=false", "train.wide_lr_scale=1.0"]
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
    "lr": ("default", ["model.model=lr"]),
    "lr-lr1e-2": ("default", ["model.model=lr", "train.lr=1.0e-2"]),
    "fm-w10": ("default", ["model.model=fm", "train.wide_lr_scale=10", "train.wide_start=false"]),
}
PEER_NAMES = {"deepctr": "DeepCTR-Torch DeepFM", "torchfm": "pytorch-fm DeepFM", "rechub": "torch-rechub DeepFM",
              "fuxictr": "FuxiCTR DeepFM"}
NAMES = {"default": "deepfm default", "paper": "deepfm paper", "lr": "LR", "fm": "FM"}


def key_of(ds: str, name: str, preset: str, overrides: list[str], seed: int, extra: str = "") -> str:
    return json.dumps([ds, name, preset, sorted(overrides), seed, extra])


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
    tmp = out.with_name(f".{out.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
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
    args = ap.parse_args()
    global MIN_COUNT
    MIN_COUNT = args.min_count
    work = args.cache.parent
    table = LEVERS if args.levers else CANDIDATES
    names = list(table) if args.levers and args.candidates == ",".join(CANDIDATES) else args.candidates.split(",")
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
                    k = key_of(tag, name, preset, ov, seed)
                if k not in cache:
                    if name in peers:
                        if not PEER_PY.exists():
                            rec = {"error": "benchmarks/.peers-venv missing (benchmarks/peers/setup_peers.sh)"}
                        else:
                            rec = run_peer(name, ds, seed, args.threads, work, args.peer_timeout)
                    else:
                        rec = run_deepfm(ds, preset, ov, seed, args.threads)
                    rec = {"key": k, "set": ds["name"], "name": name, "seed": seed, **rec}
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
            cells.append(f"{a:.4f} ± {sa:.4f} / {ll:.4f}")
        lines.append(f"| {ds['name']} | " + " | ".join(cells) + " |")
    return "Validation AUC (mean ± std) / mean validation logloss\n" + "\n".join(lines)


def lever_section(cache: dict[str, dict[str, Any]]) -> list[str]:
    """The lever runs found in the cache (``--levers``): validation AUC / logloss (what the choice was made on)
    and, for information only, test AUC, mean over the seeds run."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for k, rec in cache.items():
        ds, name, preset, ov = json.loads(k)[:4]
        if "error" not in rec and ":" not in ds and name in LEVERS and \
                (preset, ov) == (LEVERS[name][0], sorted(LEVERS[name][1])):
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, out)
    print("\n".join(lines))


NOTES: list[str] = []  # the hand-written part of docs/quality.md (decisions, targets), appended as is


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
