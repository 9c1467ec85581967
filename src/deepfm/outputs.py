"""Safe outputs: every file or folder deepfm writes goes through here.

* Write under a unique temporary name in the target's folder (``tempfile``), then publish it with one
  rename: a crash, a kill or a full disk never leaves a half-written output, and two writers never share a
  temporary file.
* Lock an output while it is written (``fcntl.flock`` on a ``.NAME.lock`` sibling, non-blocking): a second
  deepfm process writing the same output gets a clear error naming the first one's pid.
* Replace a folder only when it is a deepfm artifact that says so (a bundle's manifest, or the marker
  file ``.deepfm-output.json`` that training, compare and tune folders carry), otherwise refuse and name
  ``--force``; never replace a folder or file that holds an input of the run, even with ``--force``.
* Follow the umask: temporary files and folders from ``tempfile`` are 0600/0700, and are given the modes an
  ordinary ``open``/``mkdir`` would (0644/0755 under umask 022) before they are published.
* Map write failures (``OSError``, and safetensors' own ``SafetensorError``) to one clear error, disk full
  above all; turn SIGTERM into ``SystemExit(143)`` so that ``finally`` blocks drop partial writes.

Standard library only (imported by the CLI before anything heavy).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from deepfm.errors import DeepFMError

MARKER = ".deepfm-output.json"  # written into folders deepfm creates (training run, compare, tune)
BUNDLE_FORMAT = "deepfm-bundle"


# ------------------------------------------------------------------------------------------- modes
def umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask is a set-and-return)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path, is_dir: bool | None = None) -> None:
    """Give ``path`` the mode a plain open()/mkdir() would have (tempfile makes 0600/0700)."""
    is_dir = path.is_dir() if is_dir is None else is_dir
    os.chmod(path, (0o777 if is_dir else 0o666) & ~umask())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


# ------------------------------------------------------------------------------------------- temp + publish
def temp_dir(target: Path) -> Path:
    """A new, unique, empty folder beside ``target`` (same file system: the publishing rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    follow_umask(tmp, is_dir=True)
    return tmp


def publish_dir(tmp: Path, target: Path) -> None:
    """Rename the finished folder ``tmp`` to ``target``; an existing ``target`` (checked by the caller with
    :func:`check_dir_out`) is moved to a unique sibling first and deleted after."""
    old = None
    with _signals_deferred():  # a SIGTERM between the two renames would leave no folder at target
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old)  # rename over the empty placeholder folder
        os.replace(tmp, target)
    if old is not None:
        if old.is_symlink() or not old.is_dir():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT back for a few system calls that must not be cut in two (delivered right after)."""
    sigs = {signal.SIGTERM, signal.SIGINT}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def atomic_file(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a unique temporary path beside ``target``; when the block ends without error, the file is
    fsynced and renamed to ``target``, otherwise removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        follow_umask(tmp, is_dir=False)
        _fsync_file(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(target: str | Path, text: str) -> None:
    """Write a small text file atomically (unique temporary name, then rename)."""
    with atomic_file(target) as tmp:
        tmp.write_text(text)


# ------------------------------------------------------------------------------------------- locks
_held: dict[str, list[Any]] = {}  # lock path -> [fd, depth]: re-entrant within this process
_held_guard = threading.Lock()


def lock_path(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def locked(path: str | Path, flag: str = "--out") -> Iterator[None]:
    """Hold the exclusive write lock of output ``path`` (a file or folder) for the block. Non-blocking: when
    another process holds it, a DeepFMError names it. Re-entrant within a process. The lock file is a sibling
    (it survives the publishing rename) and is removed on release."""
    lp = lock_path(Path(path))
    key = str(lp)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            reentered = True
        else:
            reentered = False
    if not reentered:
        fd = _acquire(lp, Path(path), flag)
        with _held_guard:
            _held[key] = [fd, 1]
    try:
        yield
    finally:
        with _held_guard:
            entry = _held[key]
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _held[key]
        if last:
            with contextlib.suppress(OSError):
                os.unlink(lp)  # while still locked: a waiter that opened it re-checks the inode and retries
            os.close(entry[0])


def _acquire(lp: Path, path: Path, flag: str) -> int:
    while True:
        try:
            lp.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise write_error(e, "the lock file", lp) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            except OSError:
                pid = "unknown"
            os.close(fd)
            raise DeepFMError(f"{path} is being written by another deepfm process (pid {pid}); wait for it to "
                              f"finish, or choose another {flag}") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(lp).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the holder released and removed it between our open and flock: take the new one


# ------------------------------------------------------------------------------------------- what may be replaced
def _read_json(path: Path, limit: int = 1 << 20) -> Any:
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > limit:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def artifact_kind(path: Path) -> str | None:
    """What deepfm artifact folder ``path`` says it is: "bundle", "train-run" (a training run in progress:
    checkpoints), "compare", "tune"; None for anything else."""
    man = _read_json(path / "manifest.json")
    if isinstance(man, dict) and man.get("format") == BUNDLE_FORMAT:
        return "bundle"
    mark = _read_json(path / MARKER)
    if isinstance(mark, dict) and isinstance(mark.get("kind"), str):
        return mark["kind"]
    # folders of deepfm versions before the marker
    try:
        names = {c.name for c in path.iterdir()}
        if names == {"checkpoints"} and all(c.name.startswith(("step-", ".tmp-"))
                                            for c in (path / "checkpoints").iterdir()):
            return "train-run"
    except OSError:
        return None
    if (path / "study.db").is_file() and isinstance(_read_json(path / "study.json"), dict):
        return "tune"
    if (path / "runs").is_dir() and isinstance(_read_json(path / "data.json"), dict):
        return "compare"
    return None


def mark(path: Path, kind: str) -> None:
    """Write the marker that lets a later run recognise (and replace or resume) this folder."""
    from deepfm import __version__

    write_text(path / MARKER, json.dumps({"kind": kind, "deepfm_version": __version__}))


def holds(out: Path, inp: Path) -> bool:
    """Whether ``inp`` is ``out`` or lies inside folder ``out``."""
    try:
        out, inp = out.resolve(), inp.resolve()
    except OSError:
        return False
    return inp == out or out in inp.parents


def _check_inputs(path: Path, inputs: Iterable[str | Path | None], flag: str) -> None:
    for inp in inputs:
        if inp is not None and holds(path, Path(inp)):
            raise DeepFMError(f"{flag} {path} holds an input of this run ({inp}): refusing to replace it, even "
                              f"with --force; choose another {flag}")


_DESCRIBE = {"bundle": "model bundle", "train-run": "training output", "compare": "compare output",
             "tune": "tune output"}


def check_dir_out(path: str | Path, kinds: Iterable[str], force: bool = False,
                  inputs: Iterable[str | Path | None] = (), flag: str = "--out") -> bool:
    """May output folder ``path`` be written (replaced, or written into)? Absent, empty, or a deepfm artifact
    of one of ``kinds``: yes. Anything else: a DeepFMError naming the folder and --force (with ``force``:
    yes). A folder holding an input is refused even with ``force``. Returns whether it exists."""
    p = Path(path)
    _check_inputs(p, inputs, flag)
    if not p.exists() and not p.is_symlink():
        return False
    if not p.is_dir() or p.is_symlink():
        raise DeepFMError(f"{flag} {p} exists and is not a folder; choose another {flag}")
    kinds = tuple(kinds)
    if force or artifact_kind(p) in kinds or not any(p.iterdir()):
        return True
    what = " or ".join(_DESCRIBE.get(k, k) for k in kinds)
    raise DeepFMError(f"{flag} {p} exists and is not a deepfm {what}: refusing to replace it or write into it "
                      f"(it may hold your files); choose another {flag}, or pass --force to replace it")


def check_file_out(path: str | Path, ours: Callable[[Path], bool], what: str, force: bool = False,
                   inputs: Iterable[str | Path | None] = (), flag: str = "--out") -> None:
    """May output file ``path`` be written? Absent, or ``ours(path)`` (it carries deepfm's marker): yes; a
    folder: no; any other file: no unless ``force``; an input of the run: never."""
    p = Path(path)
    _check_inputs(p, inputs, flag)
    if p.is_dir():
        raise DeepFMError(f"{flag} {p} is a folder; pass a file name (e.g. {p / ('out' + p.suffix)})")
    if not p.exists() and not p.is_symlink():
        return
    if p.is_symlink() or not p.is_file():
        raise DeepFMError(f"{flag} {p} exists and is not a regular file; choose another {flag}")
    if force:
        return
    try:
        mine = ours(p)
    except Exception:  # an unreadable or foreign file is simply not ours
        mine = False
    if not mine:
        raise DeepFMError(f"{flag} {p} exists and is not a deepfm {what}: refusing to overwrite it; choose another "
                          f"{flag}, or pass --force to replace it")


# ------------------------------------------------------------------------------------------- write errors
try:  # safetensors raises its own error type for I/O failures (disk full included), not OSError
    from safetensors import SafetensorError
except ImportError:  # pragma: no cover - a dependency of deepfm
    class SafetensorError(Exception):  # type: ignore[no-redef]
        pass

WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, SafetensorError)


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(s in text for s in ("No space left", "StorageFull", "QuotaExceeded", "Disk quota",
                                   "code: 28,", "code: 122,"))


def write_error(e: BaseException, what: str, where: str | Path, hint: str = "") -> DeepFMError:
    """One clear error for a failed write of ``what`` to ``where``."""
    if is_disk_full(e):
        return DeepFMError(f"disk full while writing {what} to {where}; free space (or write elsewhere)"
                           + (f" {hint}" if hint else ""))
    return DeepFMError(f"could not write {what} to {where}: {e}")


# ------------------------------------------------------------------------------------------- signals
class Terminated(SystemExit):
    """Raised in the main thread by SIGTERM: unwinds through ``finally``/``except BaseException`` (which drop
    partial writes) and exits with status 143."""


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """For the block: SIGTERM raises Terminated(143), SIGINT KeyboardInterrupt (exit 130 at the CLI). A
    second signal while the first one unwinds is ignored, so that the clean-up itself is not cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if fired:
            return
        fired.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(128 + signum)

    prev = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in prev.items():
            signal.signal(s, h)


def interruptible(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for the commands that write outputs: see :func:`exit_on_signals`."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with exit_on_signals():
            return fn(*args, **kwargs)

    return wrapper
