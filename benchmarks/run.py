"""Side-by-side speed benchmark: deepfm against DeepCTR-Torch, pytorch-fm and FuxiCTR, in one run, on the
same synthetic Criteo-like data and the same machine, with one shared config (DeepFM, embedding 10,
MLP 400-400-400 ReLU, dropout 0.5, Adam 1e-3, batch 4096, 1 epoch, 2 threads).

    python benchmarks/run.py                       # both settings, all systems (about 40 min on 2 cores)
    python benchmarks/run.py --settings small --systems deepfm,deepfm-sparse --rows 240000

Settings:
  small: ``deepfm synth`` 1M train / 100k valid / 100k test rows, min-count 10 (a ~66k-row table);
  large: the same with ``--tail 0.98`` (one-off ids in the ten large fields) and min-count 1: a 10M+ row
         embedding table, where the cost of a dense optimiser over the whole table shows.

Each system runs in its own process (so peak RSS is its own), one after the other (never two at once: on 2
cores they would distort each other). Peers run from a separate virtualenv (benchmarks/peers/setup_peers.sh)
that reuses the CPU torch build. Writes benchmarks/results/<setting>.json and the tables in
docs/benchmarks.md between the ``bench:<setting>:<cpu kind>`` markers (one table per CPU kind measured, e.g.
``amd-epyc-avx2``, ``intel-xeon-amx``), with the date, the CPU line, its flags and the GEMM rate; every result
records the CPU model and flags too. deepfm runs in every precision the CPU supports: fp32 everywhere, and
bf16 (``deepfm-bf16``, ``deepfm-sparse-bf16``) where it has AVX512-BF16 or AMX.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from gemm import measure as gemm_measure  # noqa: E402

PEERS = ("deepctr", "torchfm", "fuxictr")
DEEPFM = {"deepfm": ["--embedding-update", "dense"], "deepfm-sparse": ["--embedding-update", "sparse"],
          "deepfm-bf16": ["--embedding-update", "dense", "--precision", "bf16"],
          "deepfm-sparse-bf16": ["--embedding-update", "sparse", "--precision", "bf16"]}
# the ISA flags that decide which precisions are fast here (recorded with every result)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8", "avx512_fp16")
# large: dense optimisers over a 10M-row table take minutes per hundred steps, so every system trains on
# the first 20 batches only (a throughput measurement; the AUC after 20 steps is not compared), and
# FuxiCTR, whose Ray preprocessing alone runs at ~12k rows/s, is left out of the default systems there.
SETTINGS = {"small": {"tail": 0.0, "min_count": 10, "train_limit": 0},
            "large": {"tail": 0.98, "min_count": 1, "train_limit": 20 * 4096, "skip": ("fuxictr",),
                      "rows": 1_320_000}}  # 1.1M train rows: 10M+ distinct values at min-count 1


def cpu_line() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores, {platform.machine()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU_FLAGS this CPU has (/proc/cpuinfo)."""
    try:
        m = re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return []
    have = set(m.group(1).split()) if m else set()
    return [f for f in CPU_FLAGS if f in have]


def has_fast_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def cpu_kind() -> str:
    """The docs table a run goes to: vendor and family words of the model name, then the fastest GEMM ISA,
    e.g. ``amd-epyc-avx2`` (Zen 3), ``amd-epyc-avx512bf16`` (Zen 4/5), ``intel-xeon-amx``."""
    words = re.sub(r"\((R|TM|tm)\)|\bprocessor\b|\bcpu\b", " ", cpu_line().split(",")[0], flags=re.I).split()
    flags = set(cpu_flags())
    isa = ("amx" if "amx_bf16" in flags else "avx512bf16" if "avx512_bf16" in flags
           else "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else platform.machine())
    return "-".join([*(w.lower() for w in words[:2]), isa])


def make_data(work: Path, setting: str, rows: int) -> Path:
    out = work / f"synth-{setting}-{rows}"
    if not (out / "oracle.json").exists():
        frac = 100_000 / 1_200_000
        cmd = [sys.executable, "-m", "deepfm.cli", "synth", "--rows", str(rows), "--seed", "0", "--out", str(out),
               "--valid-fraction", str(frac), "--test-fraction", str(frac), "--tail", str(SETTINGS[setting]["tail"])]
        subprocess.run(cmd, check=True)
    return out


def run_one(system: str, data: Path, min_count: int, out: Path, peers_python: Path, threads: int,
            timeout: float, train_limit: int = 0) -> dict:
    if system in PEERS:
        cmd = [str(peers_python), str(ROOT / "benchmarks/peers/run_peer.py"), "--system", system]
    else:
        cmd = [sys.executable, str(ROOT / "benchmarks/run_deepfm.py"), *DEEPFM[system]]
    cmd += ["--data", str(data), "--out", str(out), "--min-count", str(min_count), "--threads", str(threads)]
    if train_limit:
        cmd += ["--train-limit", str(train_limit)]
    print(f"[bench] {system}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"system": system, "error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0 or not out.exists():
        tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
        return {"system": system, "error": f"exit {p.returncode}: {' | '.join(tail)}"}
    res = json.loads(out.read_text())
    res["system"] = system
    res["cpu"], res["cpu_flags"] = cpu_line(), cpu_flags()
    res["wall_seconds"] = time.perf_counter() - t0
    print(f"[bench] {system}: done in {res['wall_seconds']:.0f} s", flush=True)
    return res


COLUMNS = [("system", "system", "{}"), ("preprocess_rows_per_s", "preprocess rows/s", "{:,.0f}"),
           ("train_samples_per_s", "train samples/s", "{:,.0f}"),
           ("score_samples_per_s", "scoring samples/s", "{:,.0f}"),
           ("latency_p50_ms", "1-row p50 ms", "{:.3f}"), ("latency_p99_ms", "1-row p99 ms", "{:.3f}"),
           ("peak_rss_mb", "peak RSS MB", "{:,.0f}"), ("test_auc", "test AUC", "{:.4f}"),
           ("test_logloss", "test logloss", "{:.4f}"), ("embedding_rows", "embedding rows", "{:,}")]


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['system']} | failed: {r['error']} |" + " |" * (len(COLUMNS) - 2))
            continue
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            cells.append("n/a" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gemm_limit(r: dict, gemm: dict) -> int:
    """The GEMM-bound limit (samples/s) a system's training is compared with: the one its own process
    measured right after training when there is one (``gemm_after_train``), else the run's."""
    g = r.get("gemm_after_train") or gemm
    return g["bf16_limit_samples_per_s"] if "bf16" in r["system"] else g["fp32_limit_samples_per_s"]


def ratios(results: list[dict], gemm: dict) -> str:
    ok = [r for r in results if "error" not in r]
    peers = [r for r in ok if r["system"] in PEERS]
    ours = [r for r in ok if r["system"].startswith("deepfm")]
    if not peers or not ours:
        return ""
    best_train = max(peers, key=lambda r: r["train_samples_per_s"])
    best_score = max(peers, key=lambda r: r["score_samples_per_s"])
    best_auc = max(r["test_auc"] for r in peers)
    out = []
    dc = next((r for r in peers if r["system"] == "deepctr"), None)
    for r in ours:
        limit = gemm_limit(r, gemm)
        parts = [f"training {r['train_samples_per_s'] / best_train['train_samples_per_s']:.2f}x the best peer "
                 f"({best_train['system']})",
                 f"{100 * r['train_samples_per_s'] / limit:.0f}% of the GEMM-bound limit ({limit:,} samples/s"
                 + (", measured in its own process right after training)" if r.get("gemm_after_train") else ")"),
                 f"AUC {r['test_auc'] - best_auc:+.4f} vs the best peer's",
                 f"scoring {r['score_samples_per_s'] / best_score['score_samples_per_s']:.2f}x the best peer "
                 f"({best_score['system']})",
                 f"peak RSS {r['peak_rss_mb'] / min(p['peak_rss_mb'] for p in peers):.2f}x the lowest peer's"]
        if dc:
            parts.append(f"preprocessing {r['preprocess_rows_per_s'] / dc['preprocess_rows_per_s']:.1f}x "
                         "DeepCTR-Torch's pandas path")
        out.append(f"- **{r['system']}**: " + "; ".join(parts) + ".")
    return "\n".join(out)


def write_docs(setting: str, block: str, kind: str) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    start, end = f"<!-- bench:{setting}:{kind}:start -->", f"<!-- bench:{setting}:{kind}:end -->"
    new = f"{start}\n{block}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + new + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n{new}\n"
    doc.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="small,large")
    ap.add_argument("--systems", default=",".join([*PEERS, *DEEPFM]))
    ap.add_argument("--rows", type=int, default=1_200_000, help="total rows; train is 10/12 of them")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work")
    ap.add_argument("--peers-venv", type=Path, default=ROOT / "benchmarks" / ".peers-venv")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    a = ap.parse_args()
    systems = [s for s in a.systems.split(",") if s]
    for s in [s for s in systems if s.endswith("-bf16")]:
        if not has_fast_bf16():
            print(f"[bench] skipping {s}: this CPU has no AVX512-BF16/AMX (see the GEMM rates)")
            systems.remove(s)
    if any(s in PEERS for s in systems):
        subprocess.run(["bash", str(ROOT / "benchmarks/peers/setup_peers.sh"), str(a.peers_venv)], check=True)
    gemm = gemm_measure(a.threads)
    print(f"[bench] GEMM: {json.dumps(gemm)}", flush=True)
    date = datetime.date.today().isoformat()
    kind = cpu_kind()
    for setting in a.settings.split(","):
        conf = SETTINGS[setting]
        rows = conf.get("rows", a.rows) if a.rows == ap.get_default("rows") else a.rows
        data = make_data(a.work, setting, rows)
        results = []
        for system in systems:
            if system in conf.get("skip", ()) and a.systems == ap.get_default("systems"):
                print(f"[bench] {setting}: {system} left out by default (see SETTINGS)", flush=True)
                continue
            out = a.work / "results" / setting / f"{system}.json"
            out.unlink(missing_ok=True)
            results.append(run_one(system, data, conf["min_count"], out, a.peers_venv / "bin" / "python",
                                   a.threads, a.timeout, conf["train_limit"]))
        record = {"setting": setting, "date": date, "cpu": cpu_line(), "cpu_flags": cpu_flags(), "cpu_kind": kind,
                  "threads": a.threads, "rows": rows,
                  "min_count": conf["min_count"], "tail": conf["tail"], "train_limit": conf["train_limit"],
                  "gemm": gemm,
                  "command": "python " + " ".join(sys.argv), "results": results}
        res_path = ROOT / "benchmarks" / "results" / f"{setting}-{kind}.json"
        res_path.parent.mkdir(parents=True, exist_ok=True)
        res_path.write_text(json.dumps(record, indent=2) + "\n")
        history = res_path.parent / "history" / f"{setting}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        history.parent.mkdir(exist_ok=True)  # every run kept: timings on a shared VM vary run to run
        history.write_text(json.dumps(record, indent=2) + "\n")
        block = (f"Setting **{setting}** ({rows:,} synthetic rows: 10/12 train, 1/12 valid, 1/12 test; "
                 f"min-count {record['min_count']}, tail {record['tail']}"
                 + (f"; training on the first {conf['train_limit']:,} rows, so the AUC is not comparable"
                    if conf["train_limit"] else "")
                 + f"), {date}, {record['cpu']} (flags: {' '.join(record['cpu_flags']) or 'none of those below'}), "
                 f"{a.threads} threads. GEMM (benchmarks/gemm.py, MLP shapes, batch 4096): fp32 "
                 f"{gemm['fp32_gflops']} GFLOP/s -> limit {gemm['fp32_limit_samples_per_s']:,} samples/s; bf16 "
                 f"{gemm['bf16_gflops']} GFLOP/s -> limit {gemm['bf16_limit_samples_per_s']:,} samples/s, "
                 "measured at the start of the run; each deepfm process measures it again right after its "
                 "training (`gemm_after_train`), and its fraction of the limit uses that.\n"
                 f"Command: `{record['command']}` (raw results: benchmarks/results/{res_path.name})\n\n"
                 + table(results) + "\n\n" + ratios(results, gemm))
        print(block, flush=True)
        if not a.no_docs:
            write_docs(setting, block, kind)


if __name__ == "__main__":
    main()
