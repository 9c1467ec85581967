"""Serving: the online record encoder equals the batch path, the predictor equals `deepfm evaluate`'s path,
unseen/missing values, streaming block reads and scoring, and the HTTP server over real HTTP."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.csv as pv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from deepfm.cli import main
from deepfm.data import readers
from deepfm.data.preprocess import Preprocessor
from deepfm.data.store import Batcher, layout
from deepfm.errors import DataError
from deepfm.schema import MISSING, OOV, Field, Schema
from deepfm.serve.predictor import Predictor
from deepfm.serve.records import RecordEncoder, RecordError, fnv1a64_str
from deepfm.train.metrics import evaluate as metrics
from tests.conftest import stop_server, wait_healthy, write

FAST = ["--epochs", "1", "--batch-size", "256", "--quiet", "--set", "model.hidden=[32,32]"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(synth_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "bundle"
    r = run("train", "--format", "criteo", "--train", synth_small / "train.tsv", "--valid", synth_small / "valid.tsv",
            "--out", out, "--seed", 5, *FAST)
    assert r.exit_code == 0, r.output
    return out


# ------------------------------------------------------------------ the record encoder == the batch path
MIXED = Schema(fields=(
    Field("c", "categorical", min_count=2), Field("h", "categorical", hash_buckets=97),
    Field("n", "numeric", transform="log"), Field("s", "numeric", transform="standardize"),
    Field("z", "numeric"), Field("b", "numeric", transform="bucketize", min_count=1),
    Field("tags", "multi", sep="|", max_len=3, pooling="mean", min_count=1),
    Field("kw", "multi", sep=" ", max_len=2, pooling="sum"),
), label="y")


def _mixed_table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)

    def maybe(vals, p=0.15):
        return [None if rng.random() < p else v for v in vals]

    words = ["a", "b", "c", "dd", "e", "ünï"]
    tags = ["|".join(rng.choice(words, rng.integers(0, 5))) for _ in range(n)]
    kws = [" ".join(rng.choice(words, rng.integers(1, 4))) for _ in range(n)]
    return pa.table({
        "c": maybe([f"v{int(k)}" for k in rng.zipf(1.5, n) % 50]),
        "h": maybe([f"h{int(k)}" for k in rng.integers(0, 1000, n)]),
        "n": maybe([float(x) for x in rng.normal(0, 50, n).round(2)]),
        "s": maybe([float(x) for x in rng.normal(3, 2, n)]),
        "z": maybe([float(x) for x in rng.integers(-3, 3, n)]),
        "b": maybe([float(x) for x in rng.exponential(30, n).round(1)]),
        "tags": maybe(tags), "kw": maybe(kws),
    })


def test_record_encoder_equals_batch_path_on_every_field_kind():
    pre = Preprocessor(MIXED).fit(readers.from_arrow(_mixed_table(3000, 0), MIXED))
    table = _mixed_table(1000, 1)  # other values: unseen categories, tags, buckets
    batch_idx, batch_val, _ = Batcher(pre.transform(readers.from_arrow(table, MIXED)), layout(pre))(slice(0, 1000))
    idx, val = RecordEncoder(pre).encode(table.to_pylist())
    np.testing.assert_array_equal(idx, batch_idx.numpy())
    np.testing.assert_array_equal(val, batch_val.numpy())
    assert (idx == OOV).any() and (idx == MISSING).any()


def test_record_encoder_accepts_json_spellings_and_rejects_bad_values():
    pre = Preprocessor(MIXED).fit(readers.from_arrow(_mixed_table(500, 0), MIXED))
    enc = RecordEncoder(pre)
    base = {"c": "v1", "h": "h3", "n": 2.5, "s": 1, "z": "3", "b": 7, "tags": "a|b", "kw": "a b"}
    a, _ = enc.encode([base])
    b, _ = enc.encode([{**base, "tags": ["a", "b"], "kw": ["a", "b"], "n": "2.5", "s": 1.0}])
    np.testing.assert_array_equal(a, b)
    # an omitted key, null and "" are all missing
    m1, v1 = enc.encode([{**base, "c": None, "n": None}])
    m2, v2 = enc.encode([{**base, "c": ""}, {k: v for k, v in base.items() if k not in ("c", "n")}])
    assert m1[0, 0] == m2[0, 0] == m2[1, 0] == MISSING
    np.testing.assert_array_equal(m1[0], m2[1])
    np.testing.assert_array_equal(v1[0], v2[1])
    assert enc.encode([{**base, "c": "never-seen"}])[0][0, 0] == OOV
    assert enc.encode([{**base, "h": "h3"}])[0][0, 1] == 2 + fnv1a64_str("h3") % 97
    for field, bad in [("n", "abc"), ("n", True), ("n", math.nan), ("n", math.inf), ("n", [1]), ("c", 1.5),
                       ("c", True), ("c", {"x": 1}), ("c", "a\x00b"), ("tags", [1.5]), ("s", {})]:
        with pytest.raises(RecordError) as e:
            enc.encode([base, {**base, field: bad}])
        assert e.value.row == 1 and e.value.field == field, (field, bad)
    # a key absent from every row is missing too (issue 14, item 18: it was a RecordError)
    absent = enc.encode([{k: v for k, v in base.items() if k != "z"}])
    np.testing.assert_array_equal(absent[0], enc.encode([{**base, "z": None}])[0])
    with pytest.raises(RecordError, match="must be an object"):
        enc.encode([base, ["not", "a", "dict"]])


# ------------------------------------------------------------------ predictor
def test_predictor_matches_evaluate_and_records_match_files(trained, synth_small):
    test = synth_small / "test.tsv"
    pred = Predictor(trained)
    scored = pred.predict_file(test)
    r = run("evaluate", trained, test, "--json")
    m = json.loads(r.output)
    assert m["auc"] == pytest.approx(metrics(scored.label, scored.probabilities)["auc"], abs=1e-12)
    rows = readers.read(test, "criteo").table.to_pylist()
    online = np.concatenate([pred.predict_records(rows[i: i + 100]) for i in range(0, len(rows), 100)])
    np.testing.assert_allclose(online, scored.probabilities, atol=1e-6)  # numpy vs torch forward: float32 rounding
    # unseen and missing values: an unseen token scores like the OOV token; an omitted key like null
    row = dict(rows[0])
    first_cat = next(k for k in row if k.startswith("C"))
    p_unseen = pred.predict_records([{**row, first_cat: "never-seen-value"}, {**row, first_cat: "another-unseen"}])
    assert p_unseen[0] == p_unseen[1]
    p_missing = pred.predict_records([{**row, first_cat: None}, {**row, "I1": None}])
    omitted = pred.predict_records([{k: v for k, v in row.items() if k != "I1"}, dict(row)])
    assert omitted[0] == p_missing[1]
    assert p_missing[0] != p_unseen[0]  # MISSING and OOV are different rows of the table
    # extra columns are ignored
    np.testing.assert_array_equal(pred.predict_records([{**row, "extra": "x"}]), pred.predict_records([row]))


def test_onnxruntime_engine_matches_torch(trained, synth_small):
    pytest.importorskip("onnxruntime")
    test = synth_small / "test.tsv"
    p_torch = Predictor(trained).predict_file(test).probabilities
    p_onnx = Predictor(trained, engine="onnxruntime").predict_file(test).probabilities
    assert np.abs(p_onnx - p_torch).max() <= 1e-5


def test_export_cli_checks_parity_and_predict_engine(trained, synth_small, tmp_path):
    pytest.importorskip("onnxruntime")
    r = run("export", trained, "--out", tmp_path / "m.onnx")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m.onnx").stat().st_size > 0 and "over 10,000 random rows" in r.output
    diff = float(r.output.split(":")[-1])
    assert diff <= 1e-5
    for engine in ("torch", "onnxruntime"):
        r = run("predict", trained, synth_small / "test.tsv", "--out", tmp_path / f"{engine}.parquet",
                "--engine", engine, "--quiet")
        assert r.exit_code == 0, r.output
    a = pq.read_table(tmp_path / "torch.parquet").column("probability").to_numpy()
    b = pq.read_table(tmp_path / "onnxruntime.parquet").column("probability").to_numpy()
    assert len(a) == 600 and np.abs(a - b).max() <= 1e-5


# ------------------------------------------------------------------ streaming reads and scoring
def _crow(label="1", cat="a"):
    return "\t".join([label] + ["1"] * 13 + [cat] * 26)


def test_iter_read_blocks_equal_whole_read_with_file_line_numbers(tmp_path):
    rows = [_crow(str(i % 2), f"v{i % 7}") for i in range(3000)]
    p = write(tmp_path / "d.tsv", "\n".join(rows) + "\n")
    whole = readers.read(p, "criteo")
    blocks = list(readers.iter_read(p, "criteo", block_bytes=8192))
    assert len(blocks) > 10
    assert pa.concat_tables([b.table for b in blocks]).equals(whole.table)
    np.testing.assert_array_equal(np.concatenate([b.label for b in blocks]), whole.label)
    # a bad row far into the file is reported with its line, in error and skip mode
    rows[2500] = rows[2500].replace("\t1\t", "\tx1\t", 1)
    rows[2700] = "1\t2"
    p = write(tmp_path / "bad.tsv", "\n".join(rows) + "\n")
    with pytest.raises(DataError) as e:
        list(readers.iter_read(p, "criteo", block_bytes=8192))
    assert e.value.line == 2501 and e.value.field == "I1"
    blocks = list(readers.iter_read(p, "criteo", on_bad_rows="skip", block_bytes=8192))
    assert sum(b.rows for b in blocks) == 2998 and blocks[-1].skipped.count == 2
    assert any("line 2701" in x for x in blocks[-1].skipped.examples)


def test_predict_streams_blocks_passes_ids_and_writes_nothing_on_error(trained, synth_small, tmp_path):
    test = synth_small / "test.tsv"
    r = run("predict", trained, test, "--out", tmp_path / "whole.csv", "--quiet", "--id-column", "C3")
    assert r.exit_code == 0, r.output
    whole = pv.read_csv(tmp_path / "whole.csv")
    pred = Predictor(trained)
    blocks = list(pred.iter_file(test, columns=["C3"], block_bytes=4096))
    assert len(blocks) > 5
    np.testing.assert_allclose(np.concatenate([p for p, _ in blocks]), whole.column("probability").to_numpy(),
                               atol=1e-6)
    ids = pa.concat_arrays([b.extra["C3"] for _, b in blocks]).to_pylist()
    assert ids == [v or None for v in whole.column("C3").to_pylist()]  # CSV writes null as ""
    # a bad row after the first blocks: exit 2, a clear message, and no output file (not even a partial one)
    lines = test.read_text().splitlines()
    lines[500] = "1\t2\t3"
    bad = write(tmp_path / "bad.tsv", "\n".join(lines) + "\n")
    r = run("predict", trained, bad, "--out", tmp_path / "out.parquet", "--quiet", "--block-mb", "0.01")
    assert r.exit_code == 2 and "line 501" in r.output
    assert not list(tmp_path.glob("*out.parquet*"))


# ------------------------------------------------------------------ HTTP server over real HTTP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: object = None, raw: bytes | None = None, headers: dict | None = None,
          method: str | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})},
                                 method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    port = _free_port()
    env = {**os.environ, "DEEPFM_ADMIN_TOKEN": "s3cret"}
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with open(log, "wb") as fh:  # a file, not a pipe: worker processes must never block on (or hold) our pipe
        proc = subprocess.Popen([sys.executable, "-m", "deepfm.cli", "serve", str(trained), "--port", str(port),
                                 "--workers", "2", "--max-rows", "50", "--max-body-mb", "0.05", "--log-level",
                                 "warning"], env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(lambda: _http(url + "/healthz"), proc, log)
    yield url
    stop_server(proc)


def test_server_predicts_like_the_predictor(server, trained, synth_small):
    rows = readers.read(synth_small / "test.tsv", "criteo").table.slice(0, 40).to_pylist()
    status, body = _http(server + "/v1/predict", {"rows": rows})
    assert status == 200 and len(body["probabilities"]) == 40
    want = Predictor(trained).predict_records(rows)
    np.testing.assert_allclose(body["probabilities"], want, atol=1e-12)
    assert body["model"]["name"] == "bundle" and len(body["model"]["version"]) == 12
    status, health = _http(server + "/healthz")
    assert status == 200 and health["status"] == "ok"
    status, meta = _http(server + "/v1/metadata")
    assert status == 200 and meta["format_version"] == 1 and "C1" in meta["inputs"] and "valid" in meta["metrics"]
    status, spec = _http(server + "/openapi.json")
    assert status == 200 and "/v1/predict" in spec["paths"]


def test_server_micro_batches_concurrent_requests(server, trained, synth_small):
    rows = readers.read(synth_small / "test.tsv", "criteo").table.slice(0, 64).to_pylist()
    want = Predictor(trained).predict_records(rows)
    got: dict[int, float] = {}
    errors: list[object] = []

    def one(i: int) -> None:
        status, body = _http(server + "/v1/predict", {"rows": [rows[i]]})
        if status != 200:
            errors.append(body)
        else:
            got[i] = body["probabilities"][0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    np.testing.assert_allclose([got[i] for i in range(64)], want, atol=1e-6)


@pytest.mark.parametrize("raw, loc", [
    (b"not json", ["body"]),
    (b"[1, 2]", ["body"]),
    (b"{}", ["body", "rows"]),
    (b'{"rows": {}}', ["body", "rows"]),
    (b'{"rows": []}', ["body", "rows"]),
    (b'{"rows": [{}], "extra": 1}', ["body", "extra"]),
    (json.dumps({"rows": [{"I1": 1}] * 51}).encode(), ["body", "rows"]),
    (b'{"rows": [7]}', ["body", "rows", 0]),
])
def test_server_422_for_each_bad_request_shape(server, raw, loc):
    status, body = _http(server + "/v1/predict", raw=raw)
    assert status == 422 and body["detail"][0]["loc"] == loc, body


def test_server_422_names_row_and_field(server, synth_small):
    rows = readers.read(synth_small / "test.tsv", "criteo").table.slice(0, 3).to_pylist()
    for field, bad in [("I5", "twelve"), ("I5", True), ("C7", 1.5), ("C7", {"a": 1}), ("C7", ["x"])]:
        sent = [dict(r) for r in rows]
        sent[2][field] = bad
        status, body = _http(server + "/v1/predict", {"rows": sent})
        assert status == 422 and body["detail"][0]["loc"] == ["body", "rows", 2, field], (field, body)
    status, body = _http(server + "/v1/predict", raw=b'{"rows": [{"I1": NaN}]}')
    assert status == 422
    status, body = _http(server + "/v1/predict", {"rows": [{k: v for k, v in rows[0].items() if k != "C9"}]})
    assert status == 200  # a key left out of every row is missing, not an error (issue 14, item 18)


def test_server_limits_and_admin_reload(server, trained, synth_small, tmp_path):
    status, body = _http(server + "/v1/predict", raw=b'{"rows": [' + b'{"C1": "x"},' * 5000 + b'{}]}')
    assert status == 413
    assert _http(server + "/admin/reload", {})[0] == 401
    assert _http(server + "/admin/reload", {}, headers={"Authorization": "Bearer wrong"})[0] == 401
    rows = readers.read(synth_small / "test.tsv", "criteo").table.slice(0, 1).to_pylist()
    results: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            results.append(_http(server + "/v1/predict", {"rows": rows})[0])

    t = threading.Thread(target=traffic)
    t.start()
    status, body = _http(server + "/admin/reload", {}, headers={"Authorization": "Bearer s3cret"})
    time.sleep(0.2)
    stop.set()
    t.join()
    assert status == 200 and body["status"] == "reloaded"
    assert results and set(results) == {200}  # no request dropped during the reload
    # a new bundle folder, published to every worker (the server runs one per core)
    import shutil

    shutil.copytree(trained, tmp_path / "day2")
    status, body = _http(server + "/admin/reload", {"bundle": str(tmp_path / "day2")},
                         headers={"Authorization": "Bearer s3cret"})
    assert status == 200
    deadline, pids = time.time() + 10, {}
    while time.time() < deadline:
        h = _http(server + "/healthz")[1]
        pids[h["worker"]] = h["model"]["name"]  # no pid, no path in /healthz (issue 14, item 15)
        if len(pids) >= 2 and all(b == "day2" for b in pids.values()):
            break
        time.sleep(0.05)
    assert set(pids.values()) == {"day2"}, pids
    status, body = _http(server + "/admin/reload", {"bundle": "/no/such/bundle"},
                         headers={"Authorization": "Bearer s3cret"})
    assert status == 422
    assert _http(server + "/healthz")[0] == 200  # still serving the previous bundle


def test_server_binds_localhost_and_admin_is_off_without_token(trained):
    from deepfm.serve.server import ServeConfig, create_app

    host = next(p for p in main.commands["serve"].params if p.name == "host")
    assert host.default == "127.0.0.1"
    app = create_app(ServeConfig(bundle=str(trained)))  # no admin token
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(msg: dict) -> None:
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/admin/reload", "raw_path": b"/admin/reload",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")], "query_string": b"",
             "http_version": "1.1", "scheme": "http", "root_path": "", "server": ("127.0.0.1", 80),
             "client": ("127.0.0.1", 1)}
    import asyncio

    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 404


def test_serve_cli_rejects_a_bad_bundle(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run("serve", tmp_path / "empty")
    assert r.exit_code == 2 and "not a deepfm bundle" in r.output
