"""Medians over repeated runs of benchmarks/run.py (kept in benchmarks/results/history/).

    python benchmarks/median.py --setting small [--since 20261129-174500] [--docs]

Takes every history file of the setting (newer than ``--since`` if given: runs of older code are left
out), the median of each metric per system, and the ratios against the best peer in each run, also as
medians. With ``--docs`` the table goes into docs/benchmarks.md between the ``bench:<setting>-median``
markers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from run import COLUMNS, PEERS, gemm_limit, write_docs  # noqa: E402


def ratio(run: list[dict], r: dict, key: str) -> float | None:
    peers = [p for p in run if p["system"] in PEERS and "error" not in p]
    if not peers or "error" in r:
        return None
    return r[key] / max(p[key] for p in peers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", default="small")
    ap.add_argument("--since", default="", help="only history files named <setting>-<stamp> with stamp >= this")
    ap.add_argument("--docs", action="store_true")
    a = ap.parse_args()
    files = sorted(p for p in (ROOT / "benchmarks/results/history").glob(f"{a.setting}-*.json")
                   if p.stem.split("-", 1)[1] >= a.since)
    runs = [json.loads(p.read_text()) for p in files]
    if not runs:
        raise SystemExit("no runs")
    systems = [r["system"] for r in runs[-1]["results"]]
    lines = ["| " + " | ".join(c[1] for c in COLUMNS) + " | train vs best peer | scoring vs best peer "
             "| % of GEMM limit | preprocessing vs DeepCTR |", "|" + "---|" * (len(COLUMNS) + 4)]
    for system in systems:
        rows = [(run, next((r for r in run["results"] if r["system"] == system and "error" not in r), None))
                for run in runs]
        rows = [(run, r) for run, r in rows if r is not None]
        if not rows:
            continue
        cells = []
        for key, _, fmt in COLUMNS:
            vals = [r[key] for _, r in rows if r.get(key) is not None]
            cells.append(system if key == "system" else
                         (fmt.format(statistics.median(vals)) if vals else "n/a"))
        tr = [ratio(run["results"], r, "train_samples_per_s") for run, r in rows]
        sc = [ratio(run["results"], r, "score_samples_per_s") for run, r in rows]
        frac = [r["train_samples_per_s"] / gemm_limit(r, run["gemm"]) for run, r in rows]
        dc = [r["preprocess_rows_per_s"] / d["preprocess_rows_per_s"] for run, r in rows
              for d in run["results"] if d["system"] == "deepctr" and "error" not in d]
        cells += [f"{statistics.median(tr):.2f}x" if None not in tr else "n/a",
                  f"{statistics.median(sc):.2f}x" if None not in sc else "n/a",
                  f"{100 * statistics.median(frac):.0f}%", f"{statistics.median(dc):.1f}x" if dc else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    block = (f"Medians over {len(runs)} runs of `python benchmarks/run.py --settings {a.setting}` "
             f"({', '.join(p.name for p in files)}), written by `python benchmarks/median.py --setting "
             f"{a.setting}{' --since ' + a.since if a.since else ''} --docs`. Ratios are taken within each run, "
             "then the median. The % of the GEMM limit uses, for deepfm, the limit its own process measured "
             "right after training (`gemm_after_train`), for the peers the run's.\n\n" + "\n".join(lines))
    print(block)
    if a.docs:
        write_docs(f"{a.setting}-median", block)


if __name__ == "__main__":
    main()
