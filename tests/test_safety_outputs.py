"""Safe outputs (issue 14 items 1, 2, 13 write side, 17; issue 20 item 5): deepfm never replaces a folder or
file that is not its own artifact (without --force) nor one that holds the run's input (even with --force);
outputs are locked while written (a second writer is refused, never interleaved), written under unique
temporary names, and follow the umask; SIGTERM/SIGINT drop partial writes and exit 143/130; a full disk is
one clear error; a damaged checkpoint state.json falls back to the previous checkpoint."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import SafetensorError

from deepfm import outputs, pipeline
from deepfm.cli import main
from deepfm.errors import DeepFMError
from deepfm.serve import bundle as B
from deepfm.train import checkpoint as ck

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--epochs", "1", "--batch-size", "512", "--quiet", "--set", "model.hidden=[16]"]
ENOSPC_SAFETENSORS = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                      'left on device" })')


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def train_args(synth: Path, out: Path, *extra: object) -> list[object]:
    return ["train", "--format", "criteo", "--train", synth / "train.tsv", "--valid", synth / "valid.tsv",
            "--out", out, *FAST, *extra]


@pytest.fixture(scope="module")
def trained(synth_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety") / "bundle"
    r = run(*train_args(synth_small, out))
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def prepared(synth_small):
    return pipeline.prepare(synth_small / "train.tsv", "criteo", None, synth_small / "valid.tsv", seed=11,
                            use_cache=False)


def _configs(extra: list[str] | None = None):
    return pipeline.resolve_config("default", ["model.hidden=[16]", "train.batch_size=512", "train.epochs=2",
                                               "train.checkpoint_every=3", "train.seed=11", *(extra or [])])


def _leftovers(folder: Path) -> list[str]:
    """Temporary or lock files deepfm may have left in ``folder`` (recursively)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp" in p.name or
                  p.name.endswith(".lock") or ".old-" in p.name)


class _Holder:
    """Another process holding the write lock of ``path`` (what a concurrent deepfm run does)."""

    def __init__(self, path: Path) -> None:
        code = ("import sys; from deepfm import outputs\n"
                f"with outputs.locked({str(path)!r}):\n    print('held', flush=True); sys.stdin.read()\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def __enter__(self) -> _Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ------------------------------------------------------------------ item 1: never destroy what is not ours
def test_train_refuses_a_folder_that_is_not_a_bundle(synth_small, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    r = run(*train_args(synth_small, out))
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and str(out) in r.output and "--force" in r.output
    assert (out / "notes.txt").read_text() == "my notes" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert _leftovers(tmp_path) == []


def test_train_force_replaces_and_a_bundle_is_replaced_without_it(synth_small, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    r = run(*train_args(synth_small, out, "--force"))
    assert r.exit_code == 0, r.output
    assert (out / "manifest.json").exists() and not (out / "notes.txt").exists()
    b = B.load(out)  # its own bundle: replaced without --force
    B.save(out, b.model, b.preprocessor, "criteo", b.training, b.metrics)
    B.load(out)
    assert _leftovers(tmp_path) == []


def test_train_never_replaces_the_folder_holding_its_data(synth_small, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_bytes((synth_small / "train.tsv").read_bytes())
    for extra in ([], ["--force"]):
        r = run("train", "--format", "criteo", "--train", data / "train.tsv", "--out", data, *FAST, *extra)
        assert r.exit_code == 2, r.output
        assert "holds an input" in r.output and str(data) in r.output
    assert (data / "train.tsv").read_bytes() == (synth_small / "train.tsv").read_bytes()


def test_bundle_save_api_refuses_a_foreign_folder(trained, tmp_path):
    b = B.load(trained)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DeepFMError, match="not a deepfm model bundle.*--force"):
        B.save(out, b.model, b.preprocessor, "criteo", b.training, b.metrics)
    assert (out / "keep.txt").read_text() == "x"
    B.save(out, b.model, b.preprocessor, "criteo", b.training, b.metrics, force=True)
    B.load(out)


def test_predict_out_checks(trained, synth_small, tmp_path):
    test = synth_small / "test.tsv"
    mine = tmp_path / "mine.csv"
    mine.write_text("a,b\n1,2\n")
    r = run("predict", trained, test, "--out", mine, "--quiet")
    assert r.exit_code == 2 and "--force" in r.output and mine.read_text() == "a,b\n1,2\n", r.output
    r = run("predict", trained, test, "--out", mine, "--quiet", "--force")
    assert r.exit_code == 0, r.output
    assert mine.read_text().splitlines()[0].strip('"') == "probability"
    for name in ("again.csv", "again.parquet"):  # its own output: overwritten without --force
        for _ in range(2):
            r = run("predict", trained, test, "--out", tmp_path / name, "--quiet")
            assert r.exit_code == 0, r.output
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    r = run("predict", trained, test, "--out", folder, "--quiet")
    assert r.exit_code == 2 and "is a folder" in r.output, r.output
    copy = tmp_path / "data.csv"
    copy.write_bytes(test.read_bytes())
    r = run("predict", trained, copy, "--format", "criteo", "--out", copy, "--quiet", "--force")
    assert r.exit_code == 2 and "holds an input" in r.output and copy.read_bytes() == test.read_bytes(), r.output
    assert _leftovers(tmp_path) == []


def test_export_out_checks(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "folder"
    folder.mkdir()
    r = run("export", trained, "--out", folder, "--check-rows", 10)
    assert r.exit_code == 2 and "is a folder" in r.output, r.output
    mine = tmp_path / "model.onnx"
    mine.write_bytes(b"not an export")
    r = run("export", trained, "--out", mine, "--check-rows", 10)
    assert r.exit_code == 2 and "--force" in r.output and mine.read_bytes() == b"not an export", r.output
    r = run("export", trained, "--out", mine, "--check-rows", 10, "--force")
    assert r.exit_code == 0, r.output
    r = run("export", trained, "--out", mine, "--check-rows", 10)  # its own export: no --force needed
    assert r.exit_code == 0, r.output
    r = run("export", trained, "--out", trained / "model.safetensors", "--check-rows", 10, "--force")
    assert r.exit_code == 2 and "inside the bundle" in r.output, r.output
    assert _leftovers(tmp_path) == []


def test_failed_export_check_keeps_the_earlier_export(trained, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from deepfm.serve import export as E

    out = tmp_path / "m.onnx"
    assert run("export", trained, "--out", out, "--check-rows", 10).exit_code == 0
    before = out.read_bytes()
    monkeypatch.setattr(E, "check_export", lambda *a, **k: 1.0)
    r = run("export", trained, "--out", out, "--check-rows", 10)
    assert r.exit_code == 2 and "export check failed" in r.output, r.output
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_compare_and_tune_refuse_a_foreign_folder(synth_small, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "results.csv").write_text("mine")
    common = ["--format", "criteo", "--train", synth_small / "train.tsv", "--out", out]
    r = run("compare", *common, "--test", synth_small / "test.tsv", "--models", "lr", "--seeds", 1)
    assert r.exit_code == 2 and "not a deepfm compare output" in r.output and "--force" in r.output, r.output
    r = run("tune", *common, "--trials", 1)
    assert r.exit_code == 2 and "not a deepfm tune output" in r.output and "--force" in r.output, r.output
    assert (out / "results.csv").read_text() == "mine"
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_bytes((synth_small / "train.tsv").read_bytes())
    r = run("tune", "--format", "criteo", "--train", data / "train.tsv", "--out", data, "--trials", 1, "--force")
    assert r.exit_code == 2 and "holds an input" in r.output, r.output


def test_compare_never_deletes_a_foreign_run_folder(tmp_path):
    from deepfm import compare as C

    run_dir = tmp_path / "runs" / C.run_id("lr", 1)
    run_dir.mkdir(parents=True)
    (run_dir / "mine.txt").write_text("x")
    r = C.Run("lr", 1, "key", None, None)
    with pytest.raises(DeepFMError, match="refusing to delete"):
        C._train_one(pipeline, None, None, r, tmp_path, "criteo", "default", [])
    assert (run_dir / "mine.txt").read_text() == "x"


def test_checkpoints_folder_of_foreign_folder_is_refused(prepared, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "a.txt").write_text("x")
    with pytest.raises(DeepFMError, match="--force"):
        pipeline.train(prepared, *_configs(), out, "criteo", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # no checkpoints written into it either


# ------------------------------------------------------------------ item 2: locks, unique temporary names
def test_a_locked_output_is_refused_with_the_holders_pid(trained, synth_small, tmp_path):
    scores, out = tmp_path / "scores.csv", tmp_path / "bundle"
    for path in (scores, out):
        with _Holder(path) as h:
            if path == scores:
                r = run("predict", trained, synth_small / "test.tsv", "--out", scores, "--quiet")
            else:  # two trains to one --out: the second is refused (no mixed metrics.jsonl)
                r = run(*train_args(synth_small, out))
            assert r.exit_code == 2, r.output
            assert f"is being written by another deepfm process (pid {h.proc.pid})" in r.output
    assert not scores.exists() and not out.exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_concurrent_predicts_to_one_out_never_mix(trained, synth_small, tmp_path):
    lines = (synth_small / "test.tsv").read_text().splitlines(keepends=True)
    big = tmp_path / "big.tsv"
    big.write_text("".join(lines * 20))  # 12,000 rows
    out = tmp_path / "scores.csv"
    cmd = [sys.executable, "-m", "deepfm", "predict", str(trained), str(big), "--out", str(out), "--quiet",
           "--block-mb", "0.05", "--threads", "1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(rc in (0, 2) for rc, _ in results) and any(rc == 0 for rc, _ in results), results
    for rc, err in results:
        if rc == 2:
            assert "being written by another deepfm process" in err
    data = out.read_bytes()
    assert b"\x00" not in data and data.count(b"\n") == 12_001  # a header and one row per input row
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------ issue 20.5: modes follow the umask
def test_outputs_follow_the_umask(trained, synth_small, tmp_path):
    old = os.umask(0o022)
    try:
        b = B.load(trained)
        out = B.save(tmp_path / "b", b.model, b.preprocessor, "criteo", b.training, b.metrics)
        r = run("predict", trained, synth_small / "test.tsv", "--out", tmp_path / "s.parquet", "--quiet")
        assert r.exit_code == 0, r.output
        with outputs.atomic_file(tmp_path / "t.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert stat.S_IMODE((tmp_path / "s.parquet").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "t.txt").stat().st_mode) == 0o644


def test_checkpoint_folders_follow_the_umask(crashed):
    _, saved = crashed
    assert all(stat.S_IMODE(c.stat().st_mode) == 0o755 for c in saved)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for c in saved for f in c.iterdir())


# ------------------------------------------------------------------ item 17: SIGTERM / SIGINT
def test_sigterm_during_predict_leaves_no_temporary_file(trained, synth_small, tmp_path):
    lines = (synth_small / "test.tsv").read_text().splitlines(keepends=True)
    big = tmp_path / "big.tsv"
    big.write_text("".join(lines * 300))  # 180,000 rows, small blocks: scoring takes seconds
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    cmd = [sys.executable, "-m", "deepfm", "predict", str(trained), str(big), "--out", str(out_dir / "s.csv"),
           "--quiet", "--block-mb", "0.02", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(out_dir.glob(".s.csv.tmp*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 143, proc.stderr.read()
    assert list(out_dir.iterdir()) == []  # no temporary output, no lock file, no partial s.csv


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_checkpoint_write_leaves_no_tmp(synth_small, tmp_path, monkeypatch, signum, code):
    real = ck.save_file

    def save_file(tensors, path, *a, **k):  # the signal arrives while the checkpoint is being written
        real(tensors, path, *a, **k)
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(ck, "save_file", save_file)
    out = tmp_path / "m"
    r = run(*train_args(synth_small, out, "--checkpoint-every", 2))
    assert r.exit_code == code, r.output
    assert list((out / "checkpoints").iterdir()) == []  # the interrupted write was dropped, no .tmp-*
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------ item 13 (write side): disk full
def test_disk_full_in_safetensors_is_a_clear_error(prepared, tmp_path, monkeypatch):
    def full(*a, **k):
        raise SafetensorError(ENOSPC_SAFETENSORS)

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(DeepFMError, match="disk full while writing a checkpoint"):
        pipeline.train(prepared, *_configs(), tmp_path / "b", "criteo", progress=False)
    assert list((tmp_path / "b" / "checkpoints").iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(B, "save_file", full)  # the bundle write
    with pytest.raises(DeepFMError, match="disk full while writing the bundle"):
        pipeline.train(prepared, *_configs(["train.checkpoint_every=0", "train.epochs=1"]), tmp_path / "c", "criteo",
                       progress=False)
    assert not (tmp_path / "c" / "manifest.json").exists() and _leftovers(tmp_path) == []


def test_disk_full_while_predicting_is_a_clear_error(trained, synth_small, tmp_path, monkeypatch):
    import pyarrow.csv as pv

    class Full:
        def __init__(self, *a, **k):
            pass

        def write_table(self, table):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    monkeypatch.setattr(pv, "CSVWriter", Full)
    r = run("predict", trained, synth_small / "test.tsv", "--out", tmp_path / "s.csv", "--quiet")
    assert r.exit_code == 2, r.output
    assert "disk full while writing the predictions" in r.output
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_caching_is_a_clear_error(synth_small, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "save_store", full)
    cache = tmp_path / "cache"
    with pytest.raises(DeepFMError, match="disk full while writing the encoded-data cache.*--no-cache"):
        pipeline.prepare(synth_small / "train.tsv", "criteo", None, synth_small / "valid.tsv", seed=11,
                         cache_dir=cache)
    assert [p for p in cache.rglob("*")] == []  # no temporary cache entry left


# ------------------------------------------------------------------ item 13: damaged state.json
class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def crashed(prepared, tmp_path_factory):
    """A run killed right after its 3rd checkpoint (written under umask 022): (out, checkpoint folders)."""
    saved: list[Path] = []
    real = ck.Checkpointer.save

    def save(self, *a, **k):
        saved.append(real(self, *a, **k))
        if len(saved) == 3:
            raise Crash()
        return saved[-1]

    out = tmp_path_factory.mktemp("crashed") / "b"
    mp = pytest.MonkeyPatch()
    mp.setattr(ck.Checkpointer, "save", save)
    old = os.umask(0o022)
    try:
        with pytest.raises(Crash):
            pipeline.train(prepared, *_configs(), out, "criteo", progress=False)
    finally:
        os.umask(old)
        mp.undo()
    return out, saved[-2:]  # the 2 kept


@pytest.mark.parametrize("damage", ["value", "not-an-object", "no-fingerprint"])
def test_damaged_state_json_falls_back_to_the_previous_checkpoint(crashed, tmp_path, damage):
    import shutil

    src, (previous, newest) = crashed
    out = tmp_path / "b"
    shutil.copytree(src, out)
    state = out / "checkpoints" / newest.name / "state.json"
    meta = json.loads(state.read_text())
    fp = meta["fingerprint"]
    if damage == "value":  # still valid JSON, one number changed: only state.json's own checksum sees it
        meta["position"]["loss_sum"] += 1.0
        state.write_text(json.dumps(meta))
    elif damage == "not-an-object":
        state.write_text("[]")
    else:
        del meta["fingerprint"]
        state.write_text(json.dumps(meta))
    warned: list[str] = []
    found = ck.Checkpointer(out / "checkpoints", fp).latest(warn=warned.append)
    assert found is not None and found[0].name == previous.name
    assert warned and f"skipping damaged checkpoint {newest.name}" in warned[0]


def test_resume_past_a_damaged_state_json_completes(crashed, prepared, tmp_path, capsys):
    import shutil

    src, (_, newest) = crashed
    out = tmp_path / "b"
    shutil.copytree(src, out)
    state = out / "checkpoints" / newest.name / "state.json"
    meta = json.loads(state.read_text())
    meta["position"]["step"] += 1
    state.write_text(json.dumps(meta))
    pipeline.train(prepared, *_configs(), out, "criteo", progress=False, resume=True)
    assert f"skipping damaged checkpoint {newest.name}" in capsys.readouterr().err
    B.load(out)
