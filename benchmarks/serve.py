"""Serving benchmark: in-process 1-row latency, batch scoring from Parquet (torch, onnxruntime and the
quantised engines int8 and bf16 side by side, each with its parity against fp32), and HTTP load with wrk at
concurrency 1, 16 and 64 for 1-row and 100-row requests.

    python benchmarks/serve.py                 # everything (~6 minutes on 2 cores)
    python benchmarks/serve.py --skip-http     # no wrk runs
    python benchmarks/serve.py --rows 300000 --skip-http --no-docs --tag small   # a quick scoring run

Data: `deepfm synth` (Criteo format, seed 0). The bundle is the default preset (embedding 10, MLP 400-400-400
with batch norm) trained 1 epoch on the synthetic validation split; Parquet scoring reads the training split
written as Parquet. Results go to benchmarks/results/serve.json (+ history/) and to docs/benchmarks.md
between the ``bench:serve`` markers. wrk comes from Debian (`apt-get install wrk`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from run import cpu_flags, cpu_line, write_docs  # noqa: E402

WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{body}", "r"); wrk.body = f:read("*a"); f:close()
done = function(summary, latency, requests)
  io.write(string.format("JSON {{\\"requests\\": %d, \\"duration_us\\": %d, \\"errors\\": %d, \\"non2xx\\": %d, "
    .. "\\"p50_us\\": %d, \\"p99_us\\": %d}}\\n", summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
"""


def sh(*cmd: str) -> None:
    subprocess.run([sys.executable, "-m", "deepfm.cli", *cmd], check=True)


def prepare(work: Path, rows: int) -> tuple[Path, Path, Path]:
    data = work / f"synth-{rows}"
    if not (data / "oracle.json").exists():
        sh("synth", "--rows", str(rows), "--seed", "0", "--out", str(data))
    bundle = work / "bundle"
    if not (bundle / "manifest.json").exists():
        sh("train", "--format", "criteo", "--train", str(data / "valid.tsv"), "--valid-fraction", "0.1",
           "--epochs", "1", "--seed", "0", "--out", str(bundle), "--quiet", "--no-cache")
    parquet = work / "score.parquet"
    if not parquet.exists():
        import pyarrow.parquet as pq

        from deepfm.data import readers

        r = readers.read(data / "train.tsv", "criteo")
        pq.write_table(r.table, parquet, row_group_size=131072)
    return data, bundle, parquet


def percentiles(f, n: int, warmup: int = 200) -> tuple[float, float]:
    for _ in range(warmup):
        f()
    ts = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        f()
        ts[i] = time.perf_counter() - t
    return float(np.percentile(ts, 50) * 1e3), float(np.percentile(ts, 99) * 1e3)


def in_process(bundle: Path, data: Path) -> dict:
    from deepfm.data import readers
    from deepfm.serve.predictor import Predictor

    pred = Predictor(bundle, threads=1)
    rows = readers.read(data / "test.tsv", "criteo").table.slice(0, 1000).to_pylist()
    pred.records.warm()
    out = {}
    it = iter(range(10**9))
    out["raw_1row"] = percentiles(lambda: pred.predict_records([rows[next(it) % 1000]]), 5000)
    idx, val = pred.records.encode(rows[:1])
    out["encoded_1row"] = percentiles(lambda: pred.logits(idx, val), 5000)
    out["encode_1row"] = percentiles(lambda: pred.records.encode(rows[:1]), 5000)
    out["raw_100rows"] = percentiles(lambda: pred.predict_records(rows[:100]), 500, warmup=20)
    return {k: {"p50_ms": v[0], "p99_ms": v[1]} for k, v in out.items()}


def batch_scoring(bundle: Path, parquet: Path, engine: str, threads: int) -> dict:
    from deepfm.serve.predictor import Predictor

    pred = Predictor(bundle, threads=threads, engine=engine, report=lambda line: print(line, flush=True))
    from deepfm.data import readers

    # warm-up on the first block, untimed, for every engine: the quantised ones run their parity check there
    first = next(readers.iter_read(parquet, "parquet", pred.pre.schema, block_rows=65536))
    pred.predict_encoded(pred.pre.transform(first), batch_size=8192)
    t0 = time.perf_counter()
    t_read = t_model = 0.0
    n = 0
    it = readers.iter_read(parquet, "parquet", pred.pre.schema, block_rows=65536)
    while True:
        t = time.perf_counter()
        block = next(it, None)
        if block is None:
            break
        enc = pred.pre.transform(block)
        t_read += time.perf_counter() - t
        t = time.perf_counter()
        pred.predict_encoded(enc, batch_size=8192)
        t_model += time.perf_counter() - t
        n += block.rows
    wall = time.perf_counter() - t0
    out = {"engine": engine, "rows": n, "seconds": wall, "rows_per_s": n / wall,
           "decode_encode_s": t_read, "model_s": t_model, "model_rows_per_s": n / t_model}
    if pred.quant is not None and pred.quant.checks:  # parity on the first block's first 10k rows
        p = pred.quant.checks[0]
        out["parity"] = {"rows": p.rows, "max_dp": p.max_dp, "d_auc": p.d_auc, "ok": p.ok}
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def http(bundle: Path, data: Path, work: Path, workers: int, duration: int, engine: str = "torch") -> list[dict]:
    from deepfm.data import readers

    rows = readers.read(data / "test.tsv", "criteo").table.slice(0, 100).to_pylist()
    bodies = {}
    for n in (1, 100):
        p = work / f"req{n}.json"
        p.write_text(json.dumps({"rows": rows[:n]}))
        (work / f"req{n}.lua").write_text(WRK_LUA.format(body=p))
        bodies[n] = work / f"req{n}.lua"
    port = free_port()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deepfm.cli", "serve", str(bundle), "--port", str(port),
                             "--workers", str(workers), "--threads", "1", "--engine", engine, "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    results = []
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(1.0 if workers > 1 else 0.2)  # let every worker finish starting
        pids = [proc.pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                              text=True).stdout.split()]
        for n in (1, 100):
            for conc in (1, 16, 64):
                threads = min(conc, 2)
                subprocess.run(["wrk", f"-t{threads}", f"-c{conc}", "-d2s", "-s", str(bodies[n]), url + "/v1/predict"],
                               capture_output=True)  # warm-up
                rss0 = rss_mb(pids)
                out = subprocess.run(["wrk", f"-t{threads}", f"-c{conc}", f"-d{duration}s", "--latency", "-s",
                                      str(bodies[n]), url + "/v1/predict"], capture_output=True, text=True).stdout
                m = json.loads(re.search(r"^JSON (.*)$", out, re.M).group(1))
                res = {"workers": workers, "engine": engine, "rows_per_request": n, "concurrency": conc,
                       "requests_per_s": m["requests"] / (m["duration_us"] / 1e6), "p50_ms": m["p50_us"] / 1e3,
                       "p99_ms": m["p99_us"] / 1e3, "errors": m["errors"] + m["non2xx"], "requests": m["requests"],
                       "rss_mb_start": rss0, "rss_mb_end": rss_mb(pids)}
                print(json.dumps(res), flush=True)
                results.append(res)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return results


def render(res: dict) -> str:
    lat = res["in_process"]
    lines = [f"Measured {res['date']} on {res['cpu']} by `python benchmarks/serve.py` (model: the default preset, "
             f"embedding 10, MLP 400-400-400 with batch norm, {res['parameters']:,} parameters).", "",
             "**In-process latency** (`Predictor.predict_records`, 1 thread; raw JSON-style row in, probability out):",
             "", "| path | p50 ms | p99 ms |", "|---|---|---|"]
    names = {"raw_1row": "1 raw row (encode + model)", "encode_1row": "1 row, encoding only",
             "encoded_1row": "1 encoded row, model only", "raw_100rows": "100 raw rows"}
    for k, label in names.items():
        lines.append(f"| {label} | {lat[k]['p50_ms']:.3f} | {lat[k]['p99_ms']:.3f} |")
    lines += ["", f"**Batch scoring from Parquet** ({res['scoring'][0]['rows']:,} rows, end to end: decode + encode + "
              "model, 2 threads):", "", "| engine | rows/s end to end | decode + encode s | model s | model rows/s |",
              "|---|---|---|---|---|"]
    for s in res["scoring"]:
        lines.append(f"| {s['engine']} | {s['rows_per_s']:,.0f} | {s['decode_encode_s']:.1f} | {s['model_s']:.1f} | "
                     f"{s['model_rows_per_s']:,.0f} |")
    lines += quantised_table(res)
    if res.get("http"):
        lines += ["", f"**HTTP** (`deepfm serve`, wrk on the same 2 cores, {res['http_seconds']} s per run):", "",
                  "| workers | rows/request | concurrency | requests/s | p50 ms | p99 ms | errors "
                  "| RSS MB start -> end |",
                  "|---|---|---|---|---|---|---|---|"]
        for h in res["http"]:
            lines.append(f"| {h['workers']} | {h['rows_per_request']} | {h['concurrency']} | "
                         f"{h['requests_per_s']:,.0f} | {h['p50_ms']:.1f} | {h['p99_ms']:.1f} | {h['errors']} | "
                         f"{h['rss_mb_start']:.0f} -> {h['rss_mb_end']:.0f} |")
    return "\n".join(lines)


def quantised_table(res: dict) -> list[str]:
    """The quantised engines against torch fp32 (model time only), with their parity figures."""
    base = next((s for s in res["scoring"] if s["engine"] == "torch"), None)
    quant = [s for s in res["scoring"] if "parity" in s]
    if base is None or not quant:
        return []
    lines = ["", "**Quantised scoring** (model time against torch fp32, same run; parity on the first 10k rows "
             "scored, targets max |dp| <= 2e-3, AUC difference <= 5e-4):", "",
             "| engine | model rows/s | x fp32 | max abs dp | AUC difference | parity |", "|---|---|---|---|---|---|"]
    for s in quant:
        p = s["parity"]
        d_auc = "n/a" if p["d_auc"] is None else f"{p['d_auc']:.1e}"
        lines.append(f"| {s['engine']} | {s['model_rows_per_s']:,.0f} | "
                     f"{s['model_rows_per_s'] / base['model_rows_per_s']:.2f} | {p['max_dp']:.1e} | {d_auc} | "
                     f"{'holds' if p['ok'] else 'fails'} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "serve")
    ap.add_argument("--rows", type=int, default=1_200_000, help="synthetic rows (train split -> Parquet scoring)")
    ap.add_argument("--http-seconds", type=int, default=10)
    ap.add_argument("--workers", default="1,2", help="server worker counts to load-test")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--engines", default="torch,onnxruntime,int8,bf16",
                    help="batch-scoring engines, side by side (int8, bf16, auto: deepfm.serve.quantize)")
    ap.add_argument("--tag", default="", help="results go to results/serve-TAG.json (e.g. a small run)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    data, bundle, parquet = prepare(a.work, a.rows)
    from deepfm.serve.bundle import load

    res = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_line(),
           "parameters": sum(p.numel() for p in load(bundle).model.parameters())}
    res["in_process"] = in_process(bundle, data)
    print(json.dumps(res["in_process"]), flush=True)
    res["cpu_flags"] = cpu_flags()
    res["scoring"] = [batch_scoring(bundle, parquet, e, threads=0) for e in a.engines.split(",")]
    print(json.dumps(res["scoring"]), flush=True)
    res["http_seconds"] = a.http_seconds
    if not a.skip_http:
        if shutil.which("wrk") is None:
            sys.exit("wrk not found: apt-get install wrk (or pass --skip-http)")
        res["http"] = [r for w in a.workers.split(",") for r in http(bundle, data, a.work, int(w), a.http_seconds)]
    res["peak_rss_mb_benchmark"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = ROOT / "benchmarks" / "results"
    (out / "history").mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=1)
    name = f"serve-{a.tag}" if a.tag else "serve"
    (out / f"{name}.json").write_text(text)
    (out / "history" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(text)
    block = render(res)
    print(block)
    if not a.no_docs:
        write_docs("serve", block)


if __name__ == "__main__":
    main()
