"""`deepfm compare` (deepfm.compare + deepfm.report): a tiny end-to-end comparison of lr, fm and deepfm over
2 seeds, its tables, plots and self-contained report, resuming, the budget, and the errors."""

from __future__ import annotations

import base64
import csv
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from deepfm.commands.compare import compare_command
from deepfm.compare import compare, relaimpr

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ("validation_auc.png", "roc.png", "calibration.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from deepfm.synth import generate

    out = tmp_path_factory.mktemp("cmpdata")
    generate(out, rows=4000, seed=1, vocab_scale=0.01)
    return out


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--format", "criteo", "--train", str(data / "train.tsv"), "--valid", str(data / "valid.tsv"),
            "--test", str(data / "test.tsv"), "--epochs", "2", "--set", "model.hidden=[16]", "--threads", "1",
            "--cache-dir", str(out.parent / "cache"), "--out", str(out), *extra]


def invoke(argv: list[str]):
    return CliRunner().invoke(compare_command, argv, catch_exceptions=False)


@pytest.fixture(scope="module")
def first(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "out"
    r = invoke(args(data, out, "--models", "lr,fm,deepfm", "--seeds", "2"))
    assert r.exit_code == 0, r.output
    return out, r.output


def test_relaimpr():
    assert relaimpr(0.8007, 0.7686) == pytest.approx(((0.8007 - 0.5) / (0.7686 - 0.5) - 1) * 100)
    assert relaimpr(0.7, 0.7) == 0.0
    assert relaimpr(0.7, None) is None and relaimpr(0.7, 0.5) is None


def test_runs_progress_and_tables(first):
    out, output = first
    assert "6 run(s) trained, 0 reused, 0 missing" in output
    for k in range(1, 7):
        assert f"[{k}/6]" in output
    assert re.search(r"\[6/6\] deepfm seed 2: test AUC 0\.\d{4} logloss 0\.\d{5}, best epoch \d of 2, [\d.]+ s", output)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["model"], r["seed"]) for r in rows] == [(m, s) for s in "12" for m in ("lr", "fm", "deepfm")]
    for r in rows:
        assert 0.5 < float(r["test_auc"]) < 1 and 0 < float(r["test_logloss"]) < 1
        assert int(r["best_epoch"]) in (1, 2) and float(r["train_seconds"]) > 0
    md = (out / "table.md").read_text()
    for name in ("LR", "FM", "DeepFM"):
        cells = (rf"\| {name} \| 0\.\d{{4}} ± 0\.\d{{4}} \| 0\.\d{{5}} ± 0\.\d{{5}} \| \d\.\d{{5}} ± 0\.\d{{5}} \| "
                 rf"[+-]\d+\.\d\d% \| 2 \|")  # AUC, logloss, NE, RelaImpr
        assert re.search(cells, md)
    assert "| LR |" in md and "+0.00%" in md and "RelaImpr = ((AUC_model - 0.5)" in md
    table = {r["model"]: r for r in csv.DictReader(open(out / "table.csv"))}
    auc = {m: float(table[m]["auc_mean"]) for m in table}
    lr, d = auc["lr"] - 0.5, auc["deepfm"] - 0.5
    # the csv's AUCs are rounded to 6 decimals (<= 5e-7 off) and the percentage to 4
    tol = 100 * 5e-7 * (1 / lr + d / lr**2) + 5e-5
    assert float(table["deepfm"]["relaimpr_percent"]) == pytest.approx((d / lr - 1) * 100, abs=tol)
    # one preprocessing for every run: the bundles carry the same preprocessor.json
    prep = {hashlib.sha256((d / "preprocessor.json").read_bytes()).hexdigest() for d in (out / "runs").iterdir()}
    assert len(prep) == 1 and len(list((out / "runs").glob("*/done.json"))) == 6


def test_plots_are_images(first):
    out, _ = first
    pil = pytest.importorskip("PIL.Image")
    for name in PLOTS:
        p = out / name
        assert p.read_bytes()[:8] == PNG
        with pil.open(p) as im:
            im.verify()
        with pil.open(p) as im:
            assert im.size[0] > 400 and im.size[1] > 300


def test_report_is_self_contained(first):
    out, _ = first
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", page, flags=re.I)
    assert "<link" not in page and "<script" not in page
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(srcs) == 3
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        assert base64.b64decode(s.split(",", 1)[1])[:8] == PNG
    for text in ("deepfm compare --format criteo", "--models lr,fm,deepfm", "6 of 6 runs complete", "DeepFM",
                 "RelaImpr", "torch", "numpy", "pyarrow", "vocabulary", "3,200 / 400 / 400", "CPU", "logical",
                 "runs/fm-seed2"):
        assert text in page, text


def test_rerun_skips_done_runs_and_redoes_a_deleted_one(first, data, tmp_path):
    out = tmp_path / "out"  # a copy: the other tests keep the first invocation's output
    shutil.copytree(first[0], out)
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/done.json")}
    r = invoke(args(data, out, "--models", "lr,fm,deepfm", "--seeds", "2"))
    assert r.exit_code == 0, r.output
    assert "0 run(s) trained, 6 reused, 0 missing" in r.output and "done earlier, skipped" in r.output
    assert {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/done.json")} == stamps
    shutil.rmtree(out / "runs" / "fm-seed2")
    r = invoke(args(data, out, "--models", "lr,fm,deepfm", "--seeds", "2"))
    assert r.exit_code == 0, r.output
    assert "1 run(s) trained, 5 reused, 0 missing" in r.output
    assert "[6/6] fm seed 2: test AUC" in r.output
    now = {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/done.json")}
    assert {k for k in now if now[k] != stamps[k]} == {"fm-seed2"}
    # a changed configuration is another run: nothing is reused
    r = invoke(args(data, out, "--models", "lr", "--seeds", "1", "--set", "train.lr=0.002"))
    assert "1 run(s) trained, 0 reused" in r.output


def test_without_lr_relaimpr_is_blank(data, tmp_path):
    res = compare(data / "train.tsv", data / "test.tsv", tmp_path / "out", fmt="criteo", models="fm", seeds=1,
                  valid_path=data / "valid.tsv", overrides=["model.hidden=[16]"], epochs=1, threads=1,
                  cache_dir=tmp_path / "cache", echo=lambda s: None)
    assert [r.status for r in res.runs] == ["trained"] and res.rows[0]["relaimpr"] is None
    md = (tmp_path / "out" / "table.md").read_text()
    assert "RelaImpr needs lr" in md and re.search(r"\| FM \| 0\.\d{4} \(1 seed\) \| .* \|  \| 1 \|", md)
    assert "RelaImpr needs lr" in (tmp_path / "out" / "report.html").read_text()


def test_streaming(data, tmp_path):
    argv = args(data, tmp_path / "out", "--models", "lr", "--seeds", "1", "--streaming")
    argv[argv.index("--valid"): argv.index("--valid") + 2] = ["--valid-fraction", "0.1"]
    r = invoke(argv)
    assert r.exit_code == 0 and "1 run(s) trained" in r.output, r.output
    page = (tmp_path / "out" / "report.html").read_text()
    assert "shards on disk (--streaming)" in page and "--streaming" in page and "split seed 2017" in page


def test_budget_spent_lists_missing_runs(data, tmp_path):
    r = invoke(args(data, tmp_path / "out", "--models", "lr,deepfm", "--seeds", "1", "--budget-minutes", "0"))
    assert r.exit_code == 0, r.output
    assert "0 run(s) trained, 0 reused, 2 missing" in r.output and "budget" in r.output
    page = (tmp_path / "out" / "report.html").read_text()
    assert "0 of 2 runs complete" in page and "lr-seed1, deepfm-seed1" in page and "budget" in page
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize("extra, message", [
    (["--models", "lr,xgboost"], "unknown model(s) 'xgboost'"),
    (["--models", "lr", "--seeds", "0"], "--seeds must be a positive integer"),
])
def test_errors(data, tmp_path, extra, message):
    r = CliRunner().invoke(compare_command, args(data, tmp_path / "out", *extra))
    assert r.exit_code == 2 and "error: " in r.output and message in r.output, r.output


def test_missing_test_file(data, tmp_path):
    argv = args(data, tmp_path / "out", "--models", "lr")
    argv[argv.index("--test") + 1] = str(tmp_path / "nope.tsv")
    r = CliRunner().invoke(compare_command, argv)
    assert r.exit_code == 2 and "--test" in r.output and "no such file" in r.output, r.output


@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
                    reason="no headless chromium (apt-get install -y chromium)")
def test_report_renders_in_chromium(first, tmp_path):
    out, _ = first
    shot = tmp_path / "report.png"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_report.py"), str(out / "report.html"),
                        "--screenshot", str(shot)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 image(s)" in r.stdout and "ok: every image decoded" in r.stdout
    assert shot.read_bytes()[:8] == PNG and shot.stat().st_size > 50_000
