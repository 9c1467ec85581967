"""Loading a tampered or hostile bundle: every case is one clear BundleError (one `error:` line, exit 2 at
the CLI), decided before anything big is allocated, and the loader opens only regular files inside the
bundle folder (issue 14, items 7, 8, 9 and 13)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepfm.cli import main
from deepfm.errors import BundleError, DeepFMError
from deepfm.serve import bundle as B

SCHEMA = """label: y
fields:
  - {name: n1, kind: numeric, transform: standardize}
  - {name: n2, kind: numeric, transform: log}
  - {name: c1, kind: categorical}
  - {name: c2, kind: categorical, hash_buckets: 50}
  - {name: m1, kind: multi, sep: "|", max_len: 3}
"""


def _csv(path: Path, rows: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    c1 = rng.integers(0, 20, rows)
    y = (rng.random(rows) < 0.2 + 0.6 * (c1 < 5)).astype(int)
    lines = ["y,n1,n2,c1,c2,m1"]
    for i in range(rows):
        tags = "|".join(f"t{t}" for t in rng.integers(0, 6, rng.integers(1, 4)))
        lines.append(f"{y[i]},{rng.normal():.3f},{rng.integers(0, 100)},a{c1[i]},h{rng.integers(0, 300)},{tags}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("safety_data")
    (d / "schema.yaml").write_text(SCHEMA)
    return {"schema": d / "schema.yaml", "train": _csv(d / "train.csv", 1500, 1),
            "valid": _csv(d / "valid.csv", 300, 2)}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety_bundle") / "bundle"
    r = CliRunner().invoke(main, ["train", "--format", "csv", "--schema", str(data["schema"]),
                                  "--train", str(data["train"]), "--valid", str(data["valid"]), "--out", str(out),
                                  "--epochs", "1", "--batch-size", "256", "--quiet", "--seed", "1",
                                  "--set", "model.hidden=[8]"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    B.load(out)  # the untouched bundle loads
    return out


# ----------------------------------------------------------------------------------- tampering helpers
def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def reseal(d: Path) -> None:
    """Recompute the manifest's checksums, as an attacker (or a careless hand edit) would, so that the
    loader's deeper checks are the ones that must catch the tampering."""
    man = json.loads((d / "manifest.json").read_text())
    man["files"] = {n: _sha(d / n) for n in man["files"]}
    (d / "manifest.json").write_text(json.dumps(man))


def edit_json(name: str, fn: Callable[[Any], Any], seal: bool = True) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        obj = json.loads((d / name).read_text())
        new = fn(obj)
        (d / name).write_text(json.dumps(obj if new is None else new))
        if seal and name != "manifest.json":
            reseal(d)
    return tamper


def write_bytes(name: str, data: bytes | Callable[[bytes], bytes], seal: bool = True) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        (d / name).write_bytes(data((d / name).read_bytes()) if callable(data) else data)
        if seal:
            reseal(d)
    return tamper


def split_weights(raw: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_weights(header: dict[str, Any], body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def poke_weight(key: str, value: float) -> Callable[[bytes], bytes]:
    """Set the first element of tensor ``key`` to ``value`` (a NaN or an inf)."""
    def fn(raw: bytes) -> bytes:
        header, body = split_weights(raw)
        start = header[key]["data_offsets"][0]
        return join_weights(header, body[:start] + struct.pack("<f", value) + body[start + 4:])
    return fn


def edit_header(fn: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def edit(raw: bytes) -> bytes:
        header, body = split_weights(raw)
        fn(header)
        return join_weights(header, body)
    return edit


def claim_buckets(buckets: int) -> Callable[[Path], None]:
    """preprocessor.json and model.json agree on a field of ``buckets`` hash buckets; the weights stay small."""
    def tamper(d: Path) -> None:
        pre = json.loads((d / "preprocessor.json").read_text())
        for f in pre["schema"]["fields"]:
            if f["name"] == "c2":
                f["hash_buckets"] = buckets
        (d / "preprocessor.json").write_text(json.dumps(pre))
        model = json.loads((d / "model.json").read_text())
        for f in model["fields"]:
            if f["name"] == "c2":
                f["size"] = buckets + 2
        (d / "model.json").write_text(json.dumps(model))
        reseal(d)
    return tamper


def _set(path: list[Any], value: Any) -> Callable[[Any], None]:
    def fn(obj: Any) -> None:
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    return fn


def _del(path: list[Any]) -> Callable[[Any], None]:
    def fn(obj: Any) -> None:
        for k in path[:-1]:
            obj = obj[k]
        del obj[path[-1]]
    return fn


def symlink(name: str, target: str | Callable[[Path], Path]) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        (d / name).unlink()
        os.symlink(target(d) if callable(target) else target, d / name)
    return tamper


def fifo(name: str) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        (d / name).unlink()
        os.mkfifo(d / name)
    return tamper


def sparse(name: str, size: int) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        with open(d / name, "r+b") as fh:  # a large file that costs no disk
            fh.truncate(size)
    return tamper


def _c1_vocab_deleted(pre: dict[str, Any]) -> None:
    del pre["states"]["c1"]["vocab"]


# name -> (tampering, what the message must say)
CORPUS: dict[str, tuple[Callable[[Path], None], str]] = {
    # the manifest (item 13) and its checksums (item 7)
    "manifest_a_list": (edit_json("manifest.json", lambda m: [m]), "manifest.json.*JSON object"),
    "manifest_not_utf8": (write_bytes("manifest.json", b'{"format": "\xff\xfe"}', seal=False), "not UTF-8"),
    "manifest_not_json": (write_bytes("manifest.json", b"{", seal=False), "manifest.json.*not valid JSON"),
    "manifest_too_deep": (write_bytes("manifest.json", b"[" * 100000, seal=False), "manifest.json"),
    "files_an_int": (edit_json("manifest.json", _set(["files"], 5)), "'files' must be"),
    "files_empty": (edit_json("manifest.json", _set(["files"], {})),
                    "no checksum for model.safetensors, model.json, preprocessor.json, training.json, metrics.json"),
    "files_missing_weights": (edit_json("manifest.json", _del(["files", "model.safetensors"])),
                              "no checksum for model.safetensors"),
    "files_missing_metrics": (edit_json("manifest.json", _del(["files", "metrics.json"])),
                              "no checksum for metrics.json"),
    "files_no_key": (edit_json("manifest.json", _del(["files"])), "no checksum for"),
    "digest_not_hex": (edit_json("manifest.json", _set(["files", "model.json"], 5)), "model.json.*SHA-256"),
    "files_path_outside": (edit_json("manifest.json", _set(["files", "../x.json"], "0" * 64)),
                           "not a file name in the bundle"),
    "format_version_a_list": (edit_json("manifest.json", _set(["format_version"], [1])), "format version"),
    "manifest_no_created": (edit_json("manifest.json", _del(["created"])), "manifest.json: 'created' must be"),
    "manifest_model_a_list": (edit_json("manifest.json", _set(["model"], [])), "manifest.json: 'model' must be"),
    # model.json (item 13)
    "model_no_fields": (edit_json("model.json", _del(["fields"])), "model.json.*fields"),
    "model_no_config": (edit_json("model.json", _del(["config"])), "model.json.*config"),
    "model_a_list": (edit_json("model.json", lambda m: [m]), "model.json.*JSON object"),
    "embed_dim_negative": (edit_json("model.json", _set(["config", "embed_dim"], -1)), "embed_dim"),
    "embed_dim_string": (edit_json("model.json", _set(["config", "embed_dim"], "ten")), "embed_dim"),
    "hidden_banana": (edit_json("model.json", _set(["config", "hidden"], "banana")), "hidden"),
    "dropout_nan": (edit_json("model.json", _set(["config", "dropout"], float("nan"))), "dropout"),
    "unknown_model": (edit_json("model.json", _set(["config", "model"], "gpt")), "model.*gpt"),
    "unknown_option": (edit_json("model.json", _set(["config", "colour"], 1)), "colour"),
    "field_size_zero": (edit_json("model.json", _set(["fields", 0, "size"], 0)), "size"),
    "field_not_a_mapping": (edit_json("model.json", _set(["fields", 0], 7)), r"fields\[0\]"),
    "field_unknown_key": (edit_json("model.json", _set(["fields", 0, "x"], 1)), r"fields\[0\]"),
    "model_not_utf8": (write_bytes("model.json", lambda b: b.replace(b'"config"', b'"c\xffnfig"', 1)),
                       "model.json.*not UTF-8"),
    # preprocessor.json (item 13)
    "vocabulary_missing": (edit_json("preprocessor.json", _c1_vocab_deleted), "c1.*vocabulary"),
    "state_missing": (edit_json("preprocessor.json", _del(["states", "c1"])), "c1"),
    "vocabulary_not_strings": (edit_json("preprocessor.json", _set(["states", "c1", "vocab"], [1, 2])),
                               "c1.*vocabulary"),
    "std_missing": (edit_json("preprocessor.json", _del(["states", "n1", "std"])), "n1.*std"),
    "std_zero": (edit_json("preprocessor.json", _set(["states", "n1", "std"], 0)), "n1.*std"),
    "schema_missing": (edit_json("preprocessor.json", _del(["schema"])), "preprocessor.json.*schema"),
    "preprocessor_a_string": (edit_json("preprocessor.json", lambda p: "x"), "preprocessor.json.*JSON object"),
    "fields_disagree": (edit_json("model.json", _set(["fields", 0, "name"], "zz")), "do not match"),
    "metrics_a_list": (edit_json("metrics.json", lambda m: [m]), "metrics.json"),
    "metrics_split_no_auc": (edit_json("metrics.json", _set(["valid"], {"rows": 3})), "metrics.json.*auc"),
    "training_a_number": (edit_json("training.json", lambda t: 3), "training.json"),
    # the weights: header, truncation, dtype, non-finite values (items 7, 9, 13)
    "header_length_huge": (write_bytes("model.safetensors", lambda b: struct.pack("<Q", 1 << 62) + b[8:]),
                           "header"),
    "header_not_json": (write_bytes("model.safetensors", lambda b: b[:8] + b"{" * 4 + b[12:]), "header"),
    "header_a_list": (write_bytes("model.safetensors", lambda b: join_weights([], b"")), "header"),  # type: ignore[arg-type]
    "file_too_short": (write_bytes("model.safetensors", b"\x01\x00"), "too short"),
    "weights_truncated": (write_bytes("model.safetensors", lambda b: b[:-100]), "truncated"),
    "weights_appended": (write_bytes("model.safetensors", lambda b: b + b"\0" * 64), "model.safetensors"),
    "offsets_overlap": (write_bytes("model.safetensors", edit_header(
        lambda h: h["bias"].__setitem__("data_offsets", [4, 8]))), "model.safetensors"),
    "shape_negative": (write_bytes("model.safetensors", edit_header(
        lambda h: h["bias"].__setitem__("shape", [-1]))), "bias"),
    "dtype_f16": (write_bytes("model.safetensors", edit_header(
        lambda h: h["bias"].update(dtype="F16", shape=[2]))), "bias.*F16"),
    "dtype_unknown": (write_bytes("model.safetensors", edit_header(
        lambda h: h["bias"].update(dtype="Q7"))), "bias.*Q7"),
    "tensor_missing": (write_bytes("model.safetensors", edit_header(lambda h: h.pop("bias"))), "model.safetensors"),
    "nan_weight": (write_bytes("model.safetensors", poke_weight("v.weight", float("nan"))), "v.weight.*non-finite"),
    "inf_bias": (write_bytes("model.safetensors", poke_weight("bias", float("inf"))), "bias.*non-finite"),
    "buckets_3e7": (claim_buckets(30_000_000), "30,000,036 table rows.*'c2' with 30,000,002.*w.weight"),
    "hidden_huge": (edit_json("model.json", _set(["config", "hidden"], [1 << 40])), "model.safetensors"),
    "embed_dim_huge": (edit_json("model.json", _set(["config", "embed_dim"], 1 << 30)), "v.weight"),
    # special files and files outside the bundle (item 8)
    "metrics_symlink_dev_zero": (symlink("metrics.json", "/dev/zero"), "metrics.json.*symbolic link"),
    "metrics_symlink_other_json": (symlink("metrics.json", lambda d: d / "training.json"), "symbolic link"),
    "weights_symlink_dev_zero": (symlink("model.safetensors", "/dev/zero"), "symbolic link"),
    "manifest_symlink": (symlink("manifest.json", lambda d: d.parent / "elsewhere.json"), "symbolic link"),
    "model_fifo": (fifo("model.json"), "model.json.*not a regular file"),
    "weights_fifo": (fifo("model.safetensors"), "not a regular file"),
    "model_a_folder": (lambda d: ((d / "model.json").unlink(), (d / "model.json").mkdir()), "not a regular file"),
    "model_missing": (lambda d: (d / "model.json").unlink(), "missing file model.json"),
    "manifest_huge": (sparse("manifest.json", 64 << 20), "manifest.json.*limit"),
    "model_json_huge": (sparse("model.json", 1 << 30), "model.json.*limit"),
}


def tampered(trained: Path, tmp_path: Path, name: str) -> Path:
    d = tmp_path / "bundle"  # not the case's name: the message is matched, and it names the folder
    shutil.copytree(trained, d)
    (d.parent / "elsewhere.json").write_text("{}")
    CORPUS[name][0](d)
    return d


def bounded(fn: Callable[[], Any], what: str, seconds: float = 20.0) -> Any:
    """Run ``fn`` in a thread: a loader that blocks (a FIFO, /dev/zero) fails the test instead of hanging it.
    -> what ``fn`` returned or raised."""
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"{what} did not finish within {seconds} s"
    return out[0]


def load_with_timeout(d: Path) -> BaseException | None:
    return bounded(lambda: B.load(d) and None, f"loading {d.name}")


@pytest.fixture
def no_model_build(monkeypatch):
    """A size claim must be refused before the model (and its tables) are allocated."""
    def refuse(*args, **kwargs):
        raise AssertionError("build_model called: the claim was not checked against the weights first")
    monkeypatch.setattr(B, "build_model", refuse)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_tampered_bundle_is_one_clear_bundle_error(trained, tmp_path, name, no_model_build):
    d = tampered(trained, tmp_path, name)
    t0 = time.perf_counter()
    err = load_with_timeout(d)
    assert isinstance(err, BundleError), f"{name}: {type(err).__name__}: {err}"
    assert time.perf_counter() - t0 < 10
    msg = str(err)
    assert "\n" not in msg and len(msg) < 600, msg
    import re

    assert re.search(CORPUS[name][1], msg, re.S), f"{name}: {msg!r} does not match {CORPUS[name][1]!r}"


@pytest.mark.parametrize("name", ["files_an_int", "manifest_no_created", "embed_dim_negative", "vocabulary_missing",
                                  "header_not_json", "nan_weight", "metrics_symlink_dev_zero", "buckets_3e7",
                                  "model_fifo"])
@pytest.mark.parametrize("command", ["info", "predict", "evaluate"])
def test_cli_says_one_error_line_exit_2(trained, data, tmp_path, name, command):
    d = tampered(trained, tmp_path, name)
    args = {"info": ["info", str(d)],
            "predict": ["predict", str(d), str(data["valid"]), "--out", str(tmp_path / "p.csv")],
            "evaluate": ["evaluate", str(d), str(data["valid"])]}[command]
    r = bounded(lambda: CliRunner().invoke(main, args, catch_exceptions=False), f"deepfm {command}")
    assert not isinstance(r, BaseException), repr(r)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert not (tmp_path / "p.csv").exists()


def test_nan_weights_no_longer_predict_nan(trained, data, tmp_path):
    d = tampered(trained, tmp_path, "nan_weight")
    r = CliRunner().invoke(main, ["predict", str(d), str(data["valid"]), "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 2 and "v.weight" in r.output and "non-finite" in r.output, r.output


def test_unlisted_files_are_not_read_and_good_bundle_loads(trained, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(trained, d)
    (d / "metrics.jsonl").unlink()
    os.symlink("/dev/zero", d / "metrics.jsonl")  # not part of the checksummed format: never opened
    os.mkfifo(d / "notes.fifo")
    b = B.load(d)
    assert b.metrics["valid"]["rows"] == 300 and b.training["best_epoch"] is not None


def test_bundle_folder_itself_may_be_a_symlink(trained, tmp_path):
    os.symlink(trained, tmp_path / "link")
    assert B.load(tmp_path / "link").path == tmp_path / "link"


def test_metadata_serves_metrics_read_by_the_safe_loader(trained, tmp_path):
    """GET /v1/metadata answers from Bundle.metrics, which load read through the regular-file reader, so a
    metrics.json symlinked to another file cannot be served (the loader refuses the bundle)."""
    import inspect

    from deepfm.serve import server

    src = inspect.getsource(server)
    assert "metrics.json" not in src  # the server opens no bundle file of its own
    d = tampered(trained, tmp_path, "metrics_symlink_other_json")
    with pytest.raises(BundleError, match="symbolic link"):
        B.load(d)


# ------------------------------------------------------------------------------------------------- fuzz
def _mutate(raw: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(raw)
    for pos, byte in edits:
        if buf:
            buf[pos % len(buf)] = byte
    return bytes(buf[:cut] if cut is not None else buf)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=6)


@pytest.fixture(scope="module")
def fuzz_dir(trained, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz") / "b"
    shutil.copytree(trained, d)
    return d


def _fuzz_load(trained: Path, d: Path, name: str, data: bytes, seal: bool) -> None:
    for n in ("manifest.json", "model.json", "preprocessor.json", "model.safetensors"):
        shutil.copyfile(trained / n, d / n)
    (d / name).write_bytes(data)
    if seal and name != "manifest.json":
        reseal(d)
    try:
        B.load(d)
    except DeepFMError:
        pass  # a project error is what a damaged bundle must give; anything else fails the test


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["manifest.json", "model.json", "preprocessor.json"]), edits=EDITS,
       cut=st.none() | st.integers(0, 4000))
def test_fuzz_json_files_raise_only_project_errors(trained, fuzz_dir, name, edits, cut):
    raw = (trained / name).read_bytes()
    _fuzz_load(trained, fuzz_dir, name, _mutate(raw, edits, cut), seal=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), min_size=1, max_size=4),
       tail=st.booleans())
def test_fuzz_weights_header_raises_only_project_errors(trained, fuzz_dir, edits, tail):
    raw = (trained / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head = _mutate(raw[:8 + n], edits, None)
    _fuzz_load(trained, fuzz_dir, "model.safetensors", head + (raw[8 + n:-4] if tail else raw[8 + n:]), seal=True)
