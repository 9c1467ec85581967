"""The ``deepfm`` command line. Errors of the project's own types print as one line (exit status 2)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import click

from deepfm import outputs
from deepfm.config import MODEL_NAMES
from deepfm.errors import DeepFMError

FORMATS = ("criteo", "avazu", "libfm", "movielens", "csv", "tsv", "parquet")


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf (which pass every range comparison)."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        import math

        rv = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(rv, param, ctx)


class BatchSize(click.ParamType):
    """--batch-size: a positive integer or 'auto'."""

    name = "INTEGER|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        if isinstance(value, str) and value.strip().isdigit() and int(value) >= 1:
            return int(value)
        self.fail(f"{value!r} is not a positive integer or 'auto'.", param, ctx)


def friendly(fn):
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeepFMError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:  # Ctrl-C: partial outputs were dropped on the way out (deepfm.outputs)
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def input_options(fn):
    """--format, --train, --valid, --valid-fraction, --schema: the training inputs of train and tune."""
    for opt in reversed([
        click.option("--format", "fmt", type=click.Choice(FORMATS),
                     help="Input format (csv/tsv/parquet need --schema)."),
        click.option("--train", "train_path", required=True, type=click.Path(exists=True), help="Training data."),
        click.option("--valid", "valid_path", type=click.Path(exists=True),
                     help="Validation data (else --valid-fraction)."),
        click.option("--valid-fraction", type=float, default=0.1, show_default=True,
                     help="Seeded random share of --train held out for validation when --valid is not given."),
        click.option("--schema", "schema_path", type=click.Path(exists=True), help="Feature schema (YAML/JSON)."),
    ]):
        fn = opt(fn)
    return fn


def loading_options(fn):
    """--threads, --min-count, --on-bad-rows, --cache-dir, --no-cache: shared by train, compare and tune."""
    for opt in reversed([
        click.option("--threads", type=click.IntRange(min=0),
                     help="Intra-op CPU threads (default: the cores this process may use)."),
        click.option("--min-count", type=click.IntRange(min=1), help="Override every field's min_count."),
        click.option("--on-bad-rows", type=click.Choice(["error", "skip"]), default="error", show_default=True),
        click.option("--cache-dir", type=click.Path(),
                     help="Encoded-store cache (default ~/.cache/deepfm, $DEEPFM_CACHE)."),
        click.option("--no-cache", is_flag=True, help="Do not read or write the encoded-store cache."),
    ]):
        fn = opt(fn)
    return fn


def input_format(fmt: str | None, schema_path: str | None, train_path: str) -> str:
    """The training data's format: --format, else from --schema and the file name (parquet or csv)."""
    if fmt is None and schema_path is None:
        raise DeepFMError("pass --format (criteo, avazu, libfm, movielens) or --format csv/parquet with --schema")
    return fmt or ("parquet" if str(train_path).endswith(".parquet") else "csv")


def batch_size_option(batch_size: str | None) -> int | str | None:
    """--batch-size: a positive integer, 'auto', or None (the preset's)."""
    if batch_size is None or batch_size == "auto" or isinstance(batch_size, int):
        return batch_size
    if not batch_size.isdigit():
        raise DeepFMError(f"--batch-size must be a positive integer or 'auto', got {batch_size!r}")
    return int(batch_size)


def _schema(path: str | None, fmt: str | None, min_count: int | None):
    from deepfm import schema as schema_mod
    from deepfm.data import readers

    s = schema_mod.load(path) if path else (readers.default_schema(fmt) if fmt else None)
    if s is not None and min_count is not None:
        s = s.with_overrides(min_count=min_count)
    return s


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj


class _Commands(click.Group):
    """The paper-comparison tools live in their own modules and load only when used (``deepfm --help`` and
    every other command stay free of their imports)."""

    lazy = {"compare": "deepfm.compare:compare_command", "explain": "deepfm.explain:explain_command",
            "tune": "deepfm.tune:tune_command"}
    # What `deepfm --help` lists for them: importing the modules for their docstrings would import torch
    # (seconds). tests/test_cli_help.py checks these against the commands' own help.
    lazy_help = {"compare": "Compare models as in the DeepFM paper's Table 2: every model on the same splits.",
                 "explain": "Interaction map and field importance of a bundle on DATA.",
                 "tune": "Search DeepFM's hyper-parameters with Optuna (TPE, median pruning)."}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))  # as click's own listing
        rows = []
        for name in names:
            if name in self.lazy and name not in self.commands:
                rows.append((name, click.utils.make_default_short_help(self.lazy_help[name], limit)))
                continue
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            import importlib

            module, attr = self.lazy[name].split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                return None
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        """Every user mistake ends as one ``error: ...`` line and exit status 2: a bad option value or usage
        (click's three-line usage message), and any library error (DeepFMError and its subclasses in
        deepfm.errors) that a command did not already turn into one."""
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            raise _OneLine(e.format_message() + where) from None
        except DeepFMError as e:
            raise _OneLine(str(e)) from None

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        """click's main; and when it runs as the process itself (no ``args``: the console script, ``python -m
        deepfm``), an error exit ends without the C++ static destructors. Native worker pools (Arrow's, OpenMP)
        still winding down there abort a busy machine's run after its clean error line: "terminate called
        without an active exception", exit 134 instead of 2. Python's exit handlers still run first."""
        if args is not None:  # in-process callers (CliRunner, scripts) keep the normal exit
            return super().main(args, *rest, **kwargs)
        try:
            return super().main(args, *rest, **kwargs)
        except SystemExit as e:
            if e.code is None or e.code == 0:
                raise
            _error_exit(e.code)


def _error_exit(code: object) -> None:
    """Exit with ``code`` after the atexit handlers (logging, temporary files) and flushed output, but
    without interpreter teardown, where native threads alive at exit can abort the process."""
    import atexit
    import os

    if not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class _OneLine(click.ClickException):
    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="deepfm")
def main() -> None:
    """deepfm: paper-faithful DeepFM for click-through-rate prediction, from raw logs to a saved model.

    \b
    Quick start (about a few minutes on 2 cores):
      deepfm demo
    Real data:
      deepfm train --format criteo --train train.txt --valid-fraction 0.1 --out model/
      deepfm evaluate model/ test.txt --json
      deepfm predict model/ new.txt --out scores.parquet
    """


# ------------------------------------------------------------------------------------------- train
@main.command()
@input_options
@click.option("--test", "test_path", type=click.Path(exists=True), help="Optional test data scored at the end.")
@click.option("--out", required=True, type=click.Path(), help="Output bundle folder.")
@click.option("--model", type=click.Choice(list(MODEL_NAMES)), default=None,
              help="Model (default: the preset's, deepfm): the paper's Table 2 baselines lr, fm, fnn, ipnn, opnn, "
                   "pnnstar, wdl (LR&DNN), fmdnn (FM&DNN), and dnn.")
@click.option("--preset", default="default", show_default=True, help="paper, bars, default, or a YAML file.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a preset option, e.g. --set model.dropout=0.2 --set train.lr=0.0005.")
@click.option("--epochs", type=click.IntRange(min=1),
              help="Maximum epochs. Training stops earlier when the monitored validation metric (the preset's "
                   "train.monitor: AUC - logloss in the default preset) gains nothing for train.patience "
                   "validations; the best epoch's weights are kept.")
@click.option("--batch-size", type=BatchSize(), help="Rows per step, or 'auto' (about 100 steps per epoch, 128-4096).")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), help="Adam learning rate (the preset's: 0.001).")
@click.option("--seed", type=click.IntRange(min=0), help="Seed for the split, initialisation, shuffling and dropout.")
@click.option("--embedding-update", type=click.Choice(["dense", "sparse", "auto"]),
              help="dense: Adam over whole tables (the reference); sparse: lazy Adam on the rows each batch "
                   "touches (cost independent of the vocabulary); auto: sparse from 1M table rows up.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]),
              help="bf16 autocast of the MLP (fast only on CPUs with AVX512-BF16/AMX, and on GPUs).")
@loading_options
@click.option("--streaming", is_flag=True,
              help="Out of core: fit preprocessing in one streaming pass and train from shards on disk "
                   "(memory bounded by the model and a few shards, whatever the data size).")
@click.option("--shard-rows", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="Rows per shard in --streaming mode.")
@click.option("--init-from", "init_from", type=click.Path(exists=True, file_okay=False),
              help="Warm start from a bundle (e.g. yesterday's): its vocabularies grow with the new values, its "
                   "weights are kept, new rows start fresh; the new bundle records its lineage.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel processes on this machine (launches torchrun; gloo on CPU, nccl on CUDA).")
@click.option("--checkpoint-every", type=click.IntRange(min=0),
              help="Steps between checkpoints in OUT/checkpoints (default 1000; 0: epoch ends only).")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out (rerun the same command "
                                             "with --resume added); starts over when there is none.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--force", is_flag=True, help="Replace --out even if it is a folder that is not a deepfm bundle "
                                            "(its files are deleted).")
@friendly
@outputs.interruptible
def train(fmt, train_path, valid_path, valid_fraction, test_path, schema_path, out, model, preset, overrides,
          epochs, batch_size, lr, seed, threads, embedding_update, precision, min_count, on_bad_rows, cache_dir,
          no_cache, streaming, shard_rows, init_from, nproc, checkpoint_every, resume, quiet, force) -> None:
    """Train a model and write a bundle.

    \b
    Examples:
      deepfm train --format criteo --train train.txt --valid-fraction 0.1 --out runs/criteo
      deepfm train --format avazu --train train.csv --valid valid.csv --preset paper --epochs 3 --out m/
      deepfm train --format csv --schema schema.yaml --train logs.csv --out m/ --set model.dropout=0.3
    """
    from deepfm import pipeline
    from deepfm.train import distributed as dist

    # before any work: never replace a folder that is not ours, or that holds this run's data
    outputs.check_dir_out(out, ("bundle", "train-run"), force=force,
                          inputs=(train_path, valid_path, test_path, schema_path))
    if nproc > 1:  # hand over to torchrun, which runs this command (without --nproc) on every rank
        _torchrun(nproc)
    parent = None
    if init_from:
        from deepfm.serve.bundle import load

        parent = load(init_from)
        fmt = fmt or parent.data_format
        if model is not None and model != parent.model.cfg.model:
            raise DeepFMError(f"--init-from: the bundle is a {parent.model.cfg.model} model, not {model}")
    fmt = input_format(fmt, schema_path, train_path)
    ranked = dist.init_from_env()
    lead = dist.rank() == 0
    batch_size = batch_size_option(batch_size)
    model_cfg, train_cfg = pipeline.resolve_config(preset, list(overrides), model=model, epochs=epochs,
                                                   batch_size=batch_size, lr=lr, seed=seed, threads=threads,
                                                   embedding_update=embedding_update, precision=precision,
                                                   checkpoint_every=checkpoint_every)
    schema = _schema(schema_path, fmt, min_count)
    if parent is not None:  # the bundle's fields (min_count may change) and model
        if schema_path is None:
            schema = parent.preprocessor.schema
            schema = schema.with_overrides(min_count=min_count) if min_count is not None else schema
        model_cfg = parent.model.cfg
    if ranked and not lead:
        dist.barrier()  # rank 0 reads, fits and caches the data first; the others then take it from the cache
    if streaming:
        prep = pipeline.prepare_streaming(train_path, fmt, schema, valid_path, valid_fraction, train_cfg.seed,
                                          on_bad_rows, cache_dir, not no_cache, shard_rows,
                                          parent=parent.preprocessor if parent else None)
    else:
        prep = pipeline.prepare(train_path, fmt, schema, valid_path, valid_fraction, train_cfg.seed, on_bad_rows,
                                cache_dir, not no_cache, parent=parent.preprocessor if parent else None)
    if ranked and lead:
        dist.barrier()
    pipeline.log(f"{prep.info['rows']:,} rows, {len(prep.fields)} fields, {prep.info['vocab_rows']:,} "
                 f"embedding rows; model {model_cfg.model}, preset {preset}")
    test = None
    if test_path:
        test = (pipeline.shard_file(test_path, fmt, prep.pre, on_bad_rows, cache_dir, shard_rows) if streaming
                else pipeline.encode_file(test_path, fmt, prep.pre, on_bad_rows))
    _, result = pipeline.train(prep, model_cfg, train_cfg, out, fmt, test, progress=not quiet,
                               extra_info={"preset": preset, "overrides": list(overrides)}, resume=resume,
                               init_from=parent, force=force)
    if not lead:
        return
    for split, m in result["metrics"].items():
        auc = f"{m['auc']:.4f}" if m["auc"] == m["auc"] else "undefined (one class)"
        click.echo(f"{split}: AUC {auc}  logloss {m['logloss']:.4f}  calibration "
                   f"{m['calibration']:.3f}  rows {m['rows']:,}")
    click.echo(f"bundle written to {out}")


def _torchrun(nproc: int) -> None:
    """Re-run this command under torchrun with ``nproc`` processes (and exit with its status)."""
    import subprocess

    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "deepfm", *argv]
    sys.exit(subprocess.call(cmd))


# ------------------------------------------------------------------------------------------- evaluate
@main.command()
@click.argument("bundle", type=click.Path(exists=True))
@click.argument("data", type=click.Path(exists=True))
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Default: the format the bundle was trained on.")
@click.option("--on-bad-rows", type=click.Choice(["error", "skip"]), default="error", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (auc, logloss, rows, ...).")
@friendly
def evaluate(bundle, data, fmt, on_bad_rows, as_json) -> None:
    """AUC, logloss and calibration of a bundle on labelled data.

    \b
    Example:
      deepfm evaluate runs/criteo test.txt --json
    """
    from deepfm.serve.predictor import Predictor
    from deepfm.train.metrics import evaluate as metrics

    pred = Predictor(bundle)
    res = pred.predict_file(data, fmt, on_bad_rows)
    if res.label is None:
        raise DeepFMError(f"{data}: no label column, cannot evaluate (use `deepfm predict` to score it)")
    m = metrics(res.label, res.probabilities)
    m["skipped_rows"] = res.skipped.count
    if as_json:
        click.echo(json.dumps(_jsonable(m)))
    else:
        if res.skipped.count:
            click.echo(res.skipped.summary(str(data)), err=True)
        for k, v in m.items():
            click.echo(f"{k:>14}: {v:.6f}" if isinstance(v, float) else f"{k:>14}: {v:,}")


# ------------------------------------------------------------------------------------------- predict
@main.command()
@click.argument("bundle", type=click.Path(exists=True))
@click.argument("data", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(), help="Output .parquet, .csv or .tsv file.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Default: the format the bundle was trained on.")
@click.option("--id-column", help="A column of DATA to copy into the output (e.g. id). "
                                  "For files without a header use the schema's column name.")
@click.option("--on-bad-rows", type=click.Choice(["error", "skip"]), default="error", show_default=True)
@click.option("--engine", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help="Run the model with torch, or export it to ONNX and run it with onnxruntime.")
@click.option("--threads", type=click.IntRange(min=0), default=0,
              help="Intra-op threads (default: the cores this process may use).")
@click.option("--block-mb", type=FiniteFloat(min=0.001, max=1024), default=16, show_default=True,
              help="Rows are read, scored and written in blocks of about this much input text.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--force", is_flag=True, help="Overwrite --out even if it is not an earlier `deepfm predict` output.")
@friendly
@outputs.interruptible
def predict(bundle, data, out, fmt, id_column, on_bad_rows, engine, threads, block_mb, quiet, force) -> None:
    """Score raw rows: write one click probability per row (streamed: memory stays bounded for input
    larger than RAM; the output appears only when complete).

    \b
    Examples:
      deepfm predict runs/criteo day2.txt --out scores.parquet
      deepfm predict runs/avazu test.csv --format avazu --id-column id --out scores.csv
      deepfm predict runs/criteo day2.parquet --format parquet --engine onnxruntime --out scores.parquet
    """
    import pyarrow as pa
    from tqdm import tqdm

    from deepfm.serve.predictor import Predictor

    writer = _BlockWriter(Path(out), force, inputs=(data,))  # checks --out before the model loads
    pred = Predictor(bundle, threads=threads, engine=engine)
    columns = [id_column] if id_column else None
    n, skipped = 0, None
    with outputs.locked(out):  # a second predict to the same --out is refused, never interleaved
        bar = tqdm(unit=" rows", unit_scale=True, desc="scoring", disable=quiet, file=sys.stderr)
        try:
            blocks = pred.iter_file(data, fmt, on_bad_rows, columns=columns, block_bytes=int(block_mb * (1 << 20)))
            for p, block in blocks:
                cols: dict[str, Any] = {c: block.extra[c] for c in columns or []}
                cols["probability"] = pa.array(p)
                writer.write(pa.table(cols))
                n += len(p)
                skipped = block.skipped
                bar.update(len(p))
            writer.close()
        except BaseException:  # errors, Ctrl-C and SIGTERM (outputs.interruptible): no temporary file is left
            writer.abort()
            raise
        finally:
            bar.close()
    if skipped is not None and skipped.count:
        click.echo(skipped.summary(str(data)), err=True)
    click.echo(f"wrote {n:,} predictions to {out}")


class _BlockWriter:
    """Append tables to a .parquet/.csv/.tsv under a unique temporary name beside ``out`` (created at the first
    write); ``close`` renames it into place, ``abort`` removes it (a failed run never leaves a partial output).
    An existing ``out`` is overwritten only if it is an earlier predict output (or with ``force``)."""

    MARK = {b"deepfm": b"predict"}  # Parquet schema metadata: what makes a file a predict output

    def __init__(self, out: Path, force: bool = False, inputs: tuple = ()) -> None:
        if out.suffix not in (".parquet", ".csv", ".tsv"):
            raise DeepFMError(f"--out {out}: use a .parquet, .csv or .tsv file name")
        outputs.check_file_out(out, self.ours, "predict output", force=force, inputs=inputs)
        self.out, self.tmp, self.writer = out, None, None

    @classmethod
    def ours(cls, path: Path) -> bool:
        """Parquet: our schema metadata; CSV/TSV: the header ends with the probability column."""
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
            return (schema.metadata or {}).get(b"deepfm") == b"predict" or schema.names[-1:] == ["probability"]
        with open(path, "rb") as fh:
            head = fh.read(1 << 16).split(b"\n", 1)[0].rstrip(b"\r")
        return head.split(b"\t" if path.suffix == ".tsv" else b",")[-1].strip(b'"') == b"probability"

    def write(self, table: Any) -> None:
        import os
        import tempfile

        import pyarrow.csv as pv
        import pyarrow.parquet as pq

        try:
            if self.writer is None:
                self.out.parent.mkdir(parents=True, exist_ok=True)
                fd, name = tempfile.mkstemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent)
                self.tmp = Path(name)
                os.close(fd)
                outputs.follow_umask(self.tmp, is_dir=False)  # mkstemp makes 0600
                if self.out.suffix == ".parquet":
                    self.writer = pq.ParquetWriter(self.tmp, table.schema.with_metadata(self.MARK))
                else:
                    opts = pv.WriteOptions(delimiter="\t" if self.out.suffix == ".tsv" else ",")
                    self.writer = pv.CSVWriter(self.tmp, table.schema, write_options=opts)
            self.writer.write_table(table)
        except outputs.WRITE_ERRORS as e:
            raise outputs.write_error(e, "the predictions", self.out) from None

    def close(self) -> None:
        import os

        if self.writer is not None:
            try:
                self.writer.close()
                with open(self.tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(self.tmp, self.out)
            except outputs.WRITE_ERRORS as e:
                raise outputs.write_error(e, "the predictions", self.out) from None

    def abort(self) -> None:
        import contextlib
        import os

        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)


# ------------------------------------------------------------------------------------------- serve / export
@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; 127.0.0.1 serves this machine only (use 0.0.0.0 to expose it).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="TCP port, 1-65535 (0, an ephemeral port, is refused: clients could not know it).")
@click.option("--workers", type=int, default=0,
              help="Server processes, each with the model (default: one per available core, at most 4).")
@click.option("--threads", type=int, default=0, help="Intra-op threads per worker (default: cores / workers).")
@click.option("--engine", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True)
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
def serve(bundle, host, port, workers, threads, engine, max_rows, max_body_mb, timeout_s, admin_token,
          admin_token_file, strict_fields, header_timeout_s, body_timeout_s, keep_alive_s, max_header_kb,
          max_connections, reload_timeout_s, log_level) -> None:
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
    cfg = ServeConfig(bundle=str(Path(bundle).resolve()), max_rows=max_rows,
                      max_body_bytes=int(max_body_mb * (1 << 20)), timeout_s=timeout_s,
                      admin_token=admin_token, threads=threads, engine=engine, strict_fields=strict_fields,
                      header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s, keep_alive_s=keep_alive_s,
                      max_header_bytes=max_header_kb << 10, max_connections=max_connections,
                      reload_timeout_s=reload_timeout_s)
    click.echo(f"serving {bundle} on http://{host}:{port} ({workers} worker(s), engine {engine}); "
               f"admin reload {'on' if admin_token else 'off'}", err=True)
    run_server(cfg, host=host, port=port, workers=workers, log_level=log_level)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("data", type=click.Path(exists=True))
@click.option("--rows", "n_rows", type=int, default=1, show_default=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Default: the format the bundle was trained on.")
@friendly
def request(bundle, data, n_rows, fmt) -> None:
    """Print a POST /v1/predict body made of the first rows of DATA (the raw values the model reads).

    \b
    Example:
      deepfm request runs/criteo test.txt --rows 2 > req.json
      curl -s localhost:8000/v1/predict -H 'content-type: application/json' -d @req.json
    """
    from deepfm.data import readers
    from deepfm.serve.bundle import load

    b = load(bundle)
    fmt = fmt or b.data_format
    if fmt is None:
        raise DeepFMError("the bundle records no data format; pass --format")
    block = next(readers.iter_read(data, fmt, b.preprocessor.schema, block_bytes=1 << 20))
    click.echo(json.dumps({"rows": _jsonable(block.table.slice(0, n_rows).to_pylist())}))


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True)
@click.option("--out", type=click.Path(), help="Output file (default: BUNDLE/../<bundle name>.onnx or .pt).")
@click.option("--check-rows", type=int, default=10000, show_default=True,
              help="Rows of random encoded input on which the export is checked against the torch model.")
@click.option("--force", is_flag=True, help="Overwrite --out even if it is not an earlier `deepfm export` file.")
@friendly
@outputs.interruptible
def export(bundle, fmt, out, check_rows, force) -> None:
    """Export a bundle's model to ONNX (or TorchScript) and check it against the torch model.

    The exported graph takes encoded inputs (idx int64 [batch, slots], val float32 [batch, slots]) and returns
    logit and probability [batch]; preprocessing.json in the bundle holds what encodes raw values.

    \b
    Example:
      deepfm export runs/criteo --format onnx --out criteo.onnx
    """
    import numpy as np

    from deepfm.serve.bundle import load
    from deepfm.serve.export import check_export, export_onnx, export_torchscript, is_export

    path = Path(out) if out else Path(bundle).resolve().parent / (Path(bundle).resolve().name
                                                                   + (".onnx" if fmt == "onnx" else ".pt"))
    if outputs.holds(Path(bundle), path):
        raise DeepFMError(f"--out {path} is inside the bundle {bundle}: write the export beside it")
    outputs.check_file_out(path, lambda p: is_export(p, fmt), f"{fmt} export", force=force, inputs=(bundle,))
    b = load(bundle)
    try:  # written and checked under a temporary name: a failed check leaves an earlier export at --out intact
        with outputs.locked(path), outputs.atomic_file(path, suffix=path.suffix) as tmp:
            (export_onnx if fmt == "onnx" else export_torchscript)(b.model, tmp)
            diff = check_export(b.model, tmp, fmt, rows=check_rows) if check_rows > 0 else float("nan")
            if np.isfinite(diff) and diff > 1e-5:
                raise DeepFMError(f"export check failed: max |p_{fmt} - p_torch| = {diff:.2e} > 1e-5; nothing "
                                  "written")
    except outputs.WRITE_ERRORS as e:
        raise outputs.write_error(e, "the export", path) from None
    click.echo(f"wrote {path}; max |p_{fmt} - p_torch| over {check_rows:,} random rows: {diff:.2e}")


# ------------------------------------------------------------------------------------------- info
@main.command()
@click.argument("bundle", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True)
@friendly
def info(bundle, as_json) -> None:
    """Describe a bundle: model, fields, vocabulary sizes, training metrics.

    \b
    Example:
      deepfm info runs/criteo
    """
    from deepfm.serve.bundle import load

    b = load(bundle)
    from deepfm.data.store import layout

    fields = [{"name": f.name, "kind": f.kind, "table_rows": f.size} for f in layout(b.preprocessor)]
    summary = {"path": str(b.path), "manifest": b.manifest, "model": b.model.cfg.to_dict(),
               "parameters": sum(p.numel() for p in b.model.parameters()), "fields": fields,
               "metrics": b.metrics, "best_epoch": b.training.get("best_epoch"),
               "data": b.training.get("data")}
    if as_json:
        click.echo(json.dumps(_jsonable(summary), indent=1))
        return
    m = b.manifest
    click.echo(f"bundle {b.path}: {m['model']} (format v{m['format_version']}, deepfm {m['deepfm_version']}, "
               f"created {m['created']}, data format "
               f"{m['data_format'] or 'none: saved from the Python API, give --format to predict or evaluate'})")
    click.echo(f"parameters: {summary['parameters']:,}; config: {json.dumps(summary['model'])}")
    click.echo(f"fields ({len(fields)}): " + ", ".join(f"{f['name']}[{f['kind']}:{f['table_rows']}]" for f in fields))
    for split, met in b.metrics.items():
        click.echo(f"{split}: AUC {met['auc']:.4f}  logloss {met['logloss']:.4f}  rows {met['rows']:,}")


# ------------------------------------------------------------------------------------------- synth / demo
@main.command()
@click.option("--rows", type=int, default=1_000_000, show_default=True, help="Total rows (train+valid+test).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="Output folder.")
@click.option("--vocab-scale", type=float, default=1.0, show_default=True, help="Scale every cardinality.")
@click.option("--valid-fraction", type=float, default=0.1, show_default=True)
@click.option("--test-fraction", type=float, default=0.1, show_default=True)
@click.option("--tail", type=float, default=0.0, show_default=True,
              help="Probability that a value of a large field is a one-off id (a large min-count-1 vocabulary).")
@friendly
def synth(rows, seed, out, vocab_scale, valid_fraction, test_fraction, tail) -> None:
    """Write Criteo-format synthetic train/valid/test TSVs from a seeded hidden model, plus oracle.json
    (the AUC/logloss of the true probabilities).

    \b
    Example:
      deepfm synth --rows 1000000 --seed 0 --out data/synth
    """
    from deepfm.synth import generate

    info = generate(out, rows=rows, seed=seed, vocab_scale=vocab_scale, valid_fraction=valid_fraction,
                    test_fraction=test_fraction, tail=tail)
    for split, s in info["splits"].items():
        click.echo(f"{split}: {s['rows']:,} rows, CTR {s['ctr']:.3f}, oracle AUC {s['oracle_auc']:.4f} "
                   f"logloss {s['oracle_logloss']:.4f}")
    click.echo(f"wrote {out}/{{train,valid,test}}.tsv and oracle.json")


@main.command()
@click.option("--rows", type=int, default=1_000_000, show_default=True)
@click.option("--out", default="demo", show_default=True, type=click.Path(), help="Working folder.")
@click.option("--preset", default="default", show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@friendly
def demo(rows, out, preset, epochs, seed) -> None:
    """Synthetic data + train + evaluate: prints the model's test AUC next to the oracle's.

    \b
    Example:
      deepfm demo                 # 1M rows, a few minutes on 2 cores
      deepfm demo --rows 200000   # quicker
    """
    from deepfm import pipeline
    from deepfm.synth import generate

    out = Path(out)
    data = out / "data"
    if (data / "oracle.json").exists() and json.loads((data / "oracle.json").read_text()).get("rows") == rows \
            and json.loads((data / "oracle.json").read_text()).get("seed") == seed:
        oracle = json.loads((data / "oracle.json").read_text())
        pipeline.log(f"reusing synthetic data in {data}")
    else:
        pipeline.log(f"generating {rows:,} synthetic Criteo-format rows into {data} ...")
        oracle = generate(data, rows=rows, seed=seed)
    model_cfg, train_cfg = pipeline.resolve_config(preset, epochs=epochs, seed=seed)
    prep = pipeline.prepare(data / "train.tsv", "criteo", None, data / "valid.tsv", seed=seed,
                            cache_dir=out / "cache")
    test = pipeline.encode_file(data / "test.tsv", "criteo", prep.pre)
    _, result = pipeline.train(prep, model_cfg, train_cfg, out / "model", "criteo", test,
                               extra_info={"preset": preset, "demo_rows": rows})
    t, o = result["metrics"]["test"], oracle["splits"]["test"]
    click.echo("")
    click.echo(f"{'':>8} {'test AUC':>9} {'logloss':>9}")
    click.echo(f"{'DeepFM':>8} {t['auc']:>9.4f} {t['logloss']:>9.4f}")
    click.echo(f"{'oracle':>8} {o['oracle_auc']:>9.4f} {o['oracle_logloss']:>9.4f}")
    click.echo(f"gap to oracle: AUC {o['oracle_auc'] - t['auc']:.4f}; bundle in {out / 'model'}")


# ------------------------------------------------------------------------------------------- schema
@main.group()
def schema() -> None:
    """Feature schema tools."""


@schema.command("infer")
@click.argument("data", type=click.Path(exists=True))
@click.option("--out", type=click.Path(), help="Write the schema here (.yaml or .json); default: print it.")
@click.option("--label", default=None, help="Label column (default: label/click/target/y if present).")
@click.option("--sample-rows", type=int, default=100_000, show_default=True)
@click.option("--min-count", type=click.IntRange(min=1), default=None,
              help="Values seen fewer times in training go to the field's OOV row (default: 10, the rule the "
                   "Python API and the criteo format use; docs/quality.md).")
@click.option("--hash-buckets", type=click.IntRange(min=1),
              help="Hash every categorical/multi field into this many buckets (no vocabulary pass: a quick start "
                   "on unknown or unbounded data, and streaming needs only one pass).")
@friendly
def schema_infer(data, out, label, sample_rows, min_count, hash_buckets) -> None:
    """Write a starting schema from a sample of a CSV/TSV (with header) or Parquet file.

    \b
    Example:
      deepfm schema infer logs.csv --out schema.yaml
    """
    import yaml

    from deepfm.data.infer import DEFAULT_MIN_COUNT, infer_schema

    mc = DEFAULT_MIN_COUNT if min_count is None else min_count
    s = infer_schema(data, label=label, sample_rows=sample_rows, min_count=mc, hash_buckets=hash_buckets)
    rule = (f"min_count {mc}: a categorical value seen fewer than {mc} times in training shares its field's OOV row"
            + (" (the default rule, as the Python API and the criteo format; --min-count to change)"
               if min_count is None else "") if hash_buckets is None else
            f"hashed into {hash_buckets:,} buckets (min_count 1)")
    if out:
        s.save(out)
        click.echo(f"wrote {out}: label {s.label!r}, {len(s.fields)} fields, {rule}; review it before training")
    else:
        click.echo(f"# {rule}\n" + yaml.safe_dump(s.to_dict(), sort_keys=False), nl=False)


if __name__ == "__main__":
    main()
