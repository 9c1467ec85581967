"""Issue 14, the server in a hostile world: per-connection time and size bounds, quiet client disconnects,
reload timeouts, multi-worker reload consistency, no leaks in public routes, the admin token's handling,
one numeric parser for online and batch, and absent/unknown row keys.

Against real `deepfm serve` processes on 127.0.0.1 (ephemeral ports, short limits so each check is bounded in
time), plus in-process apps where a failure has to be injected (a worker whose load fails).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from deepfm.cli import main
from deepfm.data import readers
from deepfm.errors import DataError
from tests.conftest import stop_server, wait_healthy, write

TOKEN = "safety-s3cret"
HEADER_TIMEOUT, BODY_TIMEOUT, KEEP_ALIVE, MAX_HEADER_KB, MAX_CONN, RELOAD_TIMEOUT = 1.5, 1.5, 1.5, 16, 30, 4
MARGIN = 3.0  # seconds beyond a timeout that a loaded 2-core box may take to act on it


@dataclass
class Server:
    port: int
    proc: subprocess.Popen
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(srv: Server, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 60) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
        r = c.getresponse()
        data = r.read()
        try:
            return r.status, json.loads(data or b"{}")
        except ValueError:
            return r.status, {"raw": data.decode(errors="replace")}
    finally:
        c.close()


def predict(srv: Server, rows: list[dict]) -> tuple[int, dict]:
    return request(srv, "POST", "/v1/predict", json.dumps({"rows": rows}).encode())


def reload(srv: Server, body: bytes = b"{}", auth: str | None = f"Bearer {TOKEN}", timeout: float = 60):
    return request(srv, "POST", "/admin/reload", body, {"authorization": auth} if auth else {}, timeout=timeout)


def _train(data: Path, out: Path, seed: int) -> Path:
    r = CliRunner().invoke(main, ["train", "--format", "criteo", "--train", str(data / "train.tsv"), "--valid",
                                  str(data / "valid.tsv"), "--out", str(out), "--seed", str(seed), "--epochs", "1",
                                  "--batch-size", "256", "--quiet", "--set", "model.hidden=[16]"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def bundles(synth_small, tmp_path_factory) -> tuple[Path, Path]:
    """Two bundles with different weights (so different versions)."""
    root = tmp_path_factory.mktemp("safety")
    return _train(synth_small, root / "a", 5), _train(synth_small, root / "b", 6)


@pytest.fixture(scope="module")
def rows(synth_small) -> list[dict]:
    return readers.read(synth_small / "test.tsv", "criteo").table.slice(0, 4).to_pylist()


def _start(bundle: Path, tmp: Path, *args: str, env: dict | None = None) -> Server:
    port = _free_port()
    log = tmp / f"server-{port}.log"
    with open(log, "wb") as fh:  # a file: worker processes must never block on our pipe
        proc = subprocess.Popen([sys.executable, "-m", "deepfm.cli", "serve", str(bundle), "--port", str(port),
                                 "--log-level", "warning", *args], stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    srv = Server(port, proc, log)
    wait_healthy(lambda: request(srv, "GET", "/healthz", timeout=5), proc, log)
    return srv


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
    """One worker, short limits, the token from a file."""
    tmp = tmp_path_factory.mktemp("safety-srv")
    token_file = write(tmp / "token", TOKEN + "\n")
    token_file.chmod(0o600)
    srv = _start(bundles[0], tmp, "--workers", "1", "--admin-token-file", str(token_file),
                 "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
                 "--keep-alive", str(KEEP_ALIVE), "--max-header-kb", str(MAX_HEADER_KB),
                 "--max-connections", str(MAX_CONN), "--reload-timeout", str(RELOAD_TIMEOUT))
    yield srv
    stop_server(srv.proc)


@pytest.fixture(scope="module")
def workers2(bundles, tmp_path_factory):
    """Two workers, --strict-fields, the token from the environment."""
    tmp = tmp_path_factory.mktemp("safety-srv2")
    srv = _start(bundles[0], tmp, "--workers", "2", "--strict-fields", env={"DEEPFM_ADMIN_TOKEN": TOKEN})
    deadline = time.time() + 120
    while time.time() < deadline and len(request(srv, "GET", "/healthz")[1].get("workers", [])) < 2:
        time.sleep(0.2)  # both workers up
    yield srv
    stop_server(srv.proc)


def _read_until_closed(s: socket.socket, limit: float) -> tuple[bytes, float | None]:
    """Everything the server sends until it closes (the time it closed), or (data, None) after ``limit`` s."""
    t0, data = time.monotonic(), b""
    s.settimeout(0.2)
    while time.monotonic() - t0 < limit:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, time.monotonic() - t0
        if not chunk:
            return data, time.monotonic() - t0
        data += chunk
    return data, None


# ------------------------------------------------------------------ item 4: time bounds per connection
def test_slowloris_headers_trickled_a_byte_at_a_time_are_cut_off(server):
    """A client trickling its headers (a byte every 0.2 s, never ending them) holds the connection no longer
    than the header timeout: a 408, then closed. It stayed open for good before."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    t0 = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            if stop.is_set():
                return
            try:
                s.send(bytes([b]))
            except OSError:
                return
            time.sleep(0.2)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    data, closed = _read_until_closed(s, HEADER_TIMEOUT + MARGIN + 5)
    stop.set()
    s.close()
    assert closed is not None, "connection still open"
    assert time.monotonic() - t0 <= HEADER_TIMEOUT + MARGIN
    assert data.startswith(b"HTTP/1.1 408"), data[:100]


def test_silent_connection_slow_body_and_idle_keepalive_are_closed(server, rows):
    # a connection that never sends a byte
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        data, closed = _read_until_closed(s, HEADER_TIMEOUT + MARGIN)
        assert closed is not None and data.startswith(b"HTTP/1.1 408"), data[:100]
    # a body that never ends (headers complete, 10 of 100 bytes)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b'{"rows": [')
        data, closed = _read_until_closed(s, BODY_TIMEOUT + MARGIN)
        assert closed is not None and data.startswith(b"HTTP/1.1 408"), data[:100]
    # a kept-alive connection left idle after its answer
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data, closed = _read_until_closed(s, KEEP_ALIVE + MARGIN + 1)
        assert closed is not None and data.startswith(b"HTTP/1.1 200"), data[:100]
    counters = request(server, "GET", "/healthz")[1]["counters"]
    assert counters["header_timeouts"] >= 1 and counters["body_timeouts"] >= 1, counters
    assert predict(server, rows[:1])[0] == 200


@pytest.mark.slow
def test_many_slow_connections_are_bounded_and_others_still_served(server, rows):
    """Connections beyond --max-connections get a 503 at once; the rest are cut off by the header timeout;
    the server answers others meanwhile, and afterwards."""
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(MAX_CONN + 10)]
    for s in socks:
        with contextlib.suppress(OSError):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: ")  # never finished
    answers = []
    t0 = time.monotonic()
    for s in socks:
        data, closed = _read_until_closed(s, HEADER_TIMEOUT + MARGIN + 2)
        answers.append(data[:12])
        assert closed is not None
        s.close()
    assert time.monotonic() - t0 <= HEADER_TIMEOUT + MARGIN + 4
    assert sum(a == b"HTTP/1.1 503" for a in answers) >= 5, answers
    assert sum(a == b"HTTP/1.1 408" for a in answers) >= MAX_CONN - 5, answers
    assert predict(server, rows[:1])[0] == 200


# ------------------------------------------------------------------ item 5: header size
def test_headers_over_the_limit_are_a_431(server):
    limit = MAX_HEADER_KB << 10
    assert request(server, "GET", "/healthz", headers={"x-ok": "a" * (limit // 2)})[0] == 200
    assert request(server, "GET", "/healthz", headers={"x-big": "a" * (limit + 100)})[0] == 431
    many = {f"x-h{i}": "b" * 100 for i in range(limit // 100)}
    assert request(server, "GET", "/healthz", headers=many)[0] == 431
    # 8 MB of one header, sent as fast as possible: refused early (memory stays bounded), connection closed
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Huge: ")
        with contextlib.suppress(OSError):
            for _ in range(128):
                s.sendall(b"a" * (64 << 10))
        data, closed = _read_until_closed(s, 10)
        assert data.startswith(b"HTTP/1.1 431"), data[:100]
    assert request(server, "GET", "/healthz")[1]["counters"]["headers_too_large"] >= 3


# ------------------------------------------------------------------ item 6: clients that leave early
def test_pipelined_requests_then_close_log_no_traceback(server, rows):
    """Pipelined requests, then a reset: uvloop raised on the write to the closed transport, which uvicorn
    logged as "Exception in ASGI application" with a traceback, per connection. Now a counted event."""
    body = json.dumps({"rows": rows[:1]}).encode()
    reqs = [b"GET /v1/metadata HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body]
    for i in range(24):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
        s.sendall(reqs[i % 3] * 10)
        if i % 2:
            s.recv(10)
        s.close()
    time.sleep(1.0)
    status, health = request(server, "GET", "/healthz")
    assert status == 200
    log = server.log.read_text(errors="replace")
    assert "Exception in ASGI" not in log and "Traceback" not in log, log[-3000:]
    assert health["counters"].get("client_gone", 0) >= 1, health["counters"]


# ------------------------------------------------------------------ item 8: a reload that hangs
def test_a_hung_reload_times_out_and_frees_the_lock(server, bundles, tmp_path):
    """A bundle file that is a FIFO hung loading forever while holding the reload lock: later reloads of good
    bundles never answered. Now the load fails (the loader refuses special files, or --reload-timeout)."""
    fifo = tmp_path / "fifo-bundle"
    shutil.copytree(bundles[1], fifo)
    for name in ("model.safetensors", "manifest.json"):
        (fifo / name).unlink()
        os.mkfifo(fifo / name)
    t0 = time.monotonic()
    status, body = reload(server, json.dumps({"bundle": str(fifo)}).encode(), timeout=RELOAD_TIMEOUT + 30)
    assert status == 422, body
    assert time.monotonic() - t0 <= RELOAD_TIMEOUT + MARGIN + 5
    status, body = reload(server, json.dumps({"bundle": str(bundles[0])}).encode(), timeout=60)
    assert status == 200, body
    assert request(server, "GET", "/healthz")[0] == 200


def test_reload_timeout_releases_the_lock_in_process(bundles, monkeypatch):
    """The same, deterministic: a load that blocks until released."""
    testclient = pytest.importorskip("fastapi.testclient")
    import deepfm.serve.server as server_mod

    real, gate = server_mod.Predictor, threading.Event()

    def blocking(path, **kw):
        if str(path).endswith("/b"):
            gate.wait(30)
        return real(path, **kw)

    cfg = server_mod.ServeConfig(bundle=str(bundles[0]), admin_token=TOKEN, reload_timeout_s=0.5)
    app = server_mod.create_app(cfg, predictor=real(bundles[0]))
    monkeypatch.setattr(server_mod, "Predictor", blocking)
    auth = {"authorization": f"Bearer {TOKEN}"}
    with testclient.TestClient(app) as c:
        t0 = time.monotonic()
        r = c.post("/admin/reload", json={"bundle": str(bundles[1])}, headers=auth)
        assert r.status_code == 422 and "took over 0.5 s" in r.text, r.text
        assert time.monotonic() - t0 < 10
        r = c.post("/admin/reload", json={"bundle": str(bundles[0])}, headers=auth)
        assert r.status_code == 200, r.text
        assert c.get("/healthz").json()["counters"]["reload_timeouts"] >= 1
    gate.set()


# ------------------------------------------------------------------ item 11: every worker on one version
def _versions(srv: Server) -> dict[str, str]:
    return {w["worker"]: w["version"] for w in request(srv, "GET", "/healthz")[1].get("workers", [])}


def test_multiworker_reload_reaches_every_worker_and_healthz_names_versions(workers2, bundles, rows):
    version_b = json.loads((bundles[1] / "manifest.json").read_text())["files"]["model.safetensors"][:12]
    status, body = reload(workers2, json.dumps({"bundle": str(bundles[1])}).encode())
    assert status == 200, body
    assert len(body["workers"]) == 2 and {w["version"] for w in body["workers"]} == {version_b}, body
    # answered only once every worker serves it: no request after this gets the old model
    for _ in range(20):
        status, health = request(workers2, "GET", "/healthz")
        assert health["model"]["version"] == version_b and health["consistent"] is True, health
        assert set(_versions(workers2).values()) == {version_b}
    probs = {tuple(predict(workers2, rows[:2])[1]["probabilities"]) for _ in range(20)}
    assert len(probs) == 1
    meta = request(workers2, "GET", "/v1/metadata")[1]
    assert meta["model"]["version"] == version_b and len(meta["workers"]) == 2
    assert reload(workers2, json.dumps({"bundle": str(bundles[0])}).encode())[0] == 200


@pytest.mark.slow
def test_sighup_with_two_workers_reloads_each_in_place(workers2, bundles, rows):
    """uvicorn restarted each worker on SIGHUP with a 5 s health check, which a slow load fails, and then kept
    some old workers: now SIGHUP publishes a reload that every worker follows (and retries)."""
    before = request(workers2, "GET", "/healthz")[1]
    gens = {w["generation"] for w in before["workers"]}
    os.kill(workers2.proc.pid, signal.SIGHUP)
    deadline = time.time() + 60
    while time.time() < deadline:
        sts = request(workers2, "GET", "/healthz")[1]["workers"]
        if len(sts) == 2 and all(w["generation"] > max(gens) for w in sts):
            break
        time.sleep(0.2)
    assert len(sts) == 2 and all(w["generation"] > max(gens) for w in sts), sts
    assert len({w["version"] for w in sts}) == 1 and {w["worker"] for w in sts} == {w["worker"] for w in
                                                                                 before["workers"]}
    assert predict(workers2, rows[:1])[0] == 200


def test_a_worker_that_cannot_follow_rolls_every_worker_back(bundles, tmp_path, monkeypatch):
    """Two workers in one process sharing a control file; the second one's load of the new bundle fails.
    Before: a 200, and that worker kept the old model for good. Now: a 503 naming it, every worker back on
    the previous version; a later reload, once loads work, reaches both."""
    testclient = pytest.importorskip("fastapi.testclient")
    import deepfm.serve.server as server_mod

    real = server_mod.Predictor
    loads: dict[str, int] = {}
    failing = threading.Event()
    failing.set()

    def flaky(path, **kw):
        loads[str(path)] = loads.get(str(path), 0) + 1
        if str(path) == str(bundles[1]) and loads[str(path)] >= 2 and failing.is_set():
            raise DataError("disk says no")
        return real(path, **kw)

    control = tmp_path / "control.json"
    server_mod.write_control(str(control), str(bundles[0]), 0)
    cfg = server_mod.ServeConfig(bundle=str(bundles[0]), admin_token=TOKEN, control=str(control), workers=2,
                                 reload_timeout_s=20)
    apps = [server_mod.create_app(cfg, predictor=real(bundles[0])) for _ in range(2)]
    monkeypatch.setattr(server_mod, "Predictor", flaky)
    v_a = real(bundles[0]).model_info["version"]
    v_b = real(bundles[1]).model_info["version"]
    auth = {"authorization": f"Bearer {TOKEN}"}
    with testclient.TestClient(apps[0]) as c1, testclient.TestClient(apps[1]) as c2:
        r = c1.post("/admin/reload", json={"bundle": str(bundles[1])}, headers=auth)
        assert r.status_code == 503 and "disk says no" in r.text and v_a in r.text, r.text
        deadline = time.time() + 10
        while time.time() < deadline and {c.get("/healthz").json()["model"]["version"] for c in (c1, c2)} != {v_a}:
            time.sleep(0.1)
        assert {c.get("/healthz").json()["model"]["version"] for c in (c1, c2)} == {v_a}
        failing.clear()
        r = c1.post("/admin/reload", json={"bundle": str(bundles[1])}, headers=auth)
        assert r.status_code == 200 and {w["version"] for w in r.json()["workers"]} == {v_b}, r.text
        assert {c.get("/healthz").json()["model"]["version"] for c in (c1, c2)} == {v_b}
        assert c1.get("/healthz").json()["consistent"] is True


def test_a_worker_whose_follow_up_load_failed_retries(bundles, tmp_path, monkeypatch):
    """A published reload (as SIGHUP publishes it: no worker waits on it) whose first load fails in one
    worker: that worker retries (it kept the old model for good before), and both end on the new version."""
    testclient = pytest.importorskip("fastapi.testclient")
    import deepfm.serve.server as server_mod

    real = server_mod.Predictor
    loads: list[str] = []

    def flaky(path, **kw):
        loads.append(str(path))
        if loads.count(str(bundles[1])) == 1:
            raise DataError("a transient failure")
        return real(path, **kw)

    control = tmp_path / "control.json"
    server_mod.write_control(str(control), str(bundles[0]), 0)
    cfg = server_mod.ServeConfig(bundle=str(bundles[0]), control=str(control), workers=2, reload_timeout_s=20)
    apps = [server_mod.create_app(cfg, predictor=real(bundles[0])) for _ in range(2)]
    monkeypatch.setattr(server_mod, "Predictor", flaky)
    v_b = real(bundles[1]).model_info["version"]
    with testclient.TestClient(apps[0]) as c1, testclient.TestClient(apps[1]) as c2:
        server_mod.write_control(str(control), str(bundles[1]), 1)
        deadline = time.time() + 20
        while time.time() < deadline and {c.get("/healthz").json()["model"]["version"] for c in (c1, c2)} != {v_b}:
            time.sleep(0.2)
        health = [c.get("/healthz").json() for c in (c1, c2)]
        assert {h["model"]["version"] for h in health} == {v_b}, health
        assert sum(h["counters"].get("follow_failures", 0) for h in health) >= 1
        assert loads.count(str(bundles[1])) >= 3 and health[0]["consistent"] is True


# ------------------------------------------------------------------ item 14: the port
@pytest.mark.parametrize("port", ["70000", "0", "-1"])
def test_port_out_of_range_is_exit_2(bundles, port):
    r = subprocess.run([sys.executable, "-m", "deepfm.cli", "serve", str(bundles[0]), "--port", port],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--port" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------ item 15: leaks, the token
def test_public_routes_reveal_no_path_and_no_pid(server, bundles):
    for path in ("/healthz", "/v1/metadata"):
        status, body = request(server, "GET", path)
        text = json.dumps(body)
        assert status == 200 and "pid" not in body
        assert str(bundles[0]) not in text and str(bundles[0].parent) not in text, text[:500]
        assert str(server.proc.pid) not in json.dumps({k: v for k, v in body.items() if k in ("worker", "pid")})
    assert body["model"]["name"] == "a" and len(body["model"]["version"]) == 12


def test_admin_token_file_keeps_the_token_off_the_command_line(server):
    cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes()
    assert TOKEN.encode() not in cmdline and b"--admin-token-file" in cmdline
    assert reload(server)[0] == 200
    r = subprocess.run([sys.executable, "-m", "deepfm.cli", "serve", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert "--admin-token-file" in r.stdout and "/proc/PID/cmdline" in r.stdout


def test_reload_checks_the_token_before_the_body(server):
    for body in (b'{"bundle": 5}', b"nope", b'{"other": 1}', b"[" * 5000 + b"]" * 5000):
        assert reload(server, body, auth=None)[0] == 401, body[:20]
        assert reload(server, body, auth="Bearer wrong")[0] == 401, body[:20]
    assert reload(server, b'{"bundle": 5}')[0] == 422  # with the token: the body is validated
    # and 404 (not 422) when reloads are off
    from deepfm.serve.server import ServeConfig, create_app
    testclient = pytest.importorskip("fastapi.testclient")
    with testclient.TestClient(create_app(ServeConfig(bundle="unused"), predictor=object())) as c:
        assert c.post("/admin/reload", content=b'{"bundle": 5}').status_code == 404


def test_bearer_scheme_is_case_insensitive(server):
    for scheme in ("bearer", "BEARER", "bEaReR"):
        assert reload(server, auth=f"{scheme} {TOKEN}")[0] == 200, scheme
    for auth in (f"Basic {TOKEN}", f"Bearer{TOKEN}", f"Bearer  {TOKEN}", TOKEN):
        assert reload(server, auth=auth)[0] == 401, auth


# ------------------------------------------------------------------ item 16: one numeric parser
NUMERIC_SPELLINGS = ["3", " 3 ", "\t-3.5e2\n", "+3", ".5", "3.", "1E5", "٣", "３", "٣.٥", "1e٣", "\xa03", "3\xa0",
                     "\u20073", "3\u3000", "\x1c3", "inf", "nan", "1_000", "0x1", ".", "e5", "1e", "++3", "3 4", "",
                     "   ", "\xa0", "1e400", "-0"]


def test_online_and_batch_accept_exactly_the_same_numbers():
    from deepfm.serve.records import RecordError, _number

    v = readers.Validator("f.tsv", np.arange(1, len(NUMERIC_SPELLINGS) + 1), "skip", readers.BadRows())
    out = v.number(pa.array(NUMERIC_SPELLINGS), "I1").to_pylist()
    for text, keep, batch in zip(NUMERIC_SPELLINGS, v.keep, out, strict=True):
        try:
            online = _number(text, 0, "I1")
        except RecordError:
            online = "rejected"
        want = "rejected" if not keep else ("missing" if batch is None else batch)
        got = online if not isinstance(online, float) or online == online else "missing"
        assert got == want, (text, got, want)


def test_unicode_digits_rejected_online_and_in_files(server, rows, tmp_path):
    for bad in ("٣", "３", "\xa03", "3\u3000"):
        status, body = predict(server, [{**rows[0], "I1": bad}])
        assert status == 422 and body["detail"][0]["loc"] == ["body", "rows", 0, "I1"], (bad, body)
        line = "\t".join(["1", bad] + ["1"] * 12 + ["a"] * 26)
        f = write(tmp_path / "u.tsv", line + "\n")
        with pytest.raises(DataError) as e:
            readers.read(f, "criteo")
        assert e.value.field == "I1", bad


# ------------------------------------------------------------------ item 18: absent and unknown keys
def test_absent_keys_are_missing_in_a_one_row_request(server, rows):
    sparse = {k: v for k, v in rows[0].items() if k not in ("C9", "I3")}
    status, body = predict(server, [sparse])
    assert status == 200, body
    assert body["probabilities"] == predict(server, [{**rows[0], "C9": None, "I3": None}])[1]["probabilities"]
    assert predict(server, [{}])[0] == 200  # every feature missing
    assert "unknown_fields" not in body


def test_unknown_keys_are_reported_and_counted(server, rows):
    status, body = predict(server, [{**rows[0], "C1x": "typo", "label": 1}, rows[1]])
    assert status == 200 and body["unknown_fields"] == ["C1x"], body  # the label column is known, and ignored
    assert request(server, "GET", "/healthz")[1]["counters"]["unknown_field_requests"] >= 1


def test_strict_fields_rejects_unknown_keys(workers2, rows):
    status, body = predict(workers2, [rows[0], {**rows[1], "C1x": "typo"}])
    assert status == 422 and body["detail"][0]["loc"] == ["body", "rows", 1, "C1x"], body
    assert predict(workers2, [rows[0]])[0] == 200


def test_servers_logged_no_traceback(server, workers2):
    for srv in (server, workers2):
        assert srv.proc.poll() is None
        log = srv.log.read_text(errors="replace")
        assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]
