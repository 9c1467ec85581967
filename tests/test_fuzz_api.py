"""Fuzzing the HTTP API against a real `deepfm serve` (two workers, admin token set).

schemathesis generates requests from the server's own OpenAPI spec (/openapi.json): the spec as served, the
predict route with the model's fields as each row's properties (so values reach the record encoder), and
/admin/reload with the right token (so reloads really run). No response may be a 5xx, and responses must
match the documented status codes, content types and schemas. Hand-written adversarial requests cover what
schemathesis does not produce (deep nesting, huge numbers, NUL and lone surrogates, chunked bodies over the
limit, connections dropped mid-body, malformed bundle folders). The server must stay healthy throughout.

CI budget: ~50 examples per operation; scripts/fuzz_api.sh runs the full budget with the schemathesis CLI.
"""

from __future__ import annotations

import copy
import http.client
import json
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from deepfm.cli import main
from deepfm.data import readers
from deepfm.data.preprocess import Preprocessor
from deepfm.schema import Field, Schema
from deepfm.serve.predictor import Predictor
from deepfm.serve.records import RecordEncoder, RecordError
from deepfm.serve.server import ServeConfig, create_app
from tests.conftest import stop_server, wait_healthy

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error, positive_data_acceptance  # noqa: E402

TOKEN = "fuzz-s3cret"
MAX_ROWS, MAX_BODY = 50, 52428  # --max-rows 50 --max-body-mb 0.05
# A row's required fields come from the bundle loaded at run time, which the static spec cannot state: schema-valid
# rows without them are rightly a 422, so "positive data acceptance" does not apply. Every other check runs.
EXCLUDED = [positive_data_acceptance]
FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
CASES: Counter[str] = Counter()


# ------------------------------------------------------------------ a real server
@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(server: Server, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) over http.client: raw bytes in, nothing re-encoded."""
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        c.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def raw_exchange(server: Server, data: bytes) -> bytes:
    """Send raw bytes on a fresh connection and read the answer until the server closes or sends it all."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(data)
        out = b""
        while True:
            head, sep, rest = out.partition(b"\r\n\r\n")
            if sep:
                length = next((int(v) for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n"))
                               if k.strip().lower() == b"content-length"), None)
                if length is not None and len(rest) >= length:
                    return out
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.fixture(scope="module")
def bundle(synth_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "bundle"
    r = CliRunner().invoke(main, ["train", "--format", "criteo", "--train", str(synth_small / "train.tsv"),
                                  "--valid", str(synth_small / "valid.tsv"), "--out", str(out), "--seed", "5",
                                  "--epochs", "1", "--batch-size", "256", "--quiet",
                                  "--set", "model.hidden=[32,32]"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("fuzz-log") / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "deepfm.cli", "serve", str(bundle), "--port", str(port),
                                 "--workers", "2", "--max-rows", str(MAX_ROWS), "--max-body-mb", "0.05",
                                 "--admin-token", TOKEN, "--log-level", "warning"], stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", port, proc, log)
    wait_healthy(lambda: request(srv, "GET", "/healthz"), proc, log)
    time.sleep(1.0)  # both workers up
    yield srv
    stop_server(proc)


@pytest.fixture(scope="module")
def rows(synth_small) -> list[dict]:
    return readers.read(synth_small / "test.tsv", "criteo").table.slice(0, 5).to_pylist()


def predict(server: Server, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    status, _, data = request(server, "POST", "/v1/predict", body, headers)
    return status, json.loads(data)


# ------------------------------------------------------------------ schemathesis, from the served spec
# The spec is built at import time by the same create_app the server runs (it depends on --max-rows only, not on
# the bundle): schemathesis' pytest parametrization needs it at collection, and its fixture-based loader does not
# work with pytest >= 9.2. test_the_spec_is_the_served_one checks it equals the server's /openapi.json.
SPEC = create_app(ServeConfig(bundle="-", max_rows=MAX_ROWS)).app.openapi()
INPUTS = sorted({f.source for f in readers.criteo_schema().fields})  # the bundle's inputs (Criteo format)


def _typed_spec(spec: dict, inputs: list[str]) -> dict:
    """The predict route only, each row an object with the model's input fields (any documented value type;
    a key left out is a missing value, so none is required) and other fields (ignored, but of a documented
    value type too)."""
    spec = copy.deepcopy(spec)
    op = spec["paths"]["/v1/predict"]
    item = op["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]["rows"]["items"]
    item["properties"] = {name: item["additionalProperties"] for name in inputs}
    spec["paths"] = {"/v1/predict": op}
    return spec


# Invalid data may also be rejected as too large: 413 (documented) counts as a rejection
CONFIG = schemathesis.Config.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": [
    400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]}}})
served = schemathesis.openapi.from_dict(SPEC, config=CONFIG)
typed = schemathesis.openapi.from_dict(_typed_spec(SPEC, INPUTS), config=CONFIG)


def test_the_spec_is_the_served_one(server):
    assert json.loads(request(server, "GET", "/openapi.json")[2]) == json.loads(json.dumps(SPEC))
    assert json.loads(request(server, "GET", "/v1/metadata")[2])["inputs"] == INPUTS


def _validate(case: schemathesis.Case, server: Server) -> schemathesis.Response:
    CASES[f"{case.method} {case.path}"] += 1
    response = case.call_and_validate(base_url=server.url, excluded_checks=EXCLUDED,
                                      additional_checks=[not_a_server_error], timeout=60)
    assert response.status_code < 500, response.text
    return response


@served.parametrize()
@FUZZ
def test_fuzz_the_served_spec(case, server):
    _validate(case, server)


@typed.parametrize()
@FUZZ
def test_fuzz_predict_with_the_model_fields(case, server):
    response = _validate(case, server)
    assert response.status_code in (200, 405, 413, 422), response.text  # 405: the coverage phase tries methods


@served.include(path="/admin/reload").parametrize()
@settings(FUZZ, max_examples=25)
def test_fuzz_admin_reload_with_the_token(case, server):
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKEN}"}
    response = _validate(case, server)
    assert response.status_code in (200, 400, 405, 413, 422), response.text


# ------------------------------------------------------------------ hand-written adversarial requests
def _row_json(rows: list[dict], **replace: str) -> bytes:
    """{"rows": [rows[0]]} with some values replaced by raw JSON text (what json.dumps cannot write)."""
    marks = {k: f"@@{k}@@" for k in replace}
    text = json.dumps({"rows": [{**rows[0], **marks}]})
    for k, raw in replace.items():
        text = text.replace(json.dumps(marks[k]), raw)
    return text.encode()


def _loc(row: int | None, field: str) -> list:
    return ["body", "rows"] + ([row] if row is not None else []) + [field]


ADVERSARIAL = [  # (name, body builder, expected status, expected loc of the first error or None)
    ("10,000 nested lists", lambda r: b"[" * 10_000 + b"]" * 10_000, 422, ["body"]),
    ("5,000 nested objects", lambda r: b'{"a":' * 5000 + b"1" + b"}" * 5000, 422, ["body"]),
    ("rows nested 10,000 deep", lambda r: b'{"rows":' + b"[" * 10_000 + b"]" * 10_000 + b"}", 422, ["body"]),
    ("a value nested 500 deep", lambda r: _row_json(r, C1="[" * 500 + "]" * 500), 422, _loc(0, "C1")),
    ("1e400 (a float literal)", lambda r: _row_json(r, I1="1e400"), 422, _loc(0, "I1")),
    ("-1e400", lambda r: _row_json(r, I1="-1e400"), 422, _loc(0, "I1")),
    ("10**400 (an integer literal)", lambda r: _row_json(r, I1=str(10**400)), 422, _loc(0, "I1")),
    ("-10**400", lambda r: _row_json(r, I1=str(-(10**400))), 422, _loc(0, "I1")),
    ("10**400 as a numeric string", lambda r: _row_json(r, I1=json.dumps(str(10**400))), 422, _loc(0, "I1")),
    ("1e300 (beyond float32 once transformed)", lambda r: _row_json(r, I4="1e300"), 422, _loc(0, "I4")),
    ("-3.5e38", lambda r: _row_json(r, I4="-3.5e38"), 422, _loc(0, "I4")),
    ("10**300 as a numeric string", lambda r: _row_json(r, I4=json.dumps(str(10**300))), 422, _loc(0, "I4")),
    ("1e38 (within float32)", lambda r: _row_json(r, I4="1e38"), 200, None),
    ("an integer of 5,000 digits", lambda r: _row_json(r, I1="9" * 5000), 422, ["body"]),
    ("10**400 as a categorical token", lambda r: _row_json(r, C1=str(10**400)), 200, None),
    ("NaN", lambda r: _row_json(r, I1="NaN"), 422, _loc(0, "I1")),
    ("Infinity", lambda r: _row_json(r, I1="-Infinity"), 422, _loc(0, "I1")),
    ("NUL in a categorical value", lambda r: _row_json(r, C1=json.dumps("a\x00b")), 422, _loc(0, "C1")),
    ("NUL in a numeric string", lambda r: _row_json(r, I1=json.dumps("1\x00")), 422, _loc(0, "I1")),
    ("unicode values", lambda r: _row_json(r, C1=json.dumps("ключ 🙂 ü"), C2=json.dumps("\u202e\ufeff")), 200, None),
    ("lone surrogate values", lambda r: _row_json(r, C1='"\\ud800"', C2='"x\\udfff"'), 200, None),
    ("unicode and NUL field names", lambda r: json.dumps(
        {"rows": [{**r[0], "ключ\x00": "v", "🙂": 1, "\ud800": None, "": "x"}]}).encode(), 200, None),
    ("NUL and surrogate top-level key", lambda r: json.dumps({"rows": r[:1], "\x00\ud800": 1}).encode(), 422,
     ["body", "\x00\ud800"]),
    ("rows as a string", lambda r: b'{"rows": "' + b"x" * 1000 + b'"}', 422, ["body", "rows"]),
    ("rows as null", lambda r: b'{"rows": null}', 422, ["body", "rows"]),
    ("a row as a list", lambda r: json.dumps({"rows": [list(r[0].items())]}).encode(), 422, ["body", "rows", 0]),
    ("a value as an object", lambda r: _row_json(r, I2='{"a": 1}'), 422, _loc(0, "I2")),
    ("a boolean number", lambda r: _row_json(r, I3="true"), 422, _loc(0, "I3")),
    ("1,000 extra fields", lambda r: json.dumps({"rows": [{**r[0], **{f"x{i}": i for i in range(1000)}}]}).encode(),
     200, None),
    ("one field absent everywhere (= missing)", lambda r: json.dumps(
        {"rows": [{k: v for k, v in r[0].items() if k != "C9"}]}).encode(), 200, None),
    (f"{MAX_ROWS + 1} rows", lambda r: json.dumps({"rows": [r[0]] * (MAX_ROWS + 1)}).encode(), 422, ["body", "rows"]),
    ("an empty body", lambda r: b"", 422, ["body"]),
    ("whitespace only", lambda r: b" \r\n\t", 422, ["body"]),
    ("invalid UTF-8", lambda r: b'{"rows": [{"C1": "\xff\xfe"}]}', 422, ["body"]),
    ("UTF-16 with a BOM", lambda r: json.dumps({"rows": r[:1]}).encode("utf-16"), 200, None),
    ("truncated JSON", lambda r: json.dumps({"rows": r[:1]}).encode()[:-7], 422, ["body"]),
    ("a JSON string", lambda r: b'"rows"', 422, ["body"]),
]


@pytest.mark.parametrize("name, build, status, loc", ADVERSARIAL, ids=[a[0] for a in ADVERSARIAL])
def test_adversarial_predict_bodies(server, rows, name, build, status, loc):
    got, body = predict(server, build(rows))
    assert got == status, (name, body)
    if loc is not None:
        assert body["detail"][0]["loc"] == loc, (name, body)
    else:
        assert len(body["probabilities"]) == 1 and 0 < body["probabilities"][0] < 1


def test_duplicate_keys_take_the_last_value(server, rows):
    want = predict(server, json.dumps({"rows": rows[:1]}).encode())[1]["probabilities"]
    text = json.dumps({"rows": rows[:1]})
    row = json.dumps(rows[0])
    dup_rows = text.replace('{"rows": ', '{"rows": [7], "rows": ', 1).encode()
    dup_field = text.replace(row, row[:-1] + f', "C1": 12, "C1": {json.dumps(rows[0]["C1"])}' + "}").encode()
    for body in (dup_rows, dup_field):
        status, got = predict(server, body)
        assert status == 200 and got["probabilities"] == want, got


def test_content_types_and_methods(server, rows):
    body = json.dumps({"rows": rows[:1]}).encode()
    # the fast path reads any body as JSON, whatever the declared type (curl -d sends form-urlencoded)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/xml; charset=latin-1"):
        assert predict(server, body, {"content-type": ctype})[0] == 200
    assert predict(server, b"--x\r\nContent-Disposition: form-data\r\n\r\n1\r\n--x--",
                   {"content-type": "multipart/form-data; boundary=x"})[0] == 422
    status, headers, _ = request(server, "GET", "/v1/predict")
    assert status == 405 and headers["allow"] == "POST"
    for method, path in [("HEAD", "/v1/predict"), ("PUT", "/v1/predict"), ("DELETE", "/healthz"),
                         ("POST", "/healthz"), ("PATCH", "/admin/reload"), ("OPTIONS", "/v1/metadata")]:
        status, headers, data = request(server, method, path, b"{}")
        assert status == 405 and "allow" in headers, (method, path, status)
        if method == "HEAD":
            assert data == b""
    assert request(server, "GET", "/no/such/route")[0] == 404
    assert request(server, "GET", "/v1/predict/../../healthz")[0] in (200, 404)
    # reload with a body of another type: FastAPI's 422
    status, _, _ = request(server, "POST", "/admin/reload", b"{}",
                           {"content-type": "text/plain", "authorization": f"Bearer {TOKEN}"})
    assert status == 422


def _chunked(path: str, chunks: list[bytes], headers: str = "") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            f"{headers}Connection: close\r\n\r\n").encode() + body


def test_body_limits_declared_and_streamed(server, rows):
    ok = json.dumps({"rows": rows[:2]}).encode()
    answer = raw_exchange(server, _chunked("/v1/predict", [ok[:10], ok[10:20], ok[20:]]))
    assert status_of(answer) == 200 and b"probabilities" in answer
    over = [b'{"rows": [' + b'{"C1": "x"},' * 1000] * 5  # 5 chunks of ~12 KB, no content-length
    assert sum(map(len, over)) > MAX_BODY
    for path, headers in [("/v1/predict", ""), ("/admin/reload", f"Authorization: Bearer {TOKEN}\r\n"),
                          ("/admin/reload", ""), ("/healthz", "")]:
        answer = raw_exchange(server, _chunked(path, over, headers))
        want = 405 if path == "/healthz" else 413  # /healthz never reads the body
        assert status_of(answer) == want, (path, answer[:300])
    big = b'{"rows": [' + b"0" * MAX_BODY + b"]}"
    assert predict(server, big)[0] == 413  # declared content-length over the limit
    answer = raw_exchange(server, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}")
    assert status_of(answer) == 400  # refused by uvicorn itself


def test_connections_dropped_mid_request(server, rows):
    """Slowloris-ish: many connections hang mid-body (the server keeps answering others), then drop."""
    body = json.dumps({"rows": rows[:1]}).encode()
    socks = []
    for i in range(40):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        if i % 4 == 0:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Le")  # mid-headers
        elif i % 4 == 1:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:20])
        elif i % 4 == 2:
            s.sendall(_chunked("/v1/predict", [body])[:-30])  # chunked, no final chunk
        else:
            s.sendall(b"POST /admin/reload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
                      b"\r\nContent-Length: 100\r\n\r\n{")
        socks.append(s)
    assert predict(server, body)[0] == 200  # others are served meanwhile
    assert request(server, "GET", "/healthz")[0] == 200
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST, not FIN
        s.close()
    # a full request whose client goes away before reading the answer
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    time.sleep(0.5)
    assert predict(server, body)[0] == 200


def _reload(server: Server, body: bytes, token: str | bytes = TOKEN) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        c.putrequest("POST", "/admin/reload")
        c.putheader("Content-Type", "application/json")
        c.putheader("Authorization", b"Bearer " + (token.encode() if isinstance(token, str) else token))
        c.putheader("Content-Length", str(len(body)))
        c.endheaders(body)
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        c.close()


def test_admin_reload_cannot_break_the_server(server, bundle, rows, tmp_path):
    def bad_bundle(name: str, files: dict[str, str]) -> str:
        d = tmp_path / name
        d.mkdir()
        for n, text in files.items():
            (d / n).write_text(text)
        return str(d)

    manifest = json.loads((bundle / "manifest.json").read_text())
    (tmp_path / "dir-manifest" / "manifest.json").mkdir(parents=True)
    unreadable = [
        "a\x00b", "a" * 5000, "/" + "x/" * 3000, "\ud800", "\udcff", "bad\nname", str(tmp_path / "dir-manifest"),
        "/", "/proc/self", "/dev/null",
        bad_bundle("list", {"manifest.json": "[1]"}),
        bad_bundle("garbage", {"manifest.json": "\x00\xff not json"}),
        bad_bundle("files-int", {"manifest.json": json.dumps({**manifest, "files": 5})}),
        bad_bundle("no-model", {"manifest.json": json.dumps({**manifest, "files": {}})}),
        bad_bundle("model-list", {"manifest.json": json.dumps({**manifest, "files": {}}), "model.json": "[]",
                                  "preprocessor.json": (bundle / "preprocessor.json").read_text()}),
    ]
    for path in unreadable:
        status, body = _reload(server, json.dumps({"bundle": path}).encode())
        assert status == 422 and body["detail"][0]["loc"] == ["body", "bundle"], (path[:40], body)
    for body, want in [(b'{"bundle": 5}', 422), (b'{"bundle": ["x"]}', 422), (b'{"other": 1}', 422),
                       (b"[" * 10_000 + b"]" * 10_000, 400), (b'{"bundle": "\xff"}', 400), (b"nope", 422)]:
        assert _reload(server, body)[0] == want, body[:30]
    # tokens: wrong, non-ASCII (latin-1 bytes in the header), absent
    # (a trailing space is not part of a header value, RFC 9110: "fuzz-s3cret " is the token itself)
    for token in ("wrong", b"\xe9\xff", " fuzz-s3cret", "fuzz-s3cre", ""):
        assert _reload(server, b"{}", token)[0] == 401, token
    # a real reload to a copy, then back, while predictions keep being answered
    copy_dir = tmp_path / "copy"
    shutil.copytree(bundle, copy_dir)
    for path in (str(copy_dir), str(bundle)):
        status, body = _reload(server, json.dumps({"bundle": path}).encode())
        assert status == 200 and body["bundle"] == path, body
        assert predict(server, json.dumps({"rows": rows[:1]}).encode())[0] == 200


def test_record_encoder_huge_numbers_and_lone_surrogates():
    """Below HTTP: an integer beyond float range is a RecordError (it raised OverflowError: a 500), so is a value
    beyond float32 once transformed (the model scored NaN: a 200 with invalid JSON), and a lone surrogate in a
    hashed field hashes (it raised UnicodeEncodeError: a 500)."""
    schema = Schema(fields=(Field("h", "categorical", hash_buckets=97), Field("n", "numeric"),
                            Field("b", "numeric", transform="bucketize", min_count=1),
                            Field("s", "numeric", transform="standardize")), label="y")
    table = pa.table({"h": ["a", "b"], "n": [1.0, 2.0], "b": [3.0, 40.0], "s": [0.0, 1.0]})
    enc = RecordEncoder(Preprocessor(schema).fit(readers.from_arrow(table, schema)))
    base = {"h": "a", "n": 1, "b": 3, "s": 0}
    idx, val = enc.encode([{**base, "h": "\ud800"}, {**base, "h": "x\udfffy", "n": 10**30, "b": -(10**300)}])
    assert idx.shape == (2, 4) and np.all(idx[:, 0] >= 2) and np.isfinite(val).all()
    for field, value in [("n", 10**400), ("n", -(10**400)), ("b", 10**400), ("s", 10**400), ("n", "1" + "0" * 400),
                         ("n", 10**300), ("n", -3.5e38), ("s", 1e300), ("n", "1e39")]:
        with pytest.raises(RecordError) as e:
            enc.encode([base, {**base, field: value}])
        assert e.value.field == field and e.value.row == 1, (field, value)


def test_non_finite_scores_are_a_422_not_invalid_json(bundle, rows):
    """Values in range that a model still overflows on (e.g. 1e20 in a field without a log transform) score NaN,
    which JSON cannot hold: a 422 naming the row, not a 200 with `NaN` in the body."""
    testclient = pytest.importorskip("fastapi.testclient")
    pred = Predictor(bundle)
    pred.logits = lambda idx, val: np.array([0.5, np.nan, np.inf, -np.inf])[: idx.shape[0]]
    with testclient.TestClient(create_app(ServeConfig(bundle=str(bundle)), predictor=pred)) as client:
        r = client.post("/v1/predict", json={"rows": rows[:1]})
        assert r.status_code == 200 and r.json()["probabilities"] == [pytest.approx(0.6224593)]
        r = client.post("/v1/predict", json={"rows": rows[:4]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "rows", 1], r.text


# ------------------------------------------------------------------ after everything
def test_server_survived_everything(server, rows):
    status, _, data = request(server, "GET", "/healthz")
    assert status == 200 and json.loads(data)["status"] == "ok"
    assert predict(server, json.dumps({"rows": rows}).encode())[0] == 200
    assert server.proc.poll() is None
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]
    if CASES:
        print(f"\nschemathesis cases: {sum(CASES.values())} ({dict(CASES)})")
