"""``deepfm serve``: the HTTP server (deepfm.serve.server) with its limits as options."""

from __future__ import annotations

from pathlib import Path

import click

from deepfm.commands._options import FiniteFloat, device_option, friendly
from deepfm.errors import DeepFMError


@click.command("serve")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; 127.0.0.1 serves this machine only (use 0.0.0.0 to expose it).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="TCP port, 1-65535 (0, an ephemeral port, is refused: clients could not know it).")
@click.option("--workers", type=int, default=0,
              help="Server processes, each with the model (default: one per available core, at most 4).")
@click.option("--threads", type=int, default=0, help="Intra-op threads per worker (default: cores / workers).")
@click.option("--engine", type=click.Choice(["torch", "onnxruntime", "int8", "bf16", "auto"]), default="torch",
              show_default=True, help="int8/bf16: the MLP's hidden GEMMs quantised for batches above 256 rows, "
              "parity against fp32 checked (and logged) at load on 10k random encoded rows; auto: int8 or bf16 "
              "where parity holds and it is faster here, else torch.")
@device_option(default="auto")
@click.option("--max-rows", type=int, default=1000, show_default=True, help="Rows per request (more: 422).")
@click.option("--max-body-mb", type=float, default=4.0, show_default=True, help="Request body limit (more: 413).")
@click.option("--timeout", "timeout_s", type=float, default=10.0, show_default=True,
              help="Seconds a request may wait and compute before a 503.")
@click.option("--admin-token", envvar="DEEPFM_ADMIN_TOKEN",
              help="Enables POST /admin/reload with 'Authorization: Bearer TOKEN' (default: $DEEPFM_ADMIN_TOKEN; "
                   "off when unset). Prefer $DEEPFM_ADMIN_TOKEN or --admin-token-file: a command line is "
                   "visible to every local user (/proc/PID/cmdline). SIGHUP also reloads the bundle.")
@click.option("--admin-token-file", type=click.Path(exists=True, dir_okay=False),
              help="Read the admin token from this file (its first line), e.g. one only you can read.")
@click.option("--strict-fields", is_flag=True,
              help="A row key the model does not read is a 422 (default: ignored, and listed in the answer's "
                   "unknown_fields).")
@click.option("--header-timeout", "header_timeout_s", type=FiniteFloat(min=0, min_open=True), default=10.0,
              show_default=True, help="Seconds for a request line and headers to arrive (from the connection or "
              "the request's first byte), else 408 and closed: a client trickling bytes cannot hold a connection.")
@click.option("--body-timeout", "body_timeout_s", type=FiniteFloat(min=0, min_open=True), default=30.0,
              show_default=True, help="Seconds for the whole body to arrive after the headers, else 408 and closed.")
@click.option("--keep-alive", "keep_alive_s", type=FiniteFloat(min=0, min_open=True), default=5.0,
              show_default=True, help="Seconds an idle connection stays open between requests.")
@click.option("--max-header-kb", type=click.IntRange(min=1), default=64, show_default=True,
              help="Request line and headers, in all (more: 431).")
@click.option("--max-connections", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Open connections per worker (more: 503 and closed).")
@click.option("--reload-timeout", "reload_timeout_s", type=FiniteFloat(min=0, min_open=True), default=120.0,
              show_default=True, help="Seconds a reload may take to load a bundle, and (several workers) for "
              "every worker to follow it; else it fails and every worker keeps (or goes back to) the old one.")
@click.option("--log-level", default="info", show_default=True)
@friendly
def serve_command(bundle, host, port, workers, threads, engine, max_rows, max_body_mb, timeout_s, admin_token,
          admin_token_file, strict_fields, header_timeout_s, body_timeout_s, keep_alive_s, max_header_kb,
          max_connections, reload_timeout_s, log_level, device="auto") -> None:
    """Serve a bundle over HTTP: POST /v1/predict with raw feature values, get probabilities.

    \b
    Example:
      deepfm serve runs/criteo --port 8000
      curl -s localhost:8000/v1/predict -H 'content-type: application/json' \\
           -d '{"rows": [{"I1": 3, "C1": "68fd1e64", "C2": "80e26c9b"}]}'
    Endpoints: /v1/predict, /healthz, /v1/metadata, /docs (OpenAPI), /admin/reload (with --admin-token).
    A key left out of a row is a missing value; keys the model does not read are listed in the answer.
    With several workers, /admin/reload (and SIGHUP) reach every worker; /healthz names each one's version.
    """
    from deepfm.serve.bundle import load
    from deepfm.serve.server import ServeConfig
    from deepfm.serve.server import serve as run_server
    from deepfm.train.trainer import available_cores

    if workers < 0 or threads < 0 or max_rows < 1 or max_body_mb <= 0 or timeout_s <= 0:
        raise DeepFMError("--workers, --threads, --max-rows, --max-body-mb and --timeout must be positive")
    workers = workers or min(4, available_cores())
    threads = threads or max(1, available_cores() // workers)
    if admin_token_file:
        if admin_token:
            raise DeepFMError("give the admin token once: --admin-token (or $DEEPFM_ADMIN_TOKEN) or "
                              "--admin-token-file")
        try:
            admin_token = Path(admin_token_file).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, UnicodeDecodeError, IndexError) as e:
            raise DeepFMError(f"{admin_token_file}: cannot read an admin token from it ({e or 'empty'})") from None
        if not admin_token:
            raise DeepFMError(f"{admin_token_file}: the first line (the admin token) is empty")
    load(bundle)  # fail here, with a clear message, rather than in every worker
    from deepfm.device import resolve_device

    # resolved here, once (a clear error without CUDA); onnxruntime runs on the CPU
    device = ("cpu" if engine in ("onnxruntime", "int8", "bf16", "auto") and device == "auto"
              else str(resolve_device(device)))
    cfg = ServeConfig(bundle=str(Path(bundle).resolve()), max_rows=max_rows,
                      max_body_bytes=int(max_body_mb * (1 << 20)), timeout_s=timeout_s,
                      admin_token=admin_token, threads=threads, engine=engine, strict_fields=strict_fields,
                      header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s, keep_alive_s=keep_alive_s,
                      max_header_bytes=max_header_kb << 10, max_connections=max_connections,
                      reload_timeout_s=reload_timeout_s, device=device)
    click.echo(f"serving {bundle} on http://{host}:{port} ({workers} worker(s), engine {engine}, device {device}); "
               f"admin reload {'on' if admin_token else 'off'}", err=True)
    run_server(cfg, host=host, port=port, workers=workers, log_level=log_level)
