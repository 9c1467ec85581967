"""What several commands share: option types, option groups, the error wrapper and small argument helpers."""

from __future__ import annotations

import functools
import sys
from typing import Any

import click

from deepfm.config import FORMATS  # one definition, in config (the readers read these)
from deepfm.errors import DeepFMError


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


def device_option(fn=None, *, default: str | None = None):
    """--device {auto,cpu,cuda,cuda:N}: where the model runs (deepfm.device). ``default`` None: the
    configuration's (train.device, "auto"); commands without a configuration default to "auto"."""
    def apply(f):
        return click.option(
            "--device", default=default, metavar="auto|cpu|cuda|cuda:N", callback=_check_device,
            help="Where the model runs: cpu (the fused CPU kernels), cuda or cuda:N (a GPU), or auto (CUDA when "
                 "available, else the CPU)" + (f"; default {default}." if default else "; default: train.device, "
                                               "auto.") + " Bundles hold CPU tensors whatever the device.")(f)
    return apply(fn) if fn is not None else apply


def _check_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from deepfm.device import DEVICE_HELP, check_device_name

    if value is not None and check_device_name(value) is not None:
        raise click.BadParameter(f"{value!r} is not a device: use {DEVICE_HELP}", ctx, param)
    return value


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


def load_schema(path: str | None, fmt: str | None, min_count: int | None):
    from deepfm import schema as schema_mod
    from deepfm.data import readers

    s = schema_mod.load(path) if path else (readers.default_schema(fmt) if fmt else None)
    if s is not None and min_count is not None:
        s = s.with_overrides(min_count=min_count)
    return s


def jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [jsonable(v) for v in obj]
    return obj
