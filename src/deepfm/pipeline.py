"""Files in, bundle out: read -> split -> fit preprocessing on the training rows -> encode into the cached
store -> train -> evaluate -> save the bundle. Used by the CLI and the estimator."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from deepfm import calibration, outputs
from deepfm.accel import precision
from deepfm.calibration import PostProcess
from deepfm.config import RUNTIME_KEYS, apply_overrides, check_options, load_preset
from deepfm.data import readers
from deepfm.data import side as side_mod
from deepfm.data.preprocess import Encoded, Preprocessor
from deepfm.data.shards import ShardBatcher, ShardSet, fit_streaming, write_shards
from deepfm.data.side import SideColumns
from deepfm.data.split import time_key, time_split
from deepfm.data.store import (
    Batcher,
    FieldSpec,
    cache_key,
    default_cache_dir,
    file_identity,
    layout,
    open_store,
    save_store,
)
from deepfm.device import model_device
from deepfm.errors import DataError, DeepFMError
from deepfm.models.build import build_model
from deepfm.models.ctr import MODELS, CTRModel, ModelConfig
from deepfm.schema import Schema
from deepfm.serve import bundle as bundle_mod
from deepfm.train import distributed as dist
from deepfm.train.callbacks import Callback, closing
from deepfm.train.checkpoint import Checkpointer, disk_error, fingerprint
from deepfm.train.metrics import evaluate
from deepfm.train.trainer import TrainConfig, fit, log_to, predict_logits, seed_everything, sigmoid


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _size(path: str | Path) -> str:
    p = Path(path)
    try:
        n = sum(c.stat().st_size for c in p.iterdir() if c.is_file()) if p.is_dir() else p.stat().st_size
    except OSError:
        return "size unknown"
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n:,} bytes"


@dataclass
class Prepared:
    pre: Preprocessor
    train: Encoded | ShardSet  # in memory (memory-mapped), or shards on disk (streaming mode)
    train_rows: np.ndarray | None  # None = all rows of `train`
    valid: Encoded | ShardSet | None
    valid_rows: np.ndarray | None
    info: dict[str, Any] = field(default_factory=dict)
    test: Encoded | None = None  # a test split of the training file (--split time:COLUMN --test-fraction/--test-from)
    test_rows: np.ndarray | None = None

    @property
    def fields(self) -> list[FieldSpec]:
        return layout(self.pre)


def batcher(data: Encoded | ShardSet, fields: list[FieldSpec]) -> Batcher | ShardBatcher:
    return ShardBatcher(data, fields) if isinstance(data, ShardSet) else Batcher(data, fields)


def split_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split -> (train rows, valid rows), each sorted."""
    if not 0 < fraction < 1:
        raise DeepFMError(f"--valid-fraction must be in (0, 1), got {fraction}")
    n_valid = int(round(n * fraction))
    if n_valid < 1 or n_valid >= n:
        raise DeepFMError(f"--valid-fraction {fraction} of {n} rows leaves an empty split")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def time_column(split: str) -> str | None:
    """``--split``: "random" (None) or "time:COLUMN" (the column)."""
    if split == "random":
        return None
    kind, sep, column = split.partition(":")
    if kind != "time" or not sep or not column:
        raise DeepFMError(f"--split must be 'random' or 'time:COLUMN', got {split!r}")
    return column


def _time_rows(col: Any, column: str, valid_fraction: float, test_fraction: float, valid_from: str | None,
               test_from: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    key, cut = time_key(col, column)
    tr, va, te = time_split(key, valid_fraction, test_fraction, None if valid_from is None else cut(valid_from),
                            None if test_from is None else cut(test_from))
    log(f"time split on {column!r}: {tr.size:,} train / {va.size:,} valid / {te.size:,} test rows")
    return tr, va, te


def _report_collisions(pre: Preprocessor, info: dict[str, Any]) -> None:
    """Hashed fields: count and log the training values that share a bucket (kept in the bundle's info)."""
    stats = {f.name: pre.states[f.name] for f in pre.schema.fields
             if f.hash_buckets is not None and "collisions" in pre.states.get(f.name, {})}
    if stats:
        info["hash_collisions"] = stats
        worst = max(stats.items(), key=lambda kv: kv[1]["collisions"])
        log(f"hashed fields: {sum(s['collisions'] for s in stats.values()):,} colliding values in all; most in "
            f"{worst[0]!r}: {worst[1]['collisions']:,} of {worst[1]['distinct_values']:,} values share a bucket")


def _report_skips(res: readers.ReadResult) -> None:
    if res.skipped.count:
        log(res.skipped.summary(res.path))


def grow(parent: Preprocessor, new: Preprocessor) -> Preprocessor:
    """Warm-start preprocessing: the parent's states, with each vocabulary extended by the values of
    ``new`` (fitted on the new data, so they passed min_count there) that it lacks. Existing values keep
    their indices (and so their embedding rows); values in neither stay OOV. Numeric transforms keep the
    parent's parameters, so a value means the same to the parent's weights."""
    if [f.name for f in parent.schema.fields] != [f.name for f in new.schema.fields]:
        raise DeepFMError("--init-from: the new data's schema has other fields than the bundle's "
                          f"({[f.name for f in parent.schema.fields][:6]}...); warm start needs the same fields")
    states: dict[str, dict[str, Any]] = {}
    for f in parent.schema.fields:
        old = parent.states.get(f.name, {})
        if "_vocab_array" in old:
            known = old["_vocab_array"]
            fresh = new.states[f.name]["_vocab_array"]
            added = fresh.filter(pc.invert(pc.is_in(fresh, value_set=known)))
            states[f.name] = {**old, "_vocab_array": pa.concat_arrays([known, added.cast(known.type)])}
        else:
            states[f.name] = dict(old)
    grown = Preprocessor(parent.schema)
    grown.states = states
    return grown


def warm_start(model: CTRModel, parent: CTRModel) -> dict[str, int]:
    """Copy a parent model into ``model`` (built on grown preprocessing): each field's existing table rows,
    the bias and the whole MLP; the new rows keep their fresh initialisation. Returns rows copied/new."""
    if parent.cfg.to_dict() != model.cfg.to_dict():
        raise DeepFMError("--init-from: the model configuration differs from the bundle's")
    copied = new = 0
    with torch.no_grad():
        tables = model.tables()
        for name, dst in tables.items():
            src = getattr(parent, name)
            d_start = np.r_[0, np.cumsum(dst.sizes)[:-1]]
            s_start = np.r_[0, np.cumsum(src.sizes)[:-1]]
            for i, (n_dst, n_src) in enumerate(zip(dst.sizes, src.sizes, strict=True)):
                if n_src > n_dst:
                    raise DeepFMError("--init-from: a field has fewer rows than in the bundle")
                dst.weight[d_start[i]: d_start[i] + n_src] = src.weight[s_start[i]: s_start[i] + n_src]
                if name == "v":
                    copied, new = copied + n_src, new + n_dst - n_src
        rest = {k: v for k, v in parent.state_dict().items() if k.split(".")[0] not in tables}
        model.load_state_dict(rest, strict=False)
    return {"rows_copied": copied, "rows_new": new}


def prepare(
    train_path: str | Path,
    fmt: str,
    schema: Schema | None = None,
    valid_path: str | Path | None = None,
    valid_fraction: float = 0.1,
    seed: int = 2017,
    on_bad_rows: str = "error",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    parent: Preprocessor | None = None,
    side: SideColumns | None = None,
    split: str = "random",
    test_fraction: float = 0.0,
    valid_from: str | None = None,
    test_from: str | None = None,
) -> Prepared:
    """Fit preprocessing on the training rows only and encode train (+ valid) into cached stores.
    parent: a bundle's preprocessing to grow (warm start): its vocabularies keep their indices, values new in
    this data that pass min_count are appended (see ``grow``). side: weight / group columns read with the rows
    (``data.side``). split: "random" (``split_rows``) or "time:COLUMN" (``data.split.time_split`` with the
    fractions or the ``valid_from``/``test_from`` cut values; a test split is kept in ``Prepared.test``)."""
    schema = schema or readers.default_schema(fmt)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    side = side or SideColumns()
    time_col = time_column(split)
    if time_col is None and (valid_from is not None or test_from is not None or test_fraction):
        raise DeepFMError("--valid-from, --test-from and --test-fraction need --split time:COLUMN")
    if time_col is not None:
        if valid_path:
            raise DeepFMError("--split time:COLUMN splits --train by time; drop --valid (or use --split random)")
        side = SideColumns(side.weight, side.group, time_col)
    split_key: Any = None if valid_path else (valid_fraction, seed)
    if time_col is not None:
        split_key = ("time", time_col, valid_fraction, test_fraction, valid_from, test_from)
    schema_key = schema.to_dict() if schema else None
    key = cache_key("train", file_identity(train_path), fmt, schema_key, split_key, on_bad_rows,
                    parent.fingerprint() if parent is not None else None, *([side.to_dict()] if side else []))
    entry = cache / key
    t0 = time.perf_counter()
    if use_cache and (entry / "done").exists():
        pre = Preprocessor.from_dict(json.loads((entry / "preprocessor.json").read_text()))
        train = open_store(entry / "store")
        info = json.loads((entry / "info.json").read_text())
        train_rows = np.load(entry / "train_rows.npy") if split_key else None
        valid_rows = np.load(entry / "valid_rows.npy") if split_key else None
        test_rows = np.load(entry / "test_rows.npy") if (entry / "test_rows.npy").exists() else None
        log(f"using cached encoded data for {train_path} ({info['rows']} rows)")
    else:
        # No bar for these stages (the reader is one multi-threaded Arrow pass), but a line as each starts
        # and ends, so that a large file is not minutes of silence.
        log(f"reading {train_path} ({_size(train_path)}, --format {fmt})")
        res, side_cols = side_mod.read(train_path, fmt, schema, on_bad_rows, side)
        t_read = time.perf_counter()
        log(f"read {res.rows:,} rows in {t_read - t0:.1f} s; fitting preprocessing on the training rows and "
            "encoding")
        _report_skips(res)
        if res.label is None:
            raise DataError("training data has no label column", path=str(train_path))
        train_rows = valid_rows = test_rows = None
        fit_on = res
        if split_key:
            if time_col is not None:
                train_rows, valid_rows, test_rows = _time_rows(side_cols["time"], time_col, valid_fraction,
                                                               test_fraction, valid_from, test_from)
                test_rows = test_rows if test_rows.size else None
            else:
                train_rows, valid_rows = split_rows(res.rows, valid_fraction, seed)
            fit_on = readers.ReadResult(res.table.take(train_rows), res.label[train_rows], res.schema, res.path,
                                        res.skipped)
        pre = Preprocessor(res.schema)
        if parent is not None:
            pre = grow(parent, pre.fit(fit_on))
            enc = pre.transform(res)
        else:
            enc = pre.fit_transform(res) if fit_on is res else pre.fit(fit_on).transform(res)
        side_mod.attach(enc, side_cols, str(train_path), side)
        info = {"rows": res.rows, "skipped_rows": res.skipped.count, "read_encode_seconds":
                time.perf_counter() - t0, "path": str(train_path), "format": fmt}
        log(f"fitted and encoded in {time.perf_counter() - t_read:.1f} s")
        if use_cache:
            try:
                _write_cache_entry(entry, enc, pre, info, train_rows, valid_rows, test_rows)
            except outputs.WRITE_ERRORS as e:
                raise outputs.write_error(e, "the encoded-data cache", cache, CACHE_HINT) from None
            train = open_store(entry / "store")
        else:
            train = enc
    valid: Encoded | None = (train if split_key else
                             encode_file(valid_path, fmt, pre, on_bad_rows, cache, use_cache, side))
    if split_key is None:
        valid_rows = None
    elif valid_rows is not None and valid_rows.size == 0:  # a time split with no validation part
        valid, valid_rows = None, None
    info["vocab_rows"] = int(sum(f.size for f in layout(pre)))
    if side:
        info["side_columns"] = side.to_dict()
    _report_collisions(pre, info)
    return Prepared(pre, train, train_rows, valid, valid_rows, info,
                    train if test_rows is not None else None, test_rows)


CACHE_HINT = "and rerun, or pass --cache-dir on another disk, or --no-cache"


def _write_cache_entry(entry: Path, enc: Encoded, pre: Preprocessor, info: dict[str, Any],
                       train_rows: np.ndarray | None, valid_rows: np.ndarray | None,
                       test_rows: np.ndarray | None = None) -> None:
    """Write one cache entry under a unique temporary name, then rename it into place (two runs encoding the
    same data at once each write their own; the second rename finds the entry done and drops its copy)."""
    tmp = outputs.temp_dir(entry)
    try:
        save_store(enc, tmp / "store")
        (tmp / "preprocessor.json").write_text(json.dumps(pre.to_dict()))
        (tmp / "info.json").write_text(json.dumps(info))
        if train_rows is not None:
            np.save(tmp / "train_rows.npy", train_rows)
            np.save(tmp / "valid_rows.npy", valid_rows)
        if test_rows is not None:
            np.save(tmp / "test_rows.npy", test_rows)
        (tmp / "done").write_text("ok")
        if (entry / "done").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(entry, ignore_errors=True)  # an entry without "done": a write that was cut short
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / "done").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_streaming(
    train_path: str | Path,
    fmt: str,
    schema: Schema | None = None,
    valid_path: str | Path | None = None,
    valid_fraction: float = 0.1,
    seed: int = 2017,
    on_bad_rows: str = "error",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    shard_rows: int = 1_000_000,
    block_bytes: int = 16 << 20,
    parent: Preprocessor | None = None,
) -> Prepared:
    """Out-of-core ``prepare``: fit in one streaming pass, then encode into shards (data.shards). Memory is
    bounded by the vocabularies and a block, whatever the file size. The shards are cached like stores."""
    schema = schema or readers.default_schema(fmt)
    if schema is None:
        raise DeepFMError(f"--format {fmt} needs a schema (--schema FILE)")
    fraction = 0.0 if valid_path else valid_fraction
    if valid_path is None and not 0 < fraction < 1:
        raise DeepFMError(f"--valid-fraction must be in (0, 1), got {valid_fraction}")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key("shards", file_identity(train_path), fmt, schema.to_dict(), fraction, seed, on_bad_rows,
                    shard_rows, parent.fingerprint() if parent is not None else None)
    entry = cache / key if use_cache else Path(tempfile.mkdtemp(prefix="deepfm-shards-"))

    def blocks(path: str | Path):
        return readers.iter_read(path, fmt, schema, on_bad_rows, block_bytes=block_bytes)

    t0 = time.perf_counter()
    if (entry / "done").exists():
        pre = Preprocessor.from_dict(json.loads((entry / "preprocessor.json").read_text()))
        info = json.loads((entry / "info.json").read_text())
        log(f"using cached shards for {train_path} ({info['rows']:,} rows)")
    else:
        pre, info = fit_streaming(lambda: blocks(train_path), schema, fraction, seed)
        if parent is not None:
            pre = grow(parent, pre)
        log(f"fitted preprocessing on {info['train_rows']:,} rows in one streaming pass; writing shards")
        try:
            entry.mkdir(parents=True, exist_ok=True)
            write_shards(blocks(train_path), pre, entry / "data", fraction, seed, shard_rows)
            if valid_path:
                write_shards(blocks(valid_path), pre, entry / "valid", 0.0, seed, shard_rows)
            info.update({"path": str(train_path), "format": fmt, "streaming": True, "shard_rows": shard_rows,
                         "read_encode_seconds": time.perf_counter() - t0})
            (entry / "preprocessor.json").write_text(json.dumps(pre.to_dict()))
            (entry / "info.json").write_text(json.dumps(info))
            (entry / "done").write_text("ok")
        except outputs.WRITE_ERRORS as e:
            raise outputs.write_error(e, "the shards", entry, CACHE_HINT) from None
    train = ShardSet.open(entry / "data", "train")
    if train is None:
        raise DataError("no training rows", path=str(train_path))
    valid = ShardSet.open(entry / "valid", "train") if valid_path else ShardSet.open(entry / "data", "valid")
    info["vocab_rows"] = int(sum(f.size for f in layout(pre)))
    _report_collisions(pre, info)
    return Prepared(pre, train, None, valid, None, info)


def shard_file(path: str | Path, fmt: str, pre: Preprocessor, on_bad_rows: str = "error",
               cache_dir: str | Path | None = None, shard_rows: int = 1_000_000) -> ShardSet:
    """``encode_file`` for data larger than memory: the file encoded into (cached) shards."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    entry = cache / cache_key("shard-file", file_identity(path), fmt, pre.fingerprint(), on_bad_rows, shard_rows)
    if not (entry / "shards.json").exists():
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            write_shards(readers.iter_read(path, fmt, pre.schema, on_bad_rows), pre, entry, 0.0, 0, shard_rows)
        except outputs.WRITE_ERRORS as e:
            raise outputs.write_error(e, "the shards", entry, CACHE_HINT) from None
    shards = ShardSet.open(entry, "train")
    if shards is None:
        raise DataError("no data rows", path=str(path))
    return shards


def encode_file(path: str | Path, fmt: str, pre: Preprocessor, on_bad_rows: str = "error",
                cache_dir: Path | None = None, use_cache: bool = False, side: SideColumns | None = None) -> Encoded:
    """Read + encode a file with a fitted preprocessor, through the store cache when asked. side: the weight
    and group columns to read with it (a time column is left out: it only splits the training file)."""
    side = SideColumns(side.weight, side.group) if side else SideColumns()
    entry = None
    if use_cache and cache_dir is not None:
        entry = cache_dir / cache_key("encode", file_identity(path), fmt, pre.fingerprint(), on_bad_rows,
                                      *([side.to_dict()] if side else []))
        if (entry / "meta.json").exists():
            return open_store(entry)
    res, side_cols = side_mod.read(path, fmt, pre.schema, on_bad_rows, side)
    _report_skips(res)
    enc = side_mod.attach(pre.transform(res), side_cols, str(path), side)
    if entry is not None:
        try:
            save_store(enc, entry)
        except outputs.WRITE_ERRORS as e:
            raise outputs.write_error(e, "the encoded-data cache", cache_dir, CACHE_HINT) from None
        return open_store(entry)
    return enc


# train.wide_start "auto": below this many training rows (docs/quality.md: on the 8-9k-row Criteo and Avazu
# samples the MLP overfits within 2-3 epochs, before the first-order weights have converged, and DeepFM lost
# to LR by 0.02-0.03 AUC)
AUTO_WIDE_START_ROWS = 20_000


def wide_start(model: CTRModel, prepared: Prepared, train_cfg: TrainConfig) -> dict[str, Any] | None:
    """``train.wide_start``: fit LR (the same options, ``model: lr``) with early stopping, copy its first-order
    weights and bias into ``model`` and zero the MLP's output layer, so that training starts from the LR
    solution and (validated first) keeps the FM/MLP terms only where they beat it. None when it does not apply:
    off, no validation set, or a model without a first-order part and FM/MLP terms (or not a CTRModel)."""
    mode, rows = train_cfg.wide_start, train_row_count(prepared)
    if not (mode is True or (mode == "auto" and rows < AUTO_WIDE_START_ROWS)) or prepared.valid is None:
        return None
    if model.cfg.model not in MODELS or model.w is None or (model.v is None and model.dnn is None):
        return None
    fields = prepared.fields
    lr_model = build_model(fields, ModelConfig.from_dict({**model.cfg.to_dict(), "model": "lr"}), rows)
    lr_cfg = TrainConfig.from_dict({**train_cfg.to_dict(), "wide_start": False})
    hist = fit(lr_model, batcher(prepared.train, fields), lr_cfg, prepared.train_rows,
               batcher(prepared.valid, fields), prepared.valid_rows, None, False)
    with torch.no_grad():
        model.w.weight.copy_(lr_model.w.weight)
        model.bias.copy_(lr_model.bias)
        if model.dnn is not None:
            last = [m for m in model.dnn.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.zero_()
            last.bias.zero_()
    best = hist[-1].get("best_epoch") if hist else None
    log(f"wide start: LR trained {len(hist)} epochs (kept epoch {best}); training {model.cfg.model} from it")
    return {"lr_epochs": len(hist), "lr_best_epoch": best}


def train_row_count(prepared: Prepared) -> int:
    """Training rows (without the validation rows split off), what the data-size rules look at."""
    return int(len(prepared.train_rows)) if prepared.train_rows is not None else int(prepared.train.rows)


def resolve_config(preset: str = "default", overrides: list[str] | None = None,
                   **direct: Any) -> tuple[ModelConfig, TrainConfig]:
    """Preset file, then ``section.key=value`` overrides, then direct keyword options (None = unset)."""
    cfg = apply_overrides(load_preset(preset), list(overrides or []))
    for k, v in direct.items():
        if v is None:
            continue
        if k == "model":
            cfg["model"]["model"] = v
        else:
            cfg["train"][k] = v
    try:
        return ModelConfig.from_dict(check_options("model", cfg["model"])), TrainConfig.from_dict(cfg["train"])
    except (TypeError, ValueError) as e:
        raise DeepFMError(f"invalid configuration: {e}") from None


def score(model: CTRModel, enc: Encoded | ShardSet, fields: list[FieldSpec], rows: np.ndarray | None = None,
          post: PostProcess | None = None) -> dict[str, Any]:
    """Metrics of ``model`` on the labelled rows of ``enc`` (in memory or shards, streamed); ``post``: the
    bundle's post-processing of the logits (negative-rate correction, calibration), as served."""
    b = batcher(enc, fields)
    labels = b.labels()
    if labels is None:
        raise DeepFMError("cannot evaluate: the data has no label column")
    logits = predict_logits(model, b, rows)
    p = post.from_logits(logits) if post is not None else sigmoid(logits)

    def at(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.asarray(a if rows is None else a[rows])

    return evaluate(at(labels), p, at(getattr(b, "weights", lambda: None)()),  # type: ignore[arg-type]
                    at(getattr(b, "groups", lambda: None)()))


def train(
    prepared: Prepared,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path | None = None,
    data_format: str | None = None,
    test: Encoded | ShardSet | None = None,
    progress: bool = True,
    extra_info: dict[str, Any] | None = None,
    resume: bool = False,
    init_from: bundle_mod.Bundle | None = None,
    force: bool = False,
    callbacks: tuple[Callback, ...] = (),
) -> tuple[CTRModel, dict[str, Any]]:
    """Train on prepared data; with ``out_dir``, write checkpoints (``out_dir/checkpoints``), metrics.jsonl
    and the bundle there. resume: continue from the newest checkpoint in ``out_dir`` (see train.checkpoint).
    ``out_dir`` is locked for the whole run (a second run to it is refused), and an existing folder there must
    be a bundle or a training run's folder, else a DeepFMError (``force``: replace it anyway). ``callbacks``:
    trainer hooks (e.g. ``train.callbacks.tracking``), told the final metrics and bundle, closed at the end."""
    args = (prepared, model_cfg, train_cfg, out_dir, data_format, test, progress, extra_info, resume, init_from,
            force, tuple(callbacks))
    with closing(callbacks):  # a tracking run ends (FAILED on an error) however training ends
        if out_dir is None or dist.rank() != 0:  # rank 0 alone writes (checkpoints, bundle)
            return _train(*args)
        out = Path(out_dir)
        with outputs.locked(out):
            if not outputs.check_dir_out(out, ("bundle", "train-run"), force=force) or not any(out.iterdir()):
                out.mkdir(parents=True, exist_ok=True)
                outputs.mark(out, "train-run")  # a rerun (or --resume) recognises the folder as its own
            return _train(*args)


def _train(
    prepared: Prepared,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path | None,
    data_format: str | None,
    test: Encoded | ShardSet | None,
    progress: bool,
    extra_info: dict[str, Any] | None,
    resume: bool,
    init_from: bundle_mod.Bundle | None,
    force: bool,
    callbacks: tuple[Callback, ...] = (),
) -> tuple[CTRModel, dict[str, Any]]:
    seed_everything(train_cfg.seed)
    fields = prepared.fields
    prepared, sampled = _downsample(prepared, train_cfg)
    if train_cfg.calibrate != "none" and prepared.valid is None:
        raise DeepFMError(f"--calibrate {train_cfg.calibrate} is fitted on the validation split, and this run has "
                          "none: give --valid FILE or a --valid-fraction")
    model = build_model(fields, model_cfg, train_row_count(prepared))
    model_cfg = model.cfg  # the data-size rules resolved (batch_norm: auto), as the bundle records them
    lineage = None
    if init_from is not None:
        counts = warm_start(model, init_from.model)
        lineage = {"parent": str(init_from.path), "parent_version": init_from.manifest.get("files", {}).get(
            "model.safetensors", "")[:12], "parent_created": init_from.manifest.get("created"),
            "parent_data": init_from.training.get("data"), "ancestors": init_from.training.get("lineage"),
            **counts}
        log(f"warm start from {init_from.path}: {counts['rows_copied']:,} embedding rows kept, "
            f"{counts['rows_new']:,} new")
    out = Path(out_dir) if out_dir else None
    log_path, checkpoints = None, None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        log_path = out.parent / f"{out.name}.metrics.jsonl"
        # what a checkpoint may be resumed into: the same model, optimisation and data (not: epochs, threads...)
        same = {k: v for k, v in train_cfg.to_dict().items() if k not in ("epochs", "calibrate", *RUNTIME_KEYS)}
        rows = prepared.train_rows
        checkpoints = Checkpointer(out / "checkpoints", fingerprint(
            model_cfg.to_dict(), same, prepared.pre.fingerprint(), prepared.train.rows,
            None if rows is None else hashlib.sha256(np.ascontiguousarray(rows).tobytes()).hexdigest()),
            every=train_cfg.checkpoint_every, keep=train_cfg.keep_checkpoints)
    elif resume:
        raise DeepFMError("resume needs the output folder of the run (--out DIR)")

    # the run's log lines (fit prints the epoch and early-stopping lines), kept beside the folder while the
    # run goes on (a resumed run appends), then written into the bundle as train.log
    run_log = out.parent / f"{out.name}.train.log" if out is not None and dist.rank() == 0 else None
    t0 = time.perf_counter()
    with log_to(run_log, append=resume):
        started = wide_start(model, prepared, train_cfg)
        history = fit(model, batcher(prepared.train, fields), train_cfg, prepared.train_rows,
                      batcher(prepared.valid, fields) if prepared.valid is not None else None,
                      prepared.valid_rows, log_path, progress, None, checkpoints, resume,
                      validate_first=started is not None, callbacks=callbacks)
    if dist.rank() != 0:  # rank 0 scores and writes the bundle; the other ranks are done
        return model, {"metrics": {}, "training": {}}
    post = _fit_postprocess(model, prepared, train_cfg)
    metrics: dict[str, Any] = {}
    if prepared.valid is not None:  # calibrated on these rows: in-sample for the calibration map
        metrics["valid"] = score(model, prepared.valid, fields, prepared.valid_rows, post)
    if test is not None:
        metrics["test"] = score(model, test, fields, None, post)
    elif prepared.test is not None:  # the test part of a time split
        metrics["test"] = score(model, prepared.test, fields, prepared.test_rows, post)
    training = {
        "model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "history": history,
        "data": {**prepared.info, **(extra_info or {})}, "train_seconds": time.perf_counter() - t0,
        "best_epoch": history[-1].get("best_epoch") if history else None,
    }
    training["device"] = str(model_device(model))  # what train.device (e.g. "auto") resolved to
    decision = precision.last_decision()  # what train.precision (e.g. "auto") resolved to in fit
    if decision is not None:
        training["precision"] = decision.to_dict()
    if started is not None:
        training["wide_start"] = started
    if lineage is not None:
        training["lineage"] = lineage
    if sampled is not None:
        training["negative_sampling"] = sampled
    if not post.identity:
        training["postprocess"] = post.to_dict()
    if out is not None:  # replaces the folder, checkpoints included: the run is complete
        try:
            bundle_mod.save(out, model, prepared.pre, data_format, training, metrics, force=force,
                            extra_files={"train.log": run_log.read_bytes()} if run_log and run_log.exists() else None,
                            postprocess=post)
        except outputs.WRITE_ERRORS as e:  # OSError, or safetensors' own error (disk full)
            raise disk_error(e, "the bundle", out) from None
        if log_path is not None and log_path.exists():
            shutil.move(str(log_path), str(out / "metrics.jsonl"))  # not checksummed: an appendable log
        if run_log is not None:
            run_log.unlink(missing_ok=True)  # now in the bundle
    for cb in callbacks:
        cb.on_run_end(metrics, out)
    return model, {"metrics": metrics, "training": training, "postprocess": post}


def _downsample(prepared: Prepared, train_cfg: TrainConfig) -> tuple[Prepared, dict[str, Any] | None]:
    """``train.negative_rate`` q < 1: the training rows cut to every positive and a seeded random q of the
    negatives (deepfm.calibration.downsample_negatives); validation and test rows are untouched. The
    preprocessing was fitted on the whole training split before. -> (prepared, counts for training.json)."""
    q = train_cfg.negative_rate
    if q == 1:
        return prepared, None
    if isinstance(prepared.train, ShardSet):
        raise DeepFMError("--negative-rate is not available with --streaming yet: train in memory")
    labels = batcher(prepared.train, prepared.fields).labels()
    if labels is None:
        raise DeepFMError("--negative-rate needs labelled training data")
    rows = prepared.train_rows if prepared.train_rows is not None else np.arange(prepared.train.rows)
    kept, counts = calibration.downsample_negatives(rows, np.asarray(labels), q, train_cfg.seed)
    if counts["positives"] == 0:
        raise DeepFMError("--negative-rate: the training split has no positive rows")
    log(f"negative downsampling at rate {q:g}: training on {counts['rows_kept']:,} of {counts['rows_before']:,} "
        f"rows (all {counts['positives']:,} positives, {counts['negatives_kept']:,} of "
        f"{counts['negatives_before']:,} negatives); probabilities corrected by p / (p + (1 - p) / {q:g})")
    return dataclasses.replace(prepared, train_rows=kept), counts


def _fit_postprocess(model: CTRModel, prepared: Prepared, train_cfg: TrainConfig) -> PostProcess:
    """The bundle's post-processing: the negative-rate correction and ``train.calibrate`` fitted on the
    validation split's (corrected) predictions."""
    if train_cfg.calibrate == "none" or prepared.valid is None:
        return PostProcess(negative_rate=float(train_cfg.negative_rate))
    b = batcher(prepared.valid, prepared.fields)
    rows = prepared.valid_rows
    labels, weights = b.labels(), getattr(b, "weights", lambda: None)()
    assert labels is not None
    y = np.asarray(labels if rows is None else np.asarray(labels)[rows])
    w = None if weights is None else np.asarray(weights if rows is None else np.asarray(weights)[rows])
    try:
        post = calibration.fit(train_cfg.calibrate, predict_logits(model, b, rows), y, w,
                               float(train_cfg.negative_rate))
    except ValueError as e:
        raise DeepFMError(f"--calibrate {train_cfg.calibrate}: {e}") from None
    log(f"calibration ({train_cfg.calibrate}) fitted on {post.info['rows']:,} validation rows: ECE "
        f"{post.info['valid_ece_before']:.4f} -> {post.info['valid_ece_after']:.4f} (in-sample)")
    return post
