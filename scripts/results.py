"""docs/results.md: the paper's models (Table 2: LR, FM, FNN, IPNN, OPNN, PNN*, LR&DNN, FM&DNN, DeepFM)
on every available data set: test AUC and logloss, mean ± std over seeds, RelaImpr against LR, all with
one preset (the only change between rows is the model).

    python scripts/results.py --seeds 3 --out docs/results.md
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

MODELS = ("lr", "fm", "fnn", "ipnn", "opnn", "pnnstar", "wdl", "fmdnn", "deepfm")
NAMES = {"lr": "LR", "fm": "FM", "fnn": "FNN", "ipnn": "IPNN", "opnn": "OPNN", "pnnstar": "PNN*", "wdl": "LR&DNN",
         "fmdnn": "FM&DNN", "deepfm": "DeepFM"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/results.md"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sets", default=None)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--preset", default="default")
    ap.add_argument("--synth-rows", type=int, default=200_000)
    args = ap.parse_args()
    models = args.models.split(",")
    sets = datasets(Path(tempfile.mkdtemp(prefix="deepfm-results-")), args.synth_rows,
                    args.sets.split(",") if args.sets else None)
    sections, t0 = [], time.time()
    for ds in sets:
        cells = {}
        for model in models:
            ms = [train_eval(ds, args.preset, [f"model.model={model}"], seed) for seed in range(1, args.seeds + 1)]
            auc, ll = np.array([m["auc"] for m in ms]), np.array([m["logloss"] for m in ms])
            cells[model] = (auc.mean(), auc.std(), ll.mean(), ll.std(), np.mean([m["epochs"] for m in ms]))
            print(f"{ds['name']:>10} {model:>7}: AUC {auc.mean():.4f} ± {auc.std():.4f}  logloss {ll.mean():.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
        best = max(c[0] for c in cells.values())
        lr_auc = cells["lr"][0] if "lr" in cells else None
        lines = [f"### {ds['name']} ({ms[0]['rows']:,} test rows)", "", "| model | test AUC | test logloss | "
                 "RelaImpr vs LR | epochs |", "|---|---|---|---|---|"]
        for model in models:
            a, sa, ll, sll, ep = cells[model]
            rel = f"{((a - 0.5) / (lr_auc - 0.5) - 1) * 100:+.2f}%" if lr_auc is not None else "–"
            lines.append(f"| {NAMES.get(model, model)} | {'**' if a == best else ''}{a:.4f}{'**' if a == best else ''}"
                         f" ± {sa:.4f} | {ll:.4f} ± {sll:.4f} | {rel} | {ep:.1f} |")
        if "oracle" in ds:
            lines.append(f"| oracle (true probabilities) | {ds['oracle']['oracle_auc']:.4f} | "
                         f"{ds['oracle']['oracle_logloss']:.4f} | | |")
        sections += [*lines, ""]
    out = [
        "# Results: the paper's models on the available data sets", "",
        f"Produced by `python scripts/results.py --seeds {args.seeds} --preset {args.preset}"
        f"{' --synth-rows ' + str(args.synth_rows) if args.synth_rows != 200_000 else ''}` on "
        f"{time.strftime('%Y-%m-%d')} ({platform.machine()}, Python {platform.python_version()}, 2 CPU threads).",
        f"Test AUC and logloss, mean ± std over seeds 1..{args.seeds}; every model uses the `{args.preset}` "
        "preset (only `model.model` changes; IPNN takes tanh, the paper's setting) and the format's default schema; "
        "validation = the set's valid file or a seeded 10% of train, early stopping on the preset's monitor. "
        "RelaImpr = ((AUC - 0.5) / (AUC_LR - 0.5) - 1) x 100%. Bold = best AUC of the data set. For a full "
        "comparison with plots and an HTML report on your own data, use `deepfm compare` "
        "([reproduce.md](reproduce.md)).", "",
        "These are small samples of public sets (the real data is not in the repository and is read from "
        "`../shared/data`). They cannot reproduce the published full-data figures (paper Table 2: Criteo "
        "DeepFM AUC 0.8007; BARS Criteo_x1 0.8138, Avazu_x1 0.7646, Frappe_x1 0.9839).", "",
        *sections, "Data sets:", *[f"- **{d['name']}**: {d['note']}" for d in sets], "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
