"""Inputs that lied or attacked (issue 14): a rewritten file that keeps its size and mtime must not reuse a
stale encoding (3); a "billion laughs" YAML is refused at once with a short message (10); an error run
exits 2 even on a busy machine, never an abort from threads still running at exit (18a); prediction
scores every input row, label rules drop rows only where labels are used (19)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from deepfm import pipeline
from deepfm import schema as S
from deepfm.cli import main
from deepfm.data import readers
from deepfm.data.store import file_identity
from deepfm.errors import DeepFMError, SchemaError
from deepfm.schema import Field, Schema

from .conftest import write

CSV_SCHEMA = Schema(fields=(Field("a"), Field("x", "numeric")), label="y")


# --------------------------------------------------------------------------- 3: cache keyed on content
def _csv(path: Path, labels: np.ndarray) -> None:
    path.write_text("y,a,x\n" + "".join(f"{y},v{i % 7},{i % 13}\n" for i, y in enumerate(labels)))


def test_cache_is_not_reused_for_a_rewrite_with_the_same_size_and_mtime(tmp_path, capsys):
    """All labels changed, same size, mtime put back (as ``cp -p``, ``rsync -t`` or ``tar x`` leave a file):
    the old key (path, size, mtime) reused the stale encoding and trained on the old labels."""
    data, cache = tmp_path / "d.csv", tmp_path / "cache"
    labels = (np.arange(300) % 3 == 0).astype(int)
    _csv(data, labels)
    st = data.stat()
    first = pipeline.prepare(data, "csv", CSV_SCHEMA, valid_fraction=0.2, cache_dir=cache)
    np.testing.assert_array_equal(first.train.label, labels)
    again = pipeline.prepare(data, "csv", CSV_SCHEMA, valid_fraction=0.2, cache_dir=cache)
    assert "using cached encoded data" in capsys.readouterr().err, "an unchanged file still hits the cache"
    np.testing.assert_array_equal(again.train.label, labels)

    _csv(data, 1 - labels)  # every label flipped: the same number of bytes
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (data.stat().st_size, data.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second = pipeline.prepare(data, "csv", CSV_SCHEMA, valid_fraction=0.2, cache_dir=cache)
    assert "using cached encoded data" not in capsys.readouterr().err
    np.testing.assert_array_equal(second.train.label, 1 - labels)  # trains on the new labels


def test_cache_write_uses_its_own_temporary_folder(tmp_path):
    """Two runs encoding the same data at once: each writes its own temporary folder (the fixed name
    ``.KEY.tmp`` let one run delete and publish the other's half-written entry)."""
    data, cache = tmp_path / "d.csv", tmp_path / "cache"
    _csv(data, (np.arange(100) % 2 == 0).astype(int))
    pipeline.prepare(data, "csv", CSV_SCHEMA, valid_fraction=0.2, cache_dir=cache)
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    shutil.rmtree(entry)
    other = cache / f".{entry.name}.tmp"  # another run's folder, mid-write
    other.mkdir()
    write(other / "half-written", b"x")
    again = pipeline.prepare(data, "csv", CSV_SCHEMA, valid_fraction=0.2, cache_dir=cache)
    assert (other / "half-written").read_bytes() == b"x", "the other run's temporary folder is left alone"
    assert (entry / "done").exists() and again.train.rows == 100
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == [other.name], "no temporary left"


def test_file_identity_follows_the_bytes(tmp_path):
    a = write(tmp_path / "a.tsv", b"1\tx\n0\ty\n")
    before = file_identity(a)
    st = a.stat()
    write(a, b"0\tx\n1\ty\n")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_identity(a) != before
    write(a, b"1\tx\n0\ty\n")  # the first bytes again, with a new mtime: the same identity (a cache hit)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert file_identity(a) == before


# --------------------------------------------------------------------------- 10: YAML aliases
def billion_laughs(head: str, indent: str) -> bytes:
    """~0.5 KB of YAML: under ``head``, a list of nested aliases whose last item expands to 9**8 (43 million)
    strings (the values sit where the loader looks at them: a field's name, a preset option)."""
    lines = [f'{indent}- &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        lines.append(f"{indent}- &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    return (head + "\n" + "\n".join(lines) + "\n").encode()


def _timed_in_subprocess(code: str, timeout: float = 30) -> dict:
    """Run ``code`` (which prints a JSON result) in a child, so that a failure (today: gigabytes and
    seconds) cannot take the test process with it."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_billion_laughs_schema_is_refused_fast_with_a_short_message(tmp_path):
    path = write(tmp_path / "s.yaml", billion_laughs("fields:\n  - name:", "    "))
    assert len(path.read_bytes()) < 600
    code = f"""
import json, resource, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from deepfm import schema
t = time.perf_counter()
try:
    schema.load({str(path)!r})
    out = {{"error": None}}
except BaseException as e:
    out = {{"type": type(e).__name__, "error": str(e)}}
out["seconds"] = time.perf_counter() - t
print(json.dumps(out))
"""
    res = _timed_in_subprocess(code)
    assert res["type"] == "SchemaError", res["type"]
    assert res["seconds"] < 1.0, res["seconds"]
    assert len(res["error"]) < 400 and "alias" in res["error"] and str(path) in res["error"], res["error"][:500]


@pytest.mark.parametrize("doc", [
    b"label: &y y\nfields: [*y]\n",  # a single alias: refused as well (a schema never needs one)
    b"base: &b {kind: numeric}\nfields:\n  - {<<: *b, name: x}\n",  # merge keys are aliases too
])
def test_any_yaml_alias_in_a_schema_is_refused(tmp_path, doc):
    with pytest.raises(SchemaError, match="aliases"):
        S.load(write(tmp_path / "s.yaml", doc))


def test_schema_messages_cut_long_values(tmp_path):
    """A value quoted in a message is cut to a few hundred characters (a 1 MB name is not echoed)."""
    path = write(tmp_path / "s.yaml", b"fields:\n  - {name: [" + b"x," * 200_000 + b"x]}\n")
    with pytest.raises(SchemaError) as e:
        S.load(path)
    assert len(str(e.value)) < 600, len(str(e.value))
    path = write(tmp_path / "s.yaml", b"fields:\n  - {name: a, kind: " + b"k" * 1_000_000 + b"}\n")
    with pytest.raises(SchemaError, match="unknown kind") as e:
        S.load(path)
    assert len(str(e.value)) < 600


def test_oversized_schema_file_is_refused_before_parsing(tmp_path):
    path = write(tmp_path / "s.yaml", b"fields: [a]\n" + b"#" * (S.MAX_SCHEMA_BYTES + 1))
    with pytest.raises(SchemaError, match="larger than"):
        S.load(path)


def test_billion_laughs_preset_and_set_are_refused_fast(tmp_path):
    from deepfm.config import apply_overrides, load_preset

    preset = write(tmp_path / "p.yaml", billion_laughs("model:\n  hidden:", "    "))
    t = time.perf_counter()
    with pytest.raises(DeepFMError) as e:
        load_preset(str(preset))
    assert time.perf_counter() - t < 1.0 and len(str(e.value)) < 400 and "alias" in str(e.value)
    with pytest.raises(DeepFMError) as e:
        apply_overrides({"model": {}, "train": {}}, ["model.hidden=[&a [1, 2], *a]"])
    assert "alias" in str(e.value) and len(str(e.value)) < 400


# --------------------------------------------------------------------------- 18a: error exits under load
def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


@pytest.mark.slow
def test_error_exit_is_clean_under_cpu_contention(tmp_path):
    """A run that ends with a clean error (a schema column missing from the file) exits 2, never 134
    (``terminate called without an active exception``: native worker threads alive at interpreter exit),
    on a machine busy with other jobs."""
    schema = write(tmp_path / "s.yaml", b"label: y\nfields: [a, {name: x, kind: numeric}, zz]\n")
    data = tmp_path / "f.csv"
    data.write_text("y,a,x\n" + "".join(f"{i % 2},v{i % 97},{i * 0.5}\n" for i in range(20000)))
    cmd = [sys.executable, "-m", "deepfm", "train", "--format", "csv", "--schema", str(schema), "--train",
           str(data), "--out", str(tmp_path / "o"), "--quiet", "--no-cache"]
    load = _busy(os.cpu_count() or 1)
    try:
        for _ in range(6):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
            assert "terminate called" not in r.stderr
            assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "'zz'" in r.stderr
    finally:
        for p in load:
            p.kill()
            p.wait()


NATIVE_POOL = r"""
#include <chrono>
#include <thread>
// a native worker still running at exit, as a thread pool's may be on a busy machine: destroying a joinable
// std::thread in the static destructors calls std::terminate ("terminate called without an active exception")
static std::thread worker([] { for (;;) std::this_thread::sleep_for(std::chrono::seconds(1)); });
"""


def test_error_exit_is_2_even_with_a_native_thread_alive_at_exit(tmp_path):
    """The deterministic form of the abort under load: a native library whose worker thread is alive when
    the process exits. The CLI's error exit must still be the clean line and status 2, not 134."""
    cxx = next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    if cxx is None:
        pytest.skip("no C++ compiler")
    lib = tmp_path / "libpool.so"
    src = write(tmp_path / "pool.cc", NATIVE_POOL)
    subprocess.run([cxx, "-shared", "-fPIC", "-O1", str(src), "-o", str(lib), "-pthread"], check=True, timeout=120)
    schema = write(tmp_path / "s.yaml", b"label: y\nfields: [a, zz]\n")
    data = write(tmp_path / "f.csv", b"y,a\n1,p\n0,q\n")
    argv = ["deepfm", "train", "--format", "csv", "--schema", str(schema), "--train", str(data), "--out",
            str(tmp_path / "o"), "--quiet", "--no-cache"]
    code = f"import ctypes, sys; ctypes.CDLL({str(lib)!r}); sys.argv = {argv!r}; from deepfm.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "terminate called" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "'zz'" in r.stderr


def test_an_abandoned_prefetch_thread_is_joined_before_interpreter_teardown(tmp_path):
    """The consumer raised with the loader mid-way (the generator is kept alive by the traceback): the
    prefetch thread must stop and be joined when the interpreter exits, not be left running (a daemon thread)
    inside numpy/torch through the teardown, where it can abort the process."""
    code = """
import atexit, threading, time
from deepfm.train.trainer import Prefetcher
atexit.register(lambda: print("alive at exit:", [t.name for t in threading.enumerate()], flush=True))
def make(step):
    time.sleep(0.01)
    return step
it = iter(Prefetcher(make, 10**6, depth=2))
next(it)
raise SystemExit(3)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "alive at exit:" in r.stdout and "deepfm-prefetch" not in r.stdout, r.stdout


# --------------------------------------------------------------------------- 19: predict scores every row
ML_HEAD = "user_id:token\titem_id:token\trating:float"


def test_predict_scores_every_movielens_row(tmp_path):
    """Training drops the rows rated 3 (neither a click nor not); prediction must score them too."""
    rng = np.random.default_rng(0)
    ratings = np.tile([1, 2, 3, 4, 5], 40)
    rows = [f"u{rng.integers(20)}\ti{rng.integers(30)}\t{r}" for r in ratings]
    data = write(tmp_path / "ml.inter", "\n".join([ML_HEAD, *rows]) + "\n")
    schema = write(tmp_path / "s.yaml", "label: label\nfields: [user_id, item_id]\n")
    cli = CliRunner()
    r = cli.invoke(main, ["train", "--format", "movielens", "--schema", str(schema), "--train", str(data),
                          "--out", str(tmp_path / "m"),
                          "--epochs", "1", "--quiet", "--no-cache", "--set", "model.hidden=[8]"],
                   catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = tmp_path / "p.parquet"
    r = cli.invoke(main, ["predict", str(tmp_path / "m"), str(data), "--out", str(out), "--quiet"],
                   catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).num_rows == len(rows) == 200
    assert f"wrote {len(rows)} predictions" in r.output
    # evaluation uses labels, so the label rule still applies there
    r = cli.invoke(main, ["evaluate", str(tmp_path / "m"), str(data), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["rows"] == int((ratings != 3).sum())


def test_readers_label_rules_flag():
    """``label_rules=False``: the movielens rating is not a label, so no row is dropped and no label read."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d) / "x.inter", f"{ML_HEAD}\n1\t2\t3\n1\t3\t5\n2\t2\t1\n")
        ml = Schema(fields=(Field("user_id"), Field("item_id")), label="label")
        assert readers.read(path, "movielens", ml).rows == 2
        whole = readers.read(path, "movielens", ml, label_rules=False)
        assert whole.rows == 3 and whole.label is None
        blocks = list(readers.iter_read(path, "movielens", ml, label_rules=False))
        assert sum(b.rows for b in blocks) == 3
