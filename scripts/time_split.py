"""Random vs time-ordered split on MovieLens-100k (the one shared data set with a time stamp), through the CLI.

    python scripts/time_split.py [--data ../shared/data/movielens_100k] [--epochs 5] [--seeds 1,2,3]

The RecBole files are joined into one CSV in a temporary folder (never in the repository); label = rating >= 4,
rating 3 dropped (as `--format movielens`). Both protocols train on 80% and test on 20% of the rows:
- random: a seeded random 20% is the test file, `--valid-fraction 0.125` of the rest validates;
- time:   `--split time:timestamp --valid-fraction 0.1 --test-fraction 0.2` (the latest 20% of the rows is the
  test split, the 10% before it validates, the model never sees the future).
Each run reports test AUC, logloss, NE and GAUC over users (`--group-column user_id`). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = """label: label
fields:
  - {name: user_id}
  - {name: item_id}
  - {name: age}
  - {name: gender}
  - {name: occupation}
  - {name: release_year}
  - {name: genres, column: class, kind: multi, sep: " "}
"""


def _atomic(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def joined(data: Path) -> pd.DataFrame:
    inter = _atomic(data / "ml-100k.inter")
    users, items = _atomic(data / "ml-100k.user"), _atomic(data / "ml-100k.item")
    df = inter.merge(users, on="user_id", how="left").merge(items, on="item_id", how="left")
    rating = df["rating"].astype(float)
    df = df[rating != 3].assign(label=(rating[rating != 3] >= 4).astype(int))
    return df[["label", "user_id", "item_id", "age", "gender", "occupation", "release_year", "class", "timestamp"]]


def train(args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "deepfm", "train", *args, "--out", str(out), "--quiet", "--no-cache"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())["test"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "movielens_100k"))
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="deepfm-timesplit-") as tmp:
        t = Path(tmp)
        df = joined(Path(a.data))
        df.to_csv(t / "all.csv", index=False)
        (t / "schema.yaml").write_text(SCHEMA)
        perm = np.random.default_rng(2017).permutation(len(df))
        n_test = int(round(0.2 * len(df)))
        df.iloc[np.sort(perm[n_test:])].to_csv(t / "rest.csv", index=False)
        df.iloc[np.sort(perm[:n_test])].to_csv(t / "test.csv", index=False)
        common = ["--format", "csv", "--schema", str(t / "schema.yaml"), "--group-column", "user_id",
                  "--epochs", str(a.epochs), "--threads", str(a.threads)]
        results: dict[str, list[dict]] = {"random": [], "time": []}
        for seed in seeds:
            s = ["--seed", str(seed)]
            results["random"].append(train([*common, *s, "--train", str(t / "rest.csv"), "--valid-fraction",
                                            "0.125", "--test", str(t / "test.csv")], t / f"random{seed}"))
            results["time"].append(train([*common, *s, "--train", str(t / "all.csv"), "--split", "time:timestamp",
                                          "--valid-fraction", "0.1", "--test-fraction", "0.2"], t / f"time{seed}"))
    cpu = platform.processor() or platform.machine()
    try:
        info = open("/proc/cpuinfo").read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in info if line.startswith("flags")))
        cpu += " (" + ", ".join(f for f in ("avx2", "avx512_bf16", "amx_bf16") if f in flags) + ")"
    except (OSError, StopIteration):
        pass
    print(f"MovieLens-100k ({len(df):,} rows after dropping rating 3), deepfm default preset, {a.epochs} epochs max, "
          f"seeds {a.seeds}, {a.threads} thread(s), {cpu}\n")
    print("| split | test rows | test AUC | test logloss | test NE | test GAUC (users) |\n|---|---|---|---|---|---|")
    for name, runs in results.items():
        cells = []
        for k, d in (("auc", 4), ("logloss", 4), ("ne", 4), ("gauc", 4)):
            v = np.array([r[k] for r in runs])
            cells.append(f"{v.mean():.{d}f} ± {v.std():.{d}f}")
        print(f"| {name} | {runs[0]['rows']:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
