"""HTTP server (FastAPI on uvicorn): raw rows in, probabilities out, through the one Predictor.

    POST /v1/predict     {"rows": [{field: raw value, ...}, ...]} -> {"probabilities": [...], "model": {...}}
    GET  /healthz        liveness + the model being served
    GET  /v1/metadata    schema, fields, training metrics, bundle format version
    POST /admin/reload   load a bundle (the same folder, or {"bundle": PATH}) without dropping requests;
                         404 unless an admin token is configured, 401 without the right bearer token
    GET  /openapi.json, /docs

Concurrent requests are micro-batched: each request is validated and encoded on arrival (a bad value is a
422 naming the row and field), then a single worker thread runs the model on everything that queued up
while the previous batch ran (no added wait when idle, bigger batches under load). Limits: rows per
request (422), body bytes (413), queue wait + compute time (503). SIGHUP reloads the bundle too.

Per connection (the HTTP protocol, ``serve.protocol.GuardedHttpTools``): the request line and headers must arrive within
``header_timeout_s`` and the body within ``body_timeout_s`` (else a 408 and the connection closed: a client
trickling bytes cannot hold it open), an idle keep-alive connection closes after ``keep_alive_s``, headers
over ``max_header_bytes`` in all are a 431, and connections beyond ``max_connections`` per worker get a 503.
A client that goes away before its answer (e.g. after pipelining requests) is a counted event, not a
logged traceback. Counters: ``/healthz`` and ``/v1/metadata`` (per worker).

Several workers: a reload asked of one worker is published in a control file that the others follow; the
worker asked waits until every worker serves the new version (or rolls all of them back and says so), and
a worker whose load failed retries. ``/healthz`` and ``/v1/metadata`` name each worker's version.
"""


import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from deepfm import __version__
from deepfm.serve.counters import COUNTERS
from deepfm.serve.predictor import Predictor
from deepfm.serve.records import RecordError

log = logging.getLogger("deepfm.serve")


@dataclass
class ServeConfig:
    bundle: str
    max_rows: int = 1000  # rows per request
    max_body_bytes: int = 4 << 20
    max_batch_rows: int = 4096  # rows per model call when requests queue up
    timeout_s: float = 10.0  # queue wait + compute per request, then 503
    admin_token: str | None = None
    threads: int = 0
    engine: str = "torch"
    device: str = "cpu"  # where the torch engine scores batches above serve.fastpath.SMALL_BATCH rows
    control: str | None = None  # multi-worker: a JSON file {"bundle", "generation"} every worker follows
    workers: int = 1
    strict_fields: bool = False  # a row key the model does not read: 422 (else reported in the answer)
    # per connection (GuardedHttpTools)
    header_timeout_s: float = 10.0  # request line + headers, from the first byte (or the connection)
    body_timeout_s: float = 30.0  # the whole body, once the headers are in
    keep_alive_s: float = 5.0  # an idle connection between requests
    max_header_bytes: int = 64 << 10  # request line + all headers (more: 431)
    max_connections: int = 1000  # open connections per worker (more: 503 and closed)
    reload_timeout_s: float = 120.0  # a bundle load (a reload that takes longer fails and frees the lock)

    @classmethod
    def from_env(cls) -> "ServeConfig":
        """For ``uvicorn --factory`` worker processes: the settings travel as DEEPFM_SERVE_* variables
        (the token as DEEPFM_ADMIN_TOKEN)."""
        e, kw = os.environ, {}
        for f in fields(cls):
            raw = e.get("DEEPFM_ADMIN_TOKEN" if f.name == "admin_token" else f"DEEPFM_SERVE_{f.name.upper()}")
            if raw is None or (raw == "" and f.default is None):
                continue
            kind = str if f.default is None or f.default is MISSING else type(f.default)
            kw[f.name] = raw == "1" if kind is bool else kind(raw)
        return cls(**kw)

    def to_env(self) -> dict[str, str]:
        env = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            name = "DEEPFM_ADMIN_TOKEN" if f.name == "admin_token" else f"DEEPFM_SERVE_{f.name.upper()}"
            env[name] = ("1" if v else "0") if isinstance(v, bool) else str(v)
        return env


def read_control(path: str) -> dict[str, Any]:
    try:
        with open(path) as fh:
            c = json.load(fh)
        return c if isinstance(c, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write under a unique temporary name in the same folder, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)


def write_control(path: str, bundle: str, generation: int, version: str | None = None) -> None:
    """Atomically publish the bundle every worker should serve (``version``: its model version when known, so
    a worker already serving it needs no load)."""
    _write_json(Path(path), {"bundle": bundle, "generation": generation, "version": version})


def _status_file(control: str, pid: int, worker: str) -> Path:
    return Path(control).parent / f"worker-{pid}-{worker}.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_statuses(control: str) -> list[dict[str, Any]]:
    """What each live worker last reported: {worker, version, generation, error}; a dead worker's file is
    dropped (uvicorn replaces a worker that dies, and the new one reports for itself)."""
    out = []
    for f in sorted(Path(control).parent.glob("worker-*.json")):
        try:
            pid = int(f.stem.split("-")[1])
        except (ValueError, IndexError):
            continue
        if not _alive(pid):
            with contextlib.suppress(OSError):
                f.unlink()
            continue
        st = read_control(str(f))
        if st:
            out.append(st)
    return out


@dataclass
class _Job:
    predictor: Predictor
    idx: np.ndarray
    val: np.ndarray
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Queues encoded requests; one worker runs the model on all jobs queued for the same predictor."""

    def __init__(self, max_batch_rows: int) -> None:
        self.max_batch_rows = max_batch_rows
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="deepfm-model")
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.rows = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.pool.shutdown(wait=True)

    async def submit(self, predictor: Predictor, idx: np.ndarray, val: np.ndarray) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Job(predictor, idx, val, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            rows = jobs[0].idx.shape[0]
            while rows < self.max_batch_rows and not self.queue.empty():
                job = self.queue.get_nowait()
                jobs.append(job)
                rows += job.idx.shape[0]
            jobs = [j for j in jobs if not j.future.done()]  # timed out / client gone
            for pred in {id(j.predictor): j.predictor for j in jobs}.values():  # one batch per bundle
                group = [j for j in jobs if j.predictor is pred]
                try:
                    idx = np.concatenate([j.idx for j in group]) if len(group) > 1 else group[0].idx
                    val = np.concatenate([j.val for j in group]) if len(group) > 1 else group[0].val
                    logits = await loop.run_in_executor(self.pool, pred.logits, idx, val)
                except Exception as exc:  # a model failure fails these requests, not the server
                    for j in group:
                        if not j.future.done():
                            j.future.set_exception(exc)
                    continue
                self.batches += 1
                self.rows += idx.shape[0]
                s = 0
                for j in group:
                    n = j.idx.shape[0]
                    if not j.future.done():
                        j.future.set_result(pred.probabilities(logits[s: s + n]))  # + the bundle's calibration
                    s += n


class _Front:
    """ASGI entry: 413 for bodies over ``limit`` bytes (declared or streamed), POST /v1/predict answered by
    ``predict(body)`` directly, and POST /admin/reload checked by ``admin(headers)`` (an answer to refuse it
    with, or None) once its body is read within the limit, so that a wrong token is a 401 (404 when reloads
    are off) whatever the body; everything else goes to the FastAPI app."""

    def __init__(self, app: Callable, limit: int, predict: Callable[[bytes], Awaitable[tuple[int, bytes]]],
                 admin: Callable[[dict], tuple[int, bytes] | None]) -> None:
        self.app, self.limit, self.predict, self.admin = app, limit, predict, admin

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _send(send, 413, _detail(f"request body over the limit of {self.limit} bytes"))
            return
        seen, too_large = 0, False

        async def limited() -> dict:
            nonlocal seen, too_large
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    too_large = True
                    raise _TooLarge()
            return msg

        async def whole_body() -> bytes | None:
            chunks = []
            while True:
                msg = await limited()
                if msg["type"] == "http.disconnect":
                    return None
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    return b"".join(chunks)

        async def unless_too_large(msg: dict) -> None:
            if not too_large:  # FastAPI answers a body it could not read with a 400: ours is the 413 below
                await send(msg)

        try:
            if scope["path"] == "/v1/predict" and scope["method"] == "POST":
                body = await whole_body()
                if body is not None:
                    await _send(send, *await self.predict(body))
            elif scope["path"] == "/admin/reload" and scope["method"] == "POST":
                body = await whole_body()
                if body is None:
                    return
                refused = self.admin(scope)
                if refused is not None:
                    await _send(send, *refused)
                    return
                sent = False

                async def replay() -> dict:  # the body already read, then whatever the connection says
                    nonlocal sent
                    if not sent:
                        sent = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, send)
            else:
                await self.app(scope, limited, unless_too_large)
        except _TooLarge:
            pass
        if too_large:
            await _send(send, 413, _detail(f"request body over the limit of {self.limit} bytes"))


def bearer_ok(header: bytes | None, token: str) -> bool:
    """``Authorization: Bearer TOKEN``, the scheme in any case (RFC 9110 makes it case-insensitive), the token
    compared in constant time (as bytes: a header holds any latin-1 text, compare_digest refuses non-ASCII str)."""
    if not header:
        return False
    scheme, _, cred = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(cred, token.encode("utf-8", "surrogateescape"))


class _TooLarge(Exception):
    pass


def _detail(text: str) -> bytes:
    return json.dumps({"detail": text}).encode()


def _error(status: int, loc: list, msg: str, kind: str) -> tuple[int, bytes]:
    return status, json.dumps({"detail": [{"loc": loc, "msg": msg, "type": kind}]}).encode()


async def _send(send: Callable, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(cfg: ServeConfig, predictor: Predictor | None = None) -> Any:
    """The FastAPI application for ``cfg`` (``predictor``: an already-loaded one, e.g. in tests)."""
    from fastapi import Body, FastAPI, Header, HTTPException, Request, Response
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

    # Values are checked (and located by row and field) by RecordEncoder, which knows each field's kind;
    # a pydantic union per value would cost more than the whole encoding. The spec still states the types.
    value = Annotated[Any, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "number"},
                                                     {"type": "array", "items": {"type": "string"}},
                                                     {"type": "null"}]})]

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        rows: list[dict[str, value]] = Field(min_length=1, max_length=cfg.max_rows,
                                             description="Raw feature values, one object per row (as in the logs)")

    class ModelInfo(BaseModel):
        name: str
        version: str

    class PredictResponse(BaseModel):
        probabilities: list[float]
        model: ModelInfo
        unknown_fields: list[str] | None = Field(None, description="Row keys this model does not read (ignored; "
                                                 "a 422 with --strict-fields)")

    class ReloadRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        bundle: str | None = Field(None, description="Bundle folder to load (default: the one being served)")

    control = read_control(cfg.control) if cfg.control else {}
    state: dict[str, Any] = {"predictor": predictor, "bundle": control.get("bundle", cfg.bundle),
                             "loaded": time.time(), "generation": control.get("generation", 0),
                             "previous": None, "error": None}
    worker = secrets.token_hex(4)  # names this worker in /healthz (its pid would tell too much)
    batcher = MicroBatcher(cfg.max_batch_rows)
    reload_lock = asyncio.Lock()

    def load_predictor(path: str) -> Predictor:
        p = Predictor(path, threads=cfg.threads, engine=cfg.engine, device=cfg.device)
        p.records.warm()
        p.logits(*p.records.encode(_example_rows(p)))  # the first (slow) call happens before any request
        if p.quant is not None:  # --engine int8/bf16/auto: the parity check (random rows) before any request
            p.quant.resolve()
        return p

    async def load_bounded(path: str) -> Predictor:
        """load_predictor in a daemon thread, given up after reload_timeout_s: a load that never ends (a file
        that never ends, a hung disk) must not hold the reload lock, nor keep the process from exiting."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def done(result: Any, exc: BaseException | None) -> None:
            if not fut.done():
                fut.set_exception(exc) if exc is not None else fut.set_result(result)

        def work() -> None:
            try:
                result, exc = load_predictor(path), None
            except BaseException as e:  # handed to the waiting reload
                result, exc = None, e
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(done, result, exc)

        threading.Thread(target=work, name="deepfm-reload", daemon=True).start()
        try:
            return await asyncio.wait_for(fut, cfg.reload_timeout_s)
        except asyncio.TimeoutError:
            COUNTERS["reload_timeouts"] += 1
            raise ReloadError(f"loading {Path(path).name!r} took over {cfg.reload_timeout_s:g} s "
                              "(--reload-timeout); given up, still serving the previous bundle") from None

    def version() -> str:
        return state["predictor"].model_info["version"]

    def report() -> None:
        """This worker's state, for the others and for /healthz (multi-worker only)."""
        if cfg.control:
            with contextlib.suppress(OSError):
                _write_json(_status_file(cfg.control, os.getpid(), worker),
                            {"worker": worker, "version": version(), "generation": state["generation"],
                             "error": state["error"]})

    def switch(path: str, p: Predictor, gen: int) -> None:
        if state["predictor"] is not p and cfg.control:  # kept while a rollback may come (then dropped: memory)
            state["previous"] = (state["bundle"], state["predictor"])
            state["previous_until"] = time.monotonic() + cfg.reload_timeout_s + 10
        state.update(predictor=p, bundle=path, loaded=time.time(), generation=gen, error=None)
        report()
        log.info("serving %s (%s), generation %d", Path(path).name, p.model_info["version"], gen)

    async def await_workers(gen: int) -> list[dict[str, Any]]:
        """Every worker's status once all report generation ``gen``, or one reports a failure to load it, or
        the reload timeout has passed."""
        deadline = time.monotonic() + cfg.reload_timeout_s
        while True:
            sts = worker_statuses(cfg.control)
            failed = any(w.get("error_generation") == gen for w in sts)
            ready = sum(w.get("generation", 0) >= gen for w in sts)
            if failed or ready >= cfg.workers or time.monotonic() > deadline:
                return sts
            await asyncio.sleep(0.1)

    async def reload(path: str) -> tuple[Predictor, list[dict[str, Any]]]:
        """Load ``path`` and swap it in; in-flight jobs keep the predictor they were encoded for. With several
        workers, the reload is published in the control file, and this waits until every worker serves the
        new version; if one cannot, every worker goes back to the previous bundle and this raises."""
        async with reload_lock:
            p = await load_bounded(path)
            if not cfg.control:
                switch(path, p, state["generation"] + 1)
                return p, []
            # a generation above every one published (another worker may be ahead); published first: if that
            # fails, nothing has switched
            gen = max(state["generation"], read_control(cfg.control).get("generation", 0)) + 1
            old_path, old = state["bundle"], state["predictor"]
            write_control(cfg.control, path, gen, p.model_info["version"])
            switch(path, p, gen)
            sts = await await_workers(gen)
            bad = [w for w in sts if w.get("generation", 0) < gen or w.get("version") != p.model_info["version"]]
            if not bad and len(sts) >= cfg.workers:
                return p, sts
            # roll every worker back: the same request must get the same answer from any worker
            errors = "; ".join(f"worker {w.get('worker')}: {w.get('error') or 'no answer in time'}"
                               for w in bad) or f"{cfg.workers - len(sts)} worker(s) never reported"
            back = gen + 1
            write_control(cfg.control, old_path, back, old.model_info["version"])
            switch(old_path, old, back)
            COUNTERS["reloads_rolled_back"] += 1
            raise ReloadError(f"reload of {Path(path).name!r} failed on {len(bad) or 'some'} of {cfg.workers} "
                              f"workers ({errors[:500]}); every worker goes back to version "
                              f"{old.model_info['version']}", rolled_back=True)

    async def follow(c: dict[str, Any]) -> None:
        """Serve what the control file says: the current or previous predictor when its version is the one
        published, else a load (a failure is reported and retried by the caller)."""
        path, gen, want = c.get("bundle"), int(c.get("generation", 0)), c.get("version")
        async with reload_lock:
            if gen <= state["generation"]:
                return
            prev = state["previous"]
            if want and path == state["bundle"] and version() == want:
                state["generation"] = gen
                report()
            elif want and prev is not None and prev[0] == path and prev[1].model_info["version"] == want:
                switch(path, prev[1], gen)
            else:
                p = await load_bounded(path)
                if want and p.model_info["version"] != want:  # the folder changed since it was published
                    raise ReloadError(f"{Path(path).name!r} now holds version {p.model_info['version']}, "
                                      f"not the {want} published")
                switch(path, p, gen)

    async def follow_control() -> None:
        """Other workers' reloads: poll the control file (every half second); a failed load is retried with
        a backoff (1, 2, 4 ... 30 s) while its generation is the latest."""
        retry_at, delay = 0.0, 1.0
        while True:
            await asyncio.sleep(0.5)
            if state["previous"] is not None and time.monotonic() > state["previous_until"]:
                state["previous"] = None
            c = read_control(cfg.control)
            if int(c.get("generation", 0)) <= state["generation"] or time.monotonic() < retry_at:
                continue
            try:
                await follow(c)
                retry_at, delay = 0.0, 1.0
            except Exception as exc:  # whatever the bundle holds, keep serving (and following)
                COUNTERS["follow_failures"] += 1
                state["error"] = f"{exc}"[:500]
                if cfg.control:
                    with contextlib.suppress(OSError):
                        _write_json(_status_file(cfg.control, os.getpid(), worker),
                                    {"worker": worker, "version": version(), "generation": state["generation"],
                                     "error": state["error"], "error_generation": int(c.get("generation", 0))})
                log.error("following reload to generation %s failed, still serving %s (retry in %.0f s): %s",
                          c.get("generation"), version(), delay, exc)
                retry_at, delay = time.monotonic() + delay, min(30.0, delay * 2)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        if state["predictor"] is None:
            state["predictor"] = await asyncio.get_running_loop().run_in_executor(None, load_predictor,
                                                                                  state["bundle"])
        report()
        batcher.start()
        loop = asyncio.get_running_loop()
        follower = loop.create_task(follow_control()) if cfg.control else None
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not on Windows / main thread
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_safe_reload(state["bundle"])))
        yield
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGHUP)
        if follower is not None:
            follower.cancel()
        await batcher.stop()
        if cfg.control:
            with contextlib.suppress(OSError):
                _status_file(cfg.control, os.getpid(), worker).unlink()

    async def _safe_reload(path: str) -> None:
        try:
            await reload(path)
        except Exception as exc:  # whatever the bundle holds, keep serving (and following)
            log.error("reload failed, still serving the previous bundle: %s", exc)

    def admin_check(scope: dict) -> tuple[int, bytes] | None:
        if not cfg.admin_token:
            return 404, _detail("Not Found")
        if not bearer_ok(dict(scope.get("headers") or []).get(b"authorization"), cfg.admin_token):
            return 401, _detail("missing or wrong bearer token")
        return None

    known = None  # the keys a row may hold: the model's inputs and the label column

    def unknown_keys(rows: list) -> list[str]:
        nonlocal known
        pred: Predictor = state["predictor"]
        if known is None or known[0] is not pred:
            known = (pred, {*pred.records.sources, *([pred.pre.schema.label] if pred.pre.schema.label else [])})
        return sorted(set().union(*(r for r in rows if type(r) is dict)) - known[1])

    async def handle_predict(body: bytes) -> tuple[int, bytes]:
        """All of POST /v1/predict on the raw body -> (status, JSON body); 422 details as FastAPI writes them."""
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            return _error(422, ["body"], "JSON decode error", "json_invalid")
        if not isinstance(obj, dict):
            return _error(422, ["body"], "Input should be an object with a 'rows' list", "model_attributes_type")
        for key in obj:
            if key != "rows":
                return _error(422, ["body", key], "Extra inputs are not permitted", "extra_forbidden")
        rows = obj.get("rows")
        if rows is None:
            return _error(422, ["body", "rows"], "Field required", "missing")
        if not isinstance(rows, list):
            return _error(422, ["body", "rows"], "Input should be a valid list", "list_type")
        if not 1 <= len(rows) <= cfg.max_rows:
            return _error(422, ["body", "rows"], f"a request holds 1 to {cfg.max_rows} rows, got {len(rows)}",
                          "too_long" if rows else "too_short")
        pred: Predictor = state["predictor"]
        unknown = unknown_keys(rows)  # a misspelled name would otherwise read as a missing value, silently
        if unknown:
            COUNTERS["unknown_field_requests"] += 1
            if cfg.strict_fields:
                r = next(i for i, row in enumerate(rows) if type(row) is dict and unknown[0] in row)
                return _error(422, ["body", "rows", r, unknown[0]], f"not a field of this model (--strict-fields; "
                              f"{len(unknown)} unknown: {', '.join(unknown[:8])[:300]})", "extra_forbidden")
            bad = _badly_typed(rows, unknown)  # ignored, but still of a type the spec allows
            if bad is not None:
                return _error(422, ["body", "rows", *bad], "expected a string, a number, a list of strings or "
                              "null", "value_error")
        try:
            idx, val = pred.records.encode(rows)
        except RecordError as e:
            loc = ["body", "rows"] + ([e.row] if e.row is not None else []) + ([e.field] if e.field else [])
            return _error(422, loc, e.message, "value_error")
        try:
            p = await asyncio.wait_for(batcher.submit(pred, idx, val), cfg.timeout_s)
        except asyncio.TimeoutError:
            return 503, json.dumps({"detail": f"prediction took over {cfg.timeout_s} s; retry later"}).encode()
        if not np.isfinite(p).all():  # values in range that the model still overflows on: NaN is not JSON
            return _error(422, ["body", "rows", int(np.flatnonzero(~np.isfinite(p))[0])],
                          "the model's score is not finite: values too large for this model", "value_error")
        out: dict[str, Any] = {"probabilities": p.tolist(), "model": pred.model_info}
        if unknown:
            out["unknown_fields"] = unknown[:100]
        return 200, json.dumps(out, separators=(",", ":")).encode()

    app = FastAPI(title="deepfm", version=__version__, lifespan=lifespan,
                  description="Click-through-rate prediction with DeepFM: raw feature values in, probabilities out.")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()[:20]]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.post("/v1/predict", response_model=PredictResponse, openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": PredictRequest.model_json_schema()}}}},
        responses={413: {"description": "Body too large"}, 422: {"description": "Invalid request: detail names "
                   "the row and field"}, 503: {"description": "Overloaded or timed out"}})
    async def predict(request: Request) -> Response:
        """Click probabilities for raw rows. (Requests are answered by the same handler in front of FastAPI's
        routing, which costs as much as the rest of a 1-row request; this route documents it.)"""
        status, payload = await handle_predict(await request.body())
        return Response(payload, status_code=status, media_type="application/json")

    def serving() -> dict[str, Any]:
        """Which version this worker serves, and (several workers) what each one reported. No path, no pid:
        both are for the operator's eyes, and these routes need no token."""
        pred: Predictor = state["predictor"]
        out = {"model": pred.model_info, "generation": state["generation"], "worker": worker,
               "counters": dict(COUNTERS)}
        if state["error"]:
            out["error"] = state["error"]
        if cfg.control:
            sts = worker_statuses(cfg.control)
            out["workers"] = sts
            out["consistent"] = len({w.get("version") for w in sts}) <= 1
        return out

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", **serving(), "batches": batcher.batches, "rows": batcher.rows}

    @app.get("/v1/metadata")
    async def metadata() -> dict[str, Any]:
        pred: Predictor = state["predictor"]
        b = pred.bundle
        return {**serving(), "loaded": state["loaded"],
                "format": b.manifest.get("format"), "format_version": b.manifest.get("format_version"),
                "deepfm_version": b.manifest.get("deepfm_version"), "created": b.manifest.get("created"),
                "model_kind": b.model.cfg.model, "config": b.model.cfg.to_dict(),
                "schema": pred.pre.schema.to_dict(), "inputs": sorted({f.source for f in pred.pre.schema.fields}),
                "metrics": _finite(b.metrics), "limits": {
                    "max_rows": cfg.max_rows, "max_body_bytes": cfg.max_body_bytes, "timeout_s": cfg.timeout_s,
                    "header_timeout_s": cfg.header_timeout_s, "body_timeout_s": cfg.body_timeout_s,
                    "keep_alive_s": cfg.keep_alive_s, "max_header_bytes": cfg.max_header_bytes,
                    "max_connections": cfg.max_connections, "strict_fields": cfg.strict_fields}}

    @app.post("/admin/reload", responses={400: {"description": "Body unreadable (not UTF-8, nested too deeply)"},
                                          401: {"description": "Bad token"}, 404: {"description": "Disabled"},
                                          413: {"description": "Body too large"},
                                          503: {"description": "Not every worker could load it: all rolled back"}})
    async def admin_reload(body: ReloadRequest | None = Body(None),
                           authorization: str | None = Header(None)) -> Any:
        # checked before the body by _Front; again here for an app called without it
        if not cfg.admin_token:
            raise HTTPException(404, "Not Found")
        if not bearer_ok(authorization.encode("latin-1") if authorization else None, cfg.admin_token):
            raise HTTPException(401, "missing or wrong bearer token")
        path = (body.bundle if body and body.bundle else None) or state["bundle"]
        if not path.isprintable() or not _is_dir(path):  # no NUL, control or lone surrogate characters
            raise HTTPException(422, _bundle_error(f"{path!r}: no such bundle folder"))
        try:
            p, workers = await reload(path)
        except ReloadError as e:  # loaded here, not by every worker (or not in time): all back on the old one
            if e.rolled_back:
                return JSONResponse({"detail": str(e), "workers": worker_statuses(cfg.control)}, status_code=503)
            raise HTTPException(422, _bundle_error(f"reload failed, still serving the previous bundle: {e}")) from None
        except Exception as e:  # a malformed or unreadable folder must not break the server
            raise HTTPException(422, _bundle_error(f"reload failed, still serving the previous bundle: {e}")) from None
        out = {"status": "reloaded", "model": p.model_info, "bundle": path}
        if workers:
            out["workers"] = workers
        return out

    return _Front(app, cfg.max_body_bytes, handle_predict, admin_check)


class ReloadError(Exception):
    """A reload that did not happen: it timed out, or not every worker could follow it (``rolled_back``)."""

    def __init__(self, message: str, rolled_back: bool = False) -> None:
        super().__init__(message)
        self.rolled_back = rolled_back


def _badly_typed(rows: list, keys: list[str]) -> tuple[int, str] | None:
    """(row, key) of the first value under ``keys`` that is not a string, number, list of strings or null."""
    for r, row in enumerate(rows):
        if type(row) is not dict:
            continue
        for k in keys:
            v = row.get(k)
            if not (v is None or type(v) in (str, int, float) or (type(v) is list and
                                                                  all(type(t) is str for t in v))):
                return r, k
    return None


def _bundle_error(msg: str) -> list[dict[str, Any]]:
    """A 422 detail for /admin/reload in FastAPI's (documented) validation error shape."""
    return [{"loc": ["body", "bundle"], "msg": msg, "type": "value_error"}]


def _is_dir(path: str) -> bool:
    """Path.is_dir, and False where the path cannot even be looked at (a name too long, no permission)."""
    try:
        return Path(path).is_dir()
    except OSError:
        return False


def _example_rows(p: Predictor) -> list[dict[str, Any]]:
    return [{s: None for s in p.records.sources}]


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def app_from_env() -> Any:
    """``uvicorn --factory deepfm.serve.server:app_from_env`` (how ``deepfm serve --workers N`` starts each worker)."""
    return create_app(ServeConfig.from_env())


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          log_level: str = "info") -> None:
    """Run the server (blocking). More than one worker runs that many processes, each with the model."""
    import uvicorn

    from deepfm.serve.protocol import ConnLimits, GuardedHttpTools

    limits = ConnLimits(header_timeout_s=cfg.header_timeout_s, body_timeout_s=cfg.body_timeout_s,
                        max_header_bytes=cfg.max_header_bytes, max_connections=cfg.max_connections)
    common = dict(host=host, port=port, log_level=log_level, access_log=False, timeout_keep_alive=cfg.keep_alive_s,
                  timeout_graceful_shutdown=10, http=functools.partial(GuardedHttpTools, limits=limits),
                  # a worker (re)started by uvicorn loads the bundle before it answers its health check
                  timeout_worker_healthcheck=max(5, int(cfg.reload_timeout_s)))
    if workers > 1:
        import tempfile

        from uvicorn.supervisors.multiprocess import Multiprocess

        control_dir = Path(tempfile.mkdtemp(prefix="deepfm-serve-"))
        control = control_dir / "control.json"
        write_control(str(control), cfg.bundle, 0)
        cfg = ServeConfig(**{**cfg.__dict__, "control": str(control), "workers": workers})
        os.environ.update(cfg.to_env())
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # read when a worker starts
            os.environ.setdefault(var, str(max(1, cfg.threads)))

        def handle_hup(self: Any) -> None:
            """SIGHUP: every worker reloads the bundle through the control file (with retries), instead of
            uvicorn's restart of each worker, which aborts half-way (some workers new, some old) when a
            worker takes longer than its health check to load."""
            c = read_control(str(control))
            write_control(str(control), c.get("bundle", cfg.bundle), int(c.get("generation", 0)) + 1)
            log.info("SIGHUP: reloading %s in every worker", Path(c.get("bundle", cfg.bundle)).name)

        saved = Multiprocess.handle_hup
        Multiprocess.handle_hup = handle_hup  # this process only runs the server; restored below
        try:
            uvicorn.run("deepfm.serve.server:app_from_env", factory=True, workers=workers, **common)
        finally:
            Multiprocess.handle_hup = saved
            shutil.rmtree(control_dir, ignore_errors=True)
    else:
        uvicorn.run(create_app(cfg), **common)
