"""Kill test: SIGKILL a training run at random moments, resume it each time, and check that it ends with the
same model and metrics as an uninterrupted run (bit-identical on CPU).

    python scripts/kill_test.py                       # 5 kills on 20k synthetic rows (about a minute)
    python scripts/kill_test.py --kills 10 --rows 100000

Each kill lands at a random moment after the run (re)started writing checkpoints, so kills hit every phase:
training steps, checkpoint writes, validation, the bundle write. Exit status 0 when the final bundle is
identical to the reference, 1 otherwise. Run by tests/test_resume.py (slow) in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def train_cmd(data: Path, out: Path, a: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "deepfm.cli", "train", "--format", "criteo", "--train", str(data / "train.tsv"),
            "--valid", str(data / "valid.tsv"), "--out", str(out), "--epochs", str(a.epochs), "--batch-size", "256",
            "--set", "model.hidden=[64,64]", "--checkpoint-every", str(a.checkpoint_every), "--seed", "7",
            "--quiet"]


def checkpoints(out: Path) -> set[str]:
    d = out / "checkpoints"
    return {p.name for p in d.iterdir() if p.name.startswith("step-")} if d.is_dir() else set()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("kill-test"))
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    a.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DEEPFM_CACHE": str(a.work / "cache")}
    data = a.work / "data"
    if not (data / "oracle.json").exists():
        subprocess.run([sys.executable, "-m", "deepfm.cli", "synth", "--rows", str(a.rows), "--seed", "3",
                        "--vocab-scale", "0.05", "--out", str(data)], check=True, env=env, stdout=subprocess.DEVNULL)
    ref, run = a.work / "reference", a.work / "killed"
    for d in (ref, run):
        subprocess.run(["rm", "-rf", str(d)], check=True)
    t = time.perf_counter()
    subprocess.run(train_cmd(data, ref, a), check=True, env=env, stderr=subprocess.DEVNULL)
    print(f"uninterrupted run: {time.perf_counter() - t:.1f} s")

    kills, log = 0, []
    while kills < a.kills:
        before = checkpoints(run)
        proc = subprocess.Popen(train_cmd(data, run, a) + ["--resume"], env=env, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and checkpoints(run) <= before:  # wait until this run writes a checkpoint
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:
            print("the run finished before the kill; starting over for the remaining kills")
            subprocess.run(["rm", "-rf", str(run)], check=True)
            continue
        os.kill(proc.pid, signal.SIGKILL)
        err = proc.communicate()[1]
        kills += 1
        resumed = [line for line in err.splitlines() if "resuming from" in line or "no checkpoint" in line]
        log.append(f"kill {kills}: {resumed[0].split('] ')[-1] if resumed else 'fresh start'} -> killed; "
                   f"checkpoints now {sorted(checkpoints(run))}")
        print(log[-1], flush=True)
    final = subprocess.run(train_cmd(data, run, a) + ["--resume"], env=env, stderr=subprocess.PIPE, text=True)
    if final.returncode != 0:
        print(final.stderr[-3000:])
        return 1
    print("final run: " + next((ln.split("] ")[-1] for ln in final.stderr.splitlines() if "resuming" in ln), "?"))

    wa, wb = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    same_weights = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (ref, run))
    ha, hb = ([{k: v for k, v in e.items() if k.startswith("valid_")} for e in
               json.loads((d / "training.json").read_text())["history"]] for d in (ref, run))
    ok = same_weights and ma == mb and ha == hb
    print(f"kills survived: {kills}; weights bit-identical: {same_weights}; metrics identical: {ma == mb}; "
          f"per-epoch validation identical: {ha == hb}")
    print(f"valid AUC reference {ma['valid']['auc']:.6f}, resumed {mb['valid']['auc']:.6f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
