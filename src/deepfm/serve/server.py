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
"""


import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from deepfm import __version__
from deepfm.serve.predictor import Predictor
from deepfm.serve.records import RecordError
from deepfm.train.trainer import sigmoid

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
    control: str | None = None  # multi-worker: a JSON file {"bundle", "generation"} every worker follows

    @classmethod
    def from_env(cls) -> "ServeConfig":
        """For ``uvicorn --factory`` worker processes: the settings travel as DEEPFM_SERVE_* variables."""
        e = os.environ
        return cls(bundle=e["DEEPFM_SERVE_BUNDLE"], max_rows=int(e.get("DEEPFM_SERVE_MAX_ROWS", 1000)),
                   max_body_bytes=int(e.get("DEEPFM_SERVE_MAX_BODY_BYTES", 4 << 20)),
                   timeout_s=float(e.get("DEEPFM_SERVE_TIMEOUT_S", 10.0)),
                   admin_token=e.get("DEEPFM_ADMIN_TOKEN") or None, threads=int(e.get("DEEPFM_SERVE_THREADS", 0)),
                   engine=e.get("DEEPFM_SERVE_ENGINE", "torch"), control=e.get("DEEPFM_SERVE_CONTROL") or None)

    def to_env(self) -> dict[str, str]:
        env = {"DEEPFM_SERVE_BUNDLE": self.bundle, "DEEPFM_SERVE_MAX_ROWS": str(self.max_rows),
               "DEEPFM_SERVE_MAX_BODY_BYTES": str(self.max_body_bytes), "DEEPFM_SERVE_TIMEOUT_S": str(self.timeout_s),
               "DEEPFM_SERVE_THREADS": str(self.threads), "DEEPFM_SERVE_ENGINE": self.engine}
        if self.admin_token:
            env["DEEPFM_ADMIN_TOKEN"] = self.admin_token
        if self.control:
            env["DEEPFM_SERVE_CONTROL"] = self.control
        return env


def read_control(path: str) -> dict[str, Any]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def write_control(path: str, bundle: str, generation: int) -> None:
    """Atomically publish the bundle every worker should serve (write a temporary file, then rename)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"bundle": bundle, "generation": generation}, fh)
    os.replace(tmp, path)


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
                        j.future.set_result(sigmoid(logits[s: s + n]))
                    s += n


class _Front:
    """ASGI entry: 413 for bodies over ``limit`` bytes (declared or streamed), and POST /v1/predict answered
    by ``predict(body)`` directly; everything else goes to the FastAPI app."""

    def __init__(self, app: Callable, limit: int, predict: Callable[[bytes], Awaitable[tuple[int, bytes]]]) -> None:
        self.app, self.limit, self.predict = app, limit, predict

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

        async def unless_too_large(msg: dict) -> None:
            if not too_large:  # FastAPI answers a body it could not read with a 400: ours is the 413 below
                await send(msg)

        try:
            if scope["path"] == "/v1/predict" and scope["method"] == "POST":
                chunks = []
                while True:
                    msg = await limited()
                    if msg["type"] == "http.disconnect":
                        return
                    chunks.append(msg.get("body", b""))
                    if not msg.get("more_body"):
                        break
                await _send(send, *await self.predict(b"".join(chunks)))
            else:
                await self.app(scope, limited, unless_too_large)
        except _TooLarge:
            pass
        if too_large:
            await _send(send, 413, _detail(f"request body over the limit of {self.limit} bytes"))


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

    class ReloadRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        bundle: str | None = Field(None, description="Bundle folder to load (default: the one being served)")

    control = read_control(cfg.control) if cfg.control else {}
    state: dict[str, Any] = {"predictor": predictor, "bundle": control.get("bundle", cfg.bundle),
                             "loaded": time.time(), "generation": control.get("generation", 0)}
    batcher = MicroBatcher(cfg.max_batch_rows)
    reload_lock = asyncio.Lock()

    def load_predictor(path: str) -> Predictor:
        p = Predictor(path, threads=cfg.threads, engine=cfg.engine)
        p.records.warm()
        p.logits(*p.records.encode(_example_rows(p)))  # the first (slow) call happens before any request
        return p

    async def reload(path: str, generation: int | None = None) -> Predictor:
        """Load ``path`` and swap it in; in-flight jobs keep the predictor they were encoded for. With several
        workers, a reload asked of this one (generation None) is published in the control file for the others."""
        async with reload_lock:
            p = await asyncio.get_running_loop().run_in_executor(None, load_predictor, path)
            if generation is None:  # a new generation above every one published (another worker may be ahead)
                published = read_control(cfg.control).get("generation", 0) if cfg.control else 0
                gen = max(state["generation"], published) + 1
            else:
                gen = generation
            if cfg.control and generation is None:  # published first: if that fails, nothing has switched
                write_control(cfg.control, path, gen)
            state.update(predictor=p, bundle=path, loaded=time.time(), generation=gen)
            log.info("serving %s (%s)", path, p.model_info["version"])
            return p

    async def follow_control() -> None:
        """Other workers' reloads: poll the control file (a stat every half second)."""
        seen = None
        while True:
            await asyncio.sleep(0.5)
            with contextlib.suppress(OSError):
                mtime = os.stat(cfg.control).st_mtime_ns
                if mtime != seen:
                    seen = mtime
                    c = read_control(cfg.control)
                    if c.get("generation", 0) > state["generation"]:
                        await _safe_reload(c["bundle"], c["generation"])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        if state["predictor"] is None:
            state["predictor"] = await asyncio.get_running_loop().run_in_executor(None, load_predictor,
                                                                                  state["bundle"])
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

    async def _safe_reload(path: str, generation: int | None = None) -> None:
        try:
            await reload(path, generation)
        except Exception as exc:  # whatever the bundle holds, keep serving (and following)
            log.error("reload failed, still serving the previous bundle: %s", exc)

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
        return 200, json.dumps({"probabilities": p.tolist(), "model": pred.model_info}, separators=(",", ":")).encode()

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

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        pred: Predictor = state["predictor"]
        return {"status": "ok", "model": pred.model_info, "bundle": str(state["bundle"]),
                "generation": state["generation"], "pid": os.getpid(), "batches": batcher.batches,
                "rows": batcher.rows}

    @app.get("/v1/metadata")
    async def metadata() -> dict[str, Any]:
        pred: Predictor = state["predictor"]
        b = pred.bundle
        return {"model": pred.model_info, "bundle": str(state["bundle"]), "loaded": state["loaded"],
                "format": b.manifest.get("format"), "format_version": b.manifest.get("format_version"),
                "deepfm_version": b.manifest.get("deepfm_version"), "created": b.manifest.get("created"),
                "model_kind": b.model.cfg.model, "config": b.model.cfg.to_dict(),
                "schema": pred.pre.schema.to_dict(), "inputs": sorted({f.source for f in pred.pre.schema.fields}),
                "metrics": _finite(b.metrics), "limits": {"max_rows": cfg.max_rows,
                                                          "max_body_bytes": cfg.max_body_bytes}}

    @app.post("/admin/reload", responses={400: {"description": "Body unreadable (not UTF-8, nested too deeply)"},
                                          401: {"description": "Bad token"}, 404: {"description": "Disabled"},
                                          413: {"description": "Body too large"}})
    async def admin_reload(body: ReloadRequest | None = Body(None),
                           authorization: str | None = Header(None)) -> dict[str, Any]:
        if not cfg.admin_token:
            raise HTTPException(404, "Not Found")
        import hmac

        # as bytes: compare_digest rejects non-ASCII str, and a header holds any latin-1 text
        want = f"Bearer {cfg.admin_token}".encode("utf-8", "surrogateescape")
        if not authorization or not hmac.compare_digest(authorization.encode("latin-1"), want):
            raise HTTPException(401, "missing or wrong bearer token")
        path = (body.bundle if body and body.bundle else None) or state["bundle"]
        if not path.isprintable() or not _is_dir(path):  # no NUL, control or lone surrogate characters
            raise HTTPException(422, _bundle_error(f"{path!r}: no such bundle folder"))
        try:
            p = await reload(path)
        except Exception as e:  # a malformed or unreadable folder must not break the server
            raise HTTPException(422, _bundle_error(f"reload failed, still serving the previous bundle: {e}")) from None
        return {"status": "reloaded", "model": p.model_info, "bundle": path}

    return _Front(app, cfg.max_body_bytes, handle_predict)


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

    common = dict(host=host, port=port, log_level=log_level, access_log=False, timeout_keep_alive=5,
                  timeout_graceful_shutdown=10)
    if workers > 1:
        import tempfile

        control_dir = Path(tempfile.mkdtemp(prefix="deepfm-serve-"))
        control = control_dir / "control.json"
        write_control(str(control), cfg.bundle, 0)
        cfg = ServeConfig(**{**cfg.__dict__, "control": str(control)})
        os.environ.update(cfg.to_env())
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # read when a worker starts
            os.environ.setdefault(var, str(max(1, cfg.threads)))
        try:
            uvicorn.run("deepfm.serve.server:app_from_env", factory=True, workers=workers, **common)
        finally:
            shutil.rmtree(control_dir, ignore_errors=True)
    else:
        uvicorn.run(create_app(cfg), **common)
