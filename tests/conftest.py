from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("DEEPFM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DEEPFM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """~6k-row Criteo-format synthetic data (train/valid/test + oracle.json)."""
    from deepfm.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, rows=6000, seed=1, vocab_scale=0.01)
    return out


def shared(name: str) -> Path:
    p = SHARED / name
    if not p.exists():
        pytest.skip(f"real data {p} not present")
    return p


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def stop_server(proc) -> None:
    """Stop a `deepfm serve` subprocess started with start_new_session=True and its workers (the whole
    process group), gracefully first."""
    import contextlib
    import os
    import signal
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def wait_healthy(healthz, proc, log: Path, timeout: float = 180) -> None:
    """Wait until ``healthz()`` returns status 200 (connection errors mean not yet), or stop the server and
    fail with the end of its log. The timeout covers two workers importing torch on a loaded 2-core box."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if healthz()[0] == 200:
                return
        except OSError:
            time.sleep(0.1)
    stop_server(proc)
    pytest.fail("server did not start: " + log.read_text()[-2000:])
