"""``deepfm compare``: the paper's model comparison (Guo et al. 2017, Table 2) in one command.

Every model is trained on the same splits and the same preprocessing (fitted once; the encoded data is reused
by every run), once per seed. Each run lands in ``OUT/runs/<model>-seed<k>/`` (a bundle) with a ``done.json``
(its metrics, per-epoch history and test-set curves), so a rerun of the same command skips the runs that are
done and computes only the missing ones. Then ``results.csv``, ``table.md`` / ``table.csv`` (mean ± std over
seeds, RelaImpr against LR), the plots and ``report.html`` (deepfm.report) are rewritten.

    RelaImpr = ((AUC_model - 0.5) / (AUC_LR - 0.5) - 1) x 100%
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepfm import outputs
from deepfm.config import MODEL_NAMES, RUNTIME_KEYS  # not models.ctr: importing this module must not import torch
from deepfm.errors import DeepFMError
from deepfm.report import result_cells  # noqa: F401 (re-exported; report renders the cells)
from deepfm.utils import digest

# the names the paper's Table 2 uses (wdl is its LR&DNN, fmdnn its FM&DNN)
DISPLAY = {"lr": "LR", "fm": "FM", "fnn": "FNN", "ipnn": "IPNN", "opnn": "OPNN", "pnnstar": "PNN*",
           "wdl": "LR&DNN", "fmdnn": "FM&DNN", "deepfm": "DeepFM", "dnn": "DNN"}
ROC_POINTS = 501  # the false-positive-rate grid the ROC curves are stored (and averaged over seeds) on
CALIBRATION_BINS = 20  # equal-frequency bins of the reliability curves
DONE = "done.json"
STARTED = "run.json"


# ------------------------------------------------------------------------------------------- small pieces
def parse_models(text: str) -> list[str]:
    """``"lr,fm,deepfm"`` -> ``["lr", "fm", "deepfm"]`` (validated, duplicates dropped, order kept)."""
    names = [m.strip().lower() for m in str(text).split(",") if m.strip()]
    if not names:
        raise DeepFMError(f"--models: no model given; use a comma-separated list of {', '.join(MODEL_NAMES)}")
    bad = [m for m in names if m not in MODEL_NAMES]
    if bad:
        raise DeepFMError(f"--models: unknown model(s) {', '.join(map(repr, bad))}; "
                          f"expected a comma-separated list of {', '.join(MODEL_NAMES)}")
    return list(dict.fromkeys(names))


def relaimpr(auc: float, auc_lr: float | None) -> float | None:
    """Relative AUC improvement over LR in percent: ((AUC - 0.5) / (AUC_LR - 0.5) - 1) x 100.
    None when there is no LR AUC or it is not above 0.5 (the measure is then undefined)."""
    if auc_lr is None or not np.isfinite(auc_lr) or auc_lr <= 0.5 or not np.isfinite(auc):
        return None
    return ((auc - 0.5) / (auc_lr - 0.5) - 1.0) * 100.0


def run_id(model: str, seed: int) -> str:
    return f"{model}-seed{seed}"


def run_key(model_cfg: dict[str, Any], train_cfg: dict[str, Any], data_key: dict[str, Any]) -> str:
    """What makes a run the same run: its resolved model and training configuration and the data."""
    train = {k: v for k, v in train_cfg.items() if k not in RUNTIME_KEYS}  # threads etc. do not change a run
    return digest({"model": model_cfg, "train": train, "data": data_key}, 20)


def roc_curve(y: np.ndarray, p: np.ndarray, points: int = ROC_POINTS) -> list[float] | None:
    """True-positive rate at ``points`` evenly spaced false-positive rates in [0, 1] (the ROC as a step
    function: the best TPR reached at FPR <= x). None when the labels have one class only."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    n_pos = y.sum()
    if n_pos == 0 or n_pos == y.size:
        return None
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order], p[order]
    last = np.r_[np.flatnonzero(np.diff(ps)), ys.size - 1]  # the last row of each tie group
    tps = np.cumsum(ys)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    grid = np.linspace(0.0, 1.0, points)
    return [round(float(v), 6) for v in tpr[np.searchsorted(fpr, grid, side="right") - 1]]


def calibration_curve(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, list[float]]:
    """Reliability curve: rows sorted by predicted probability, cut into ``bins`` equal-frequency bins;
    per bin the mean prediction, the observed click rate and the row count."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    parts = [c for c in np.array_split(np.argsort(p, kind="mergesort"), min(bins, max(1, p.size))) if c.size]
    return {"predicted": [round(float(p[c].mean()), 7) for c in parts],
            "observed": [round(float(y[c].mean()), 7) for c in parts],
            "rows": [int(c.size) for c in parts]}


def _fmt(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and np.isfinite(v) else ""


def _write_json(path: Path, obj: Any) -> None:
    outputs.write_text(path, json.dumps(obj, indent=1, default=str))  # unique temporary name, then rename


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------- the plan
@dataclass
class Run:
    model: str
    seed: int
    key: str
    model_cfg: Any
    train_cfg: Any
    record: dict[str, Any] | None = None  # done.json once complete
    status: str = "missing"  # missing | reused | trained

    @property
    def id(self) -> str:
        return run_id(self.model, self.seed)


@dataclass
class Outcome:
    """What ``compare`` did: the runs in plan order, the table rows, and what was written."""

    out: Path
    runs: list[Run]
    rows: list[dict[str, Any]]
    data: dict[str, Any]
    budget_note: str | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def trained(self) -> list[Run]:
        return [r for r in self.runs if r.status == "trained"]

    @property
    def reused(self) -> list[Run]:
        return [r for r in self.runs if r.status == "reused"]

    @property
    def missing(self) -> list[Run]:
        return [r for r in self.runs if r.record is None]


def summarize(runs: list[Run], models: list[str]) -> list[dict[str, Any]]:
    """One row per model: test AUC / logloss mean and std (population, ddof=0, as BARS reports) over the
    completed seeds, and RelaImpr of the mean AUC against LR's mean AUC (None without lr)."""
    rows = []
    for m in models:
        done = [r.record for r in runs if r.model == m and r.record is not None]
        auc = np.array([d["metrics"]["test"]["auc"] for d in done], dtype=np.float64)
        ll = np.array([d["metrics"]["test"]["logloss"] for d in done], dtype=np.float64)
        row = {"model": m, "name": DISPLAY.get(m, m), "runs": len(done),
               "seeds": ",".join(str(d["seed"]) for d in done),
               "auc_mean": float(auc.mean()) if auc.size else float("nan"),
               "auc_std": float(auc.std()) if auc.size else float("nan"),
               "logloss_mean": float(ll.mean()) if ll.size else float("nan"),
               "logloss_std": float(ll.std()) if ll.size else float("nan")}
        for k in ("ne", "gauc"):  # runs recorded before NE / without --group-column have none: NaN
            v = np.array([d["metrics"]["test"].get(k, np.nan) for d in done], dtype=np.float64)
            row[f"{k}_mean"] = float(v.mean()) if v.size else float("nan")
            row[f"{k}_std"] = float(v.std()) if v.size else float("nan")
        rows.append(row)
    lr = next((r for r in rows if r["model"] == "lr" and r["runs"]), None)
    for r in rows:
        r["relaimpr"] = relaimpr(r["auc_mean"], lr["auc_mean"] if lr else None) if r["runs"] else None
    return rows


def table_markdown(rows: list[dict[str, Any]], has_lr: bool) -> str:
    gauc = any(np.isfinite(r.get("gauc_mean", np.nan)) for r in rows)
    lines = ["| Model | Test AUC | Test Logloss | Test NE |" + (" Test GAUC |" if gauc else "")
             + " RelaImpr (AUC vs LR) | seeds |", "|---|---|---|---|" + ("---|" if gauc else "") + "---|---|"]
    for r in rows:
        auc, ll, rel = result_cells(r)
        ne = _mean_std(r, "ne", 5)
        g = f" {_mean_std(r, 'gauc', 4)} |" if gauc else ""
        lines.append(f"| {r['name']} | {auc} | {ll} | {ne} |{g} {rel} | {r['runs']} |")
    note = ("RelaImpr = ((AUC_model - 0.5) / (AUC_LR - 0.5) - 1) x 100%, from the mean test AUCs."
            if has_lr else "RelaImpr needs lr among --models (it is measured against LR): left blank.")
    extra = (" NE = test logloss / entropy of the test CTR (below 1: better than predicting the CTR)."
             + (" GAUC = the impression-weighted mean of per-group AUCs (--group-column)." if gauc else ""))
    return "\n".join(lines) + f"\n\nMean ± std (population, ddof=0) over seeds. {note}{extra}\n"


def _mean_std(r: dict[str, Any], key: str, digits: int) -> str:
    """A table cell "mean ± std" of ``key`` (one seed: "(1 seed)"; not measured: blank)."""
    m, s = r.get(f"{key}_mean", float("nan")), r.get(f"{key}_std", float("nan"))
    if not r["runs"] or not np.isfinite(m):
        return ""
    return f"{m:.{digits}f} (1 seed)" if r["runs"] == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def write_tables(out: Path, runs: list[Run], rows: list[dict[str, Any]], has_lr: bool) -> list[Path]:
    """results.csv (one row per completed run), table.csv and table.md."""
    results = out / "results.csv"
    with outputs.atomic_file(results) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "seed", "test_auc", "test_logloss", "valid_auc", "valid_logloss", "best_epoch",
                    "epochs", "train_seconds", "test_rows", "test_ne", "test_gauc"])
        for r in runs:
            if r.record is None:
                continue
            d, t, v = r.record, r.record["metrics"]["test"], r.record["metrics"].get("valid", {})
            w.writerow([r.model, r.seed, _fmt(t["auc"], 6), _fmt(t["logloss"], 6), _fmt(v.get("auc"), 6),
                        _fmt(v.get("logloss"), 6), d.get("best_epoch"), d.get("epochs"),
                        _fmt(d.get("train_seconds"), 2), t.get("rows"), _fmt(t.get("ne"), 6), _fmt(t.get("gauc"), 6)])
    table_csv = out / "table.csv"
    with outputs.atomic_file(table_csv) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "name", "runs", "auc_mean", "auc_std", "logloss_mean", "logloss_std",
                    "relaimpr_percent", "ne_mean", "ne_std", "gauc_mean", "gauc_std"])
        for r in rows:
            w.writerow([r["model"], r["name"], r["runs"], _fmt(r["auc_mean"], 6), _fmt(r["auc_std"], 6),
                        _fmt(r["logloss_mean"], 6), _fmt(r["logloss_std"], 6),
                        "" if r["relaimpr"] is None else f"{r['relaimpr']:.4f}",
                        *(_fmt(r.get(k), 6) for k in ("ne_mean", "ne_std", "gauc_mean", "gauc_std"))])
    table_md = out / "table.md"
    outputs.write_text(table_md, table_markdown(rows, has_lr))
    return [results, table_csv, table_md]


# ------------------------------------------------------------------------------------------- environment
def machine() -> dict[str, Any]:
    from deepfm.train.trainer import available_cores

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": available_cores(),
            "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("deepfm", "torch", "numpy", "pyarrow", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def command_line(params: dict[str, Any]) -> str:
    """The invocation: ``deepfm compare ...`` as typed when this process was started by the CLI, otherwise
    the equivalent command rebuilt from the parameters."""
    argv = sys.argv[1:]
    if argv[:1] == ["compare"]:
        return shlex.join(["deepfm", *argv])
    parts = ["deepfm", "compare"]
    for flag, value in params.items():
        if value is None or value is False or value == () or value == []:
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            for v in value:
                parts += [flag, str(v)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


# ------------------------------------------------------------------------------------------- the command
def compare(
    train_path: str | Path,
    test_path: str | Path,
    out: str | Path,
    fmt: str | None = None,
    models: str | list[str] = "lr,fm,deepfm",
    seeds: int = 3,
    valid_path: str | Path | None = None,
    valid_fraction: float = 0.1,
    split_seed: int = 2017,
    schema_path: str | Path | None = None,
    preset: str = "default",
    overrides: list[str] | tuple[str, ...] = (),
    epochs: int | None = None,
    threads: int | None = None,
    min_count: int | None = None,
    on_bad_rows: str = "error",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    streaming: bool = False,
    budget_minutes: float | None = None,
    command: str | None = None,
    echo: Any = None,
    force: bool = False,
    weight_column: str | None = None,
    group_column: str | None = None,
    device: str | None = None,
) -> Outcome:
    """Train every model x seed on the same prepared data, skipping runs already done in ``out``, then write
    the tables, plots and report. echo: where the progress lines go (default: print). weight_column: sample
    weights for training and every metric; group_column: grouped AUC (GAUC) in the tables (``data.side``).
    device: train.device for every run (None: the preset's; not part of the run keys)."""
    t_start = time.monotonic()
    say = echo or (lambda s: print(s, flush=True))
    model_list = parse_models(models) if isinstance(models, str) else parse_models(",".join(models))
    if not isinstance(seeds, int) or seeds < 1:
        raise DeepFMError(f"--seeds must be a positive integer (the runs use seeds 1..N), got {seeds!r}")
    if budget_minutes is not None and budget_minutes < 0:
        raise DeepFMError(f"--budget-minutes must be >= 0, got {budget_minutes}")
    for flag, p in (("--train", train_path), ("--test", test_path), ("--valid", valid_path),
                    ("--schema", schema_path)):
        if p is not None and not Path(p).exists():
            raise DeepFMError(f"{flag} {p}: no such file")
    if fmt is None and schema_path is None:
        raise DeepFMError("pass --format (criteo, avazu, libfm, movielens) or --format csv/parquet with --schema")
    if valid_path is None and not 0 < valid_fraction < 1:
        raise DeepFMError(f"--valid-fraction must be in (0, 1), got {valid_fraction}")
    fmt = fmt or ("parquet" if str(train_path).endswith(".parquet") else "csv")
    if streaming and (weight_column or group_column):
        raise DeepFMError("--weight-column and --group-column are not available with --streaming yet")

    from deepfm import pipeline
    from deepfm import schema as schema_mod
    from deepfm.data import readers
    from deepfm.data.store import file_identity

    # as `deepfm train`: the format's default schema (libfm builds its own from the file: None here)
    schema = schema_mod.load(schema_path) if schema_path else readers.default_schema(fmt)
    if schema is not None and min_count is not None:
        schema = schema.with_overrides(min_count=min_count)
    out = Path(out)
    # never write into a folder that is not a compare output (unless --force), or that holds the data
    outputs.check_dir_out(out, ("compare",), force=force, inputs=(train_path, valid_path, test_path, schema_path))
    with outputs.locked(out):  # one compare per --out at a time
        out.mkdir(parents=True, exist_ok=True)
        if not (out / outputs.MARKER).exists():
            outputs.mark(out, "compare")
        (out / "runs").mkdir(parents=True, exist_ok=True)
        data_key = {"format": fmt, "schema": schema.to_dict() if schema is not None else None,
                    "train": file_identity(train_path),
                    "valid": file_identity(valid_path) if valid_path else None,
                    "valid_fraction": None if valid_path else valid_fraction,
                    "split_seed": None if valid_path else split_seed, "test": file_identity(test_path),
                    "on_bad_rows": on_bad_rows, "streaming": bool(streaming)}
        if weight_column or group_column:  # only then: the keys of earlier runs stay valid
            data_key["side"] = {"weight": weight_column, "group": group_column}
        from deepfm.data.side import SideColumns

        side = SideColumns(weight_column, group_column)

        # the plan: seed-major, so that a budget cut leaves whole seeds of every model
        runs: list[Run] = []
        for seed in range(1, seeds + 1):
            for m in model_list:
                model_cfg, train_cfg = pipeline.resolve_config(preset, list(overrides), model=m, epochs=epochs,
                                                               seed=seed, threads=threads, weight_column=weight_column,
                                                               device=device)
                r = Run(m, seed, run_key(model_cfg.to_dict(), train_cfg.to_dict(), data_key), model_cfg, train_cfg)
                done = _read_json(out / "runs" / r.id / DONE)
                if done and done.get("key") == r.key and done.get("model") == m and done.get("seed") == seed:
                    r.record, r.status = done, "reused"
                runs.append(r)

        data_file = out / "data.json"
        data = _read_json(data_file)
        if not data or data.get("key") != run_key({}, {}, data_key):
            data = None
        prep = test = None
        todo = [r for r in runs if r.record is None]

        def ensure_data() -> None:
            nonlocal prep, test, data
            if prep is not None:
                return
            if streaming:  # out of core: shards on disk, as `deepfm train --streaming`
                prep = pipeline.prepare_streaming(train_path, fmt, schema, valid_path, valid_fraction, split_seed,
                                                  on_bad_rows, cache_dir, use_cache)
                test = pipeline.shard_file(test_path, fmt, prep.pre, on_bad_rows, cache_dir)
            else:
                prep = pipeline.prepare(train_path, fmt, schema, valid_path, valid_fraction, split_seed, on_bad_rows,
                                        cache_dir, use_cache, side=side)
                test = pipeline.encode_file(test_path, fmt, prep.pre, on_bad_rows, side=side)
            labels = test_labels(pipeline, test, prep)
            if labels is None:
                raise DeepFMError(f"--test {test_path}: no label column, cannot evaluate")
            data = {"key": run_key({}, {}, data_key), "format": fmt, "train": str(Path(train_path).resolve()),
                    "valid": str(Path(valid_path).resolve()) if valid_path else None,
                    "valid_fraction": None if valid_path else valid_fraction,
                    "split_seed": None if valid_path else split_seed, "test": str(Path(test_path).resolve()),
                    "train_rows": int(len(prep.train_rows) if prep.train_rows is not None else prep.train.rows),
                    "valid_rows": int(len(prep.valid_rows) if prep.valid_rows is not None
                                      else prep.valid.rows if prep.valid is not None else 0),
                    "test_rows": int(test.rows), "test_ctr": float(labels.mean()) if labels.size else float("nan"),
                    "fields": len(prep.fields), "vocab_rows": int(prep.info["vocab_rows"]),
                    "field_names": [f.name for f in prep.fields],
                    "skipped_rows": int(prep.info.get("skipped_rows", 0)), "streaming": bool(streaming)}
            _write_json(data_file, data)

        n = len(runs)
        for k, r in enumerate(runs, 1):
            if r.record is not None:
                t = r.record["metrics"]["test"]
                say(f"[{k}/{n}] {r.model} seed {r.seed}: done earlier, skipped (test AUC {t['auc']:.4f} logloss "
                    f"{t['logloss']:.5f})")
        budget_note = None
        for r in todo:
            elapsed = time.monotonic() - t_start
            if budget_minutes is not None and elapsed >= budget_minutes * 60:
                left = [x.id for x in todo if x.record is None]
                budget_note = (f"the budget of {budget_minutes:g} min was spent after {elapsed / 60:.1f} min: "
                               f"{len(left)} run(s) not started ({', '.join(left)}); rerun the same command "
                               "(with a larger --budget-minutes) to complete them")
                say(f"budget: {budget_note}")
                break
            ensure_data()
            r.record = _train_one(pipeline, prep, test, r, out, fmt, preset, list(overrides))
            r.status = "trained"
            t = r.record["metrics"]["test"]
            k = sum(x.record is not None for x in runs)
            say(f"[{k}/{n}] {r.model} seed {r.seed}: test AUC {t['auc']:.4f} logloss {t['logloss']:.5f}, best epoch "
                f"{r.record['best_epoch']} of {r.record['epochs']}, {r.record['train_seconds']:.1f} s")
            write_tables(out, runs, summarize(runs, model_list), "lr" in model_list)
        if data is None and any(r.record is not None for r in runs):
            ensure_data()  # the runs were done by an earlier invocation whose data.json is gone
        rows = summarize(runs, model_list)
        outcome = Outcome(out, runs, rows, data or {}, budget_note)
        outcome.files += write_tables(out, runs, rows, "lr" in model_list)

        from deepfm import report

        settings = {"models": model_list, "seeds": seeds, "preset": preset, "overrides": list(overrides),
                    "epochs": epochs, "budget_minutes": budget_minutes, "split_seed": split_seed,
                    "min_count": min_count}
        outcome.files += report.write(outcome, command or "(Python API) deepfm.compare.compare(...)", settings,
                                      machine(), versions())
        return outcome


def test_labels(pipeline: Any, test: Any, prep: Any) -> np.ndarray | None:
    labels = pipeline.batcher(test, prep.fields).labels()
    return None if labels is None else np.asarray(labels, dtype=np.float64)


def _train_one(pipeline: Any, prep: Any, test: Any, r: Run, out: Path, fmt: str, preset: str,
               overrides: list[str]) -> dict[str, Any]:
    """Train one run into out/runs/<id> (resuming its checkpoints if an interrupted run of the same key left
    some), score the test set, write done.json last."""
    from deepfm.train.trainer import predict_logits, sigmoid

    run_dir = out / "runs" / r.id
    started = _read_json(run_dir / STARTED)
    resume = bool(started and started.get("key") == r.key and (run_dir / "checkpoints").exists())
    if not resume and run_dir.exists():
        # another configuration's run, or a partial one without checkpoints: ours (a bundle, a training folder,
        # started.json) and nothing else is deleted
        if not (outputs.artifact_kind(run_dir) in ("bundle", "train-run") or (run_dir / STARTED).exists()
                or not any(run_dir.iterdir())):
            raise DeepFMError(f"{run_dir} is not a compare run folder: refusing to delete it; move it away")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / STARTED, {"key": r.key, "model": r.model, "seed": r.seed,
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    model, result = pipeline.train(prep, r.model_cfg, r.train_cfg, run_dir, fmt, test, progress=False,
                                   extra_info={"preset": preset, "overrides": overrides, "compare": r.id},
                                   resume=resume, force=True)  # run_dir: checked above, holds started.json
    y = test_labels(pipeline, test, prep)
    p = sigmoid(predict_logits(model, pipeline.batcher(test, prep.fields)))
    training = result["training"]
    history = [{k: h.get(k) for k in ("epoch", "train_logloss", "valid_auc", "valid_logloss", "train_seconds",
                                      "best_epoch")} for h in training["history"]]
    record = {"model": r.model, "seed": r.seed, "key": r.key, "config": {"model": r.model_cfg.to_dict(),
                                                                         "train": r.train_cfg.to_dict()},
              "metrics": result["metrics"], "best_epoch": training.get("best_epoch"), "epochs": len(history),
              "train_seconds": float(training["train_seconds"]), "history": history,
              "roc_tpr": roc_curve(y, p), "calibration": calibration_curve(y, p),
              "parameters": int(sum(t.numel() for t in model.parameters())), "resumed": resume,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "bundle": f"runs/{r.id}"}
    _write_json(run_dir / DONE, record)
    return record
