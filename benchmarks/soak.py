"""Soak test: `deepfm serve` (default workers) under steady wrk load, watching for errors and memory growth.

    python benchmarks/soak.py                      # 60 s at concurrency 64 (~3 minutes with the first training)
    python benchmarks/soak.py --seconds 600 --concurrency 128 --bundle path/to/bundle

Requests hold one row each, cycling through 2,000 real rows (the synthetic test split, or --data in the bundle's
format), so vocabulary hits, unseen values and missing values all occur. Without --bundle, a small one is trained
once into benchmarks/.work/soak (`deepfm synth --rows 200000`, then `deepfm train --epochs 1`, default preset).
After a 5 s warm-up, reports requests/s, p50/p99 latency, errors (connect/read/write/timeout, non-2xx responses,
tracebacks in the server's log) and the RSS of the server's processes (the parent and its workers, VmRSS from
/proc) at the start, every 10 s and at the end. Exits non-zero on any error, or if RSS grows by more than
--rss-tolerance-mb from start to end. Results: benchmarks/results/soak.json. wrk: `apt-get install wrk`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from run import cpu_line  # noqa: E402

WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {{}}
for line in io.lines("{bodies}") do bodies[#bodies + 1] = line end
local i = 0
init = function(args) i = math.random(#bodies) end
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("JSON {{\\"requests\\": %d, \\"duration_us\\": %d, \\"connect\\": %d, \\"read\\": %d, "
    .. "\\"write\\": %d, \\"timeout\\": %d, \\"non2xx\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d, "
    .. "\\"max_us\\": %d}}\\n", summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "deepfm.cli", *args], check=True)


def synthetic(work: Path) -> Path:
    """200,000 synthetic Criteo rows (train/valid/test), made once."""
    data = work / "data"
    if not (data / "oracle.json").exists():
        cli("synth", "--rows", "200000", "--seed", "0", "--out", str(data))
    return data


def small_bundle(work: Path) -> Path:
    """The default preset trained 1 epoch on the synthetic training split, made once."""
    data, bundle = synthetic(work), work / "bundle"
    if not (bundle / "manifest.json").exists():
        cli("train", "--format", "criteo", "--train", str(data / "train.tsv"), "--valid", str(data / "valid.tsv"),
            "--epochs", "1", "--seed", "0", "--out", str(bundle), "--quiet")
    return bundle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (uvicorn's workers and whatever they start)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def wrk(url: str, lua: Path, seconds: int, concurrency: int, latency: bool = True) -> subprocess.Popen:
    return subprocess.Popen(["wrk", f"-t{min(concurrency, 2)}", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s",
                             *(["--latency"] if latency else []), "-s", str(lua), url + "/v1/predict"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--bundle", type=Path, help="bundle to serve (default: train a small one)")
    ap.add_argument("--data", type=Path, help="rows for the requests, in the bundle's format (default: the "
                    "synthetic test split)")
    ap.add_argument("--sample-every", type=int, default=10, help="RSS sample period, seconds")
    ap.add_argument("--rss-tolerance-mb", type=float, default=32.0,
                    help="largest RSS growth from start to end that counts as flat")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "soak")
    a = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    a.work.mkdir(parents=True, exist_ok=True)
    bundle = a.bundle or small_bundle(a.work)
    data = a.data or synthetic(a.work) / "test.tsv"
    fmt = json.loads((bundle / "manifest.json").read_text()).get("data_format") or "criteo"

    from deepfm.data import readers

    rows = readers.read(data, fmt).table.slice(0, 2000).to_pylist()
    bodies = a.work / "bodies.jsonl"
    bodies.write_text("".join(json.dumps({"rows": [r]}, separators=(",", ":")) + "\n" for r in rows))
    lua = a.work / "soak.lua"
    lua.write_text(WRK_LUA.format(bodies=bodies))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = a.work / "server.log"
    with open(log, "wb") as fh:
        server = subprocess.Popen([sys.executable, "-m", "deepfm.cli", "serve", str(bundle), "--port", str(port),
                                   "--log-level", "warning"], stdout=fh, stderr=subprocess.STDOUT)
    try:
        for _ in range(1200):
            try:
                urllib.request.urlopen(url + "/healthz", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit("server exited:\n" + log.read_text()[-3000:])
                time.sleep(0.1)
        time.sleep(2.0)  # every worker up
        warm = wrk(url, lua, 5, a.concurrency, latency=False).communicate()[0]
        warm_rate = re.search(r"Requests/sec:\s*(\S+)", warm)
        pids = descendants(server.pid)
        print(f"serving {bundle} on {url}: {len(pids)} processes; 5 s warm-up: "
              f"{warm_rate.group(1) if warm_rate else '?'} requests/s", flush=True)

        samples = [{"t_s": 0.0, "rss_mb": rss_mb(descendants(server.pid))}]
        print(f"  t=0 s: RSS {samples[0]['rss_mb']:.1f} MB", flush=True)
        t0 = time.monotonic()
        proc = wrk(url, lua, a.seconds, a.concurrency)
        next_at = a.sample_every
        while proc.poll() is None:
            time.sleep(min(0.2, max(0.0, t0 + next_at - time.monotonic())))
            if time.monotonic() - t0 >= next_at and proc.poll() is None:
                samples.append({"t_s": round(time.monotonic() - t0, 1), "rss_mb": rss_mb(descendants(server.pid))})
                print(f"  t={samples[-1]['t_s']:.0f} s: RSS {samples[-1]['rss_mb']:.1f} MB", flush=True)
                next_at += a.sample_every
        out = proc.stdout.read()
        samples.append({"t_s": round(time.monotonic() - t0, 1), "rss_mb": rss_mb(descendants(server.pid))})
        print(f"  end ({samples[-1]['t_s']:.0f} s): RSS {samples[-1]['rss_mb']:.1f} MB", flush=True)
        m = re.search(r"^JSON (.*)$", out, re.M)
        if m is None:
            sys.exit("wrk failed:\n" + out)
        w = json.loads(m.group(1))
        healthy = urllib.request.urlopen(url + "/healthz", timeout=10).status == 200
    finally:
        server.terminate()
        server.wait(timeout=30)

    text = log.read_text(errors="replace")
    errors = {k: w[k] for k in ("connect", "read", "write", "timeout", "non2xx")}
    errors["server_tracebacks"] = text.count("Traceback")
    errors["unhealthy_after"] = int(not healthy)
    growth = samples[-1]["rss_mb"] - samples[0]["rss_mb"]
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_line(), "bundle": str(bundle),
           "server_processes": len(pids), "seconds": a.seconds, "concurrency": a.concurrency,
           "rows_per_request": 1, "distinct_rows": len(rows), "requests": w["requests"],
           "requests_per_s": w["requests"] / (w["duration_us"] / 1e6), "p50_ms": w["p50_us"] / 1e3,
           "p99_ms": w["p99_us"] / 1e3, "max_ms": w["max_us"] / 1e3, "errors": errors,
           "total_errors": sum(errors.values()), "rss": samples, "rss_growth_mb": growth,
           "rss_tolerance_mb": a.rss_tolerance_mb, "rss_flat": growth <= a.rss_tolerance_mb}
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.json").write_text(json.dumps(res, indent=1))
    print(f"{res['requests']:,} requests in {a.seconds} s at concurrency {a.concurrency}: "
          f"{res['requests_per_s']:,.0f} requests/s, p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, "
          f"max {res['max_ms']:.0f} ms")
    print("errors: " + ", ".join(f"{k} {v}" for k, v in errors.items()))
    print("RSS MB (server processes): " + " -> ".join(f"{s['rss_mb']:.0f}" for s in samples)
          + f" (growth {growth:+.1f} MB, tolerance {a.rss_tolerance_mb:g})")
    if res["total_errors"]:
        print("FAIL: errors under load", file=sys.stderr)
        return 1
    if not res["rss_flat"]:
        print("FAIL: server memory grew", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
