"""Scale benchmark: streaming preprocessing and one epoch of out-of-core training on 10M and 30M synthetic
rows, reporting peak RSS (which must stay flat in the row count), rows/s, and the data's size on disk.

    python benchmarks/scale.py                          # 10M and 30M rows (about 40 minutes on 2 cores)
    python benchmarks/scale.py --rows 2000000,6000000   # a quick check of the same shape

Each size: `deepfm synth` (Criteo layout, seed 0, 1% validation), then one `deepfm train --streaming`
process (fit in one pass, encode into 1M-row shards, train 1 epoch from the shards, score validation),
whose peak RSS is read from getrusage by a fresh wrapper process. The MLP is 128-128 (embedding 10): the
benchmark measures the data path and memory, and the 400-400-400 MLP would only make each run longer
(training speed with the paper's MLP is in the `small`/`large` settings). Results: benchmarks/results/
scale.json (+ history/) and docs/benchmarks.md between the ``bench:scale`` markers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from run import cpu_line, write_docs  # noqa: E402

WRAP = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); rc = subprocess.run(sys.argv[1:])"
        ".returncode; print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t, 'peak_rss_mb': "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")


def du_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def one(work: Path, rows: int, hidden: str, shard_rows: int) -> dict:
    data = work / f"synth-{rows}"
    if not (data / "oracle.json").exists():
        subprocess.run([sys.executable, "-m", "deepfm", "synth", "--rows", str(rows), "--seed", "0", "--out",
                        str(data), "--valid-fraction", "0.01", "--test-fraction", "0.0001"], check=True)
    cache, out = work / f"cache-{rows}", work / f"model-{rows}"
    subprocess.run(["rm", "-rf", str(cache), str(out)], check=True)
    cmd = [sys.executable, "-m", "deepfm", "train", "--format", "criteo", "--train", str(data / "train.tsv"),
           "--valid", str(data / "valid.tsv"), "--streaming", "--shard-rows", str(shard_rows), "--epochs", "1",
           "--set", f"model.hidden={hidden}", "--checkpoint-every", "0", "--cache-dir", str(cache), "--out", str(out),
           "--quiet"]
    res = json.loads(subprocess.run([sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"training failed for {rows} rows")
    training = json.loads((out / "training.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    hist = training["history"][0]
    return {"rows": training["data"]["rows"], "train_rows": training["data"]["train_rows"],
            "input_mb": du_mb(data / "train.tsv") if (data / "train.tsv").exists() else None,
            "shards_mb": du_mb(cache), "peak_rss_mb": res["peak_rss_mb"], "wall_seconds": res["seconds"],
            "preprocess_seconds": training["data"]["read_encode_seconds"],
            "preprocess_rows_per_s": training["data"]["rows"] / training["data"]["read_encode_seconds"],
            "train_rows_per_s": hist["train_rows_per_s"], "vocab_rows": training["data"]["vocab_rows"],
            "valid_auc": metrics["valid"]["auc"], "oracle_valid_auc": json.loads((data / "oracle.json").read_text())
            ["splits"]["valid"]["oracle_auc"]}


def render(res: dict) -> str:
    lines = [f"Measured {res['date']} on {res['cpu']} by `python benchmarks/scale.py` (streaming mode, "
             f"{res['shard_rows']:,}-row shards, MLP {res['hidden']}, 1 epoch, 2 threads).", "",
             "| rows | input TSV MB | shards MB | peak RSS MB | preprocessing rows/s | training rows/s | "
             "embedding rows | valid AUC (oracle) | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['rows']:,} | {r['input_mb']:,.0f} | {r['shards_mb']:,.0f} | {r['peak_rss_mb']:,.0f} | "
                     f"{r['preprocess_rows_per_s']:,.0f} | {r['train_rows_per_s']:,.0f} | {r['vocab_rows']:,} | "
                     f"{r['valid_auc']:.4f} ({r['oracle_valid_auc']:.4f}) | {r['wall_seconds']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="10000000,30000000")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "scale")
    ap.add_argument("--hidden", default="[128,128]")
    ap.add_argument("--shard-rows", type=int, default=1_000_000)
    ap.add_argument("--no-docs", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    res = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_line(), "hidden": a.hidden, "shard_rows": a.shard_rows,
           "runs": []}
    for n in (int(x) for x in a.rows.split(",")):
        res["runs"].append(one(a.work, n, a.hidden, a.shard_rows))
        print(json.dumps(res["runs"][-1]), flush=True)
    out = ROOT / "benchmarks" / "results"
    (out / "history").mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=1)
    (out / "scale.json").write_text(text)
    (out / "history" / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(text)
    print(render(res))
    if not a.no_docs:
        write_docs("scale", render(res))


if __name__ == "__main__":
    main()
