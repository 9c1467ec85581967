"""Choose the default preset by measurement: train DeepFM with each candidate on every data set and
report test AUC / logloss (mean over seeds), plus LR for reference.

    python scripts/compare_presets.py --out docs/presets.md [--seeds 2] [--sets criteo,frappe]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import datasets, train_eval  # noqa: E402

E30 = ["train.epochs=30"]
MON = ["train.monitor=auc-logloss"]
CANDIDATES = {
    "paper": ("paper", E30),
    "paper-mon": ("paper", E30 + MON),
    "d0.2-l2e-3-mon": ("paper", E30 + MON + ["model.dropout=0.2", "model.embedding_l2=1.0e-3"]),
    "d0.2-l2e-2-mon": ("paper", E30 + MON + ["model.dropout=0.2", "model.embedding_l2=1.0e-2"]),
    "bn-d0.2-l2e-3-mon": ("bars", E30 + MON + ["model.embedding_l2=1.0e-3"]),
    "bars-mon": ("bars", E30 + MON),
    "lr-mon": ("paper", E30 + MON + ["model.model=lr"]),
    # the embedding update (dense Adam vs lazy Adam on touched rows) under the default and paper presets
    "default": ("default", []),
    "default-sparse": ("default", ["train.embedding_update=sparse"]),
    "paper-sparse": ("paper", E30 + ["train.embedding_update=sparse"]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/presets.md"))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--sets", default=None)
    ap.add_argument("--synth-rows", type=int, default=200_000)
    ap.add_argument("--candidates", default=",".join(list(CANDIDATES)[:7]))
    ap.add_argument("--title", default="Choosing the default preset")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deepfm-presets-"))
    sets = datasets(work, args.synth_rows, args.sets.split(",") if args.sets else None)
    names = args.candidates.split(",")
    table: dict[str, dict[str, tuple[float, float, float]]] = {}
    t0 = time.time()
    for ds in sets:
        for name in names:
            preset, ov = CANDIDATES[name]
            ms = [train_eval(ds, preset, ov + ["train.batch_size=auto"], seed) for seed in range(1, args.seeds + 1)]
            auc = np.mean([m["auc"] for m in ms])
            table.setdefault(ds["name"], {})[name] = (auc, np.std([m["auc"] for m in ms]),
                                                      np.mean([m["logloss"] for m in ms]))
            print(f"{ds['name']:>10} {name:>16}: AUC {auc:.4f}  logloss {table[ds['name']][name][2]:.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    cmd = " ".join(["python", "scripts/compare_presets.py", *sys.argv[1:]])
    lines = [f"# {args.title}", "",
             f"Produced by `{cmd}` on {time.strftime('%Y-%m-%d')} "
             f"({platform.processor() or platform.machine()}, {platform.python_version()}). Test AUC (mean ± std "
             f"over {args.seeds} seeds) / mean test logloss; DeepFM unless the name says lr. Every run uses "
             "`batch_size=auto` and at most 30 epochs with early stopping (patience 2); `-mon` = monitor "
             "validation AUC - logloss, otherwise AUC.", ""]
    lines.append("| data set | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    for ds in sets:
        row = table[ds["name"]]
        best = max(row[n][0] for n in names)
        cells = [(f"**{row[n][0]:.4f}**" if row[n][0] == best else f"{row[n][0]:.4f}") +
                 f" ± {row[n][1]:.4f} / {row[n][2]:.4f}" for n in names]
        lines.append(f"| {ds['name']} | " + " | ".join(cells) + " |")
    means = {n: np.mean([table[d["name"]][n][0] for d in sets]) for n in names}
    lines.append("| **mean AUC** | " + " | ".join(f"{means[n]:.4f}" for n in names) + " |")
    lines += ["", "Data sets: " + "; ".join(f"{d['name']}: {d['note']}" for d in sets) + ".", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
