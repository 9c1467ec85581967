"""The ``deepfm`` command line. Errors of the project's own types print as one line (exit status 2)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import click

from deepfm.errors import DeepFMError

FORMATS = ("criteo", "avazu", "libfm", "movielens", "csv", "tsv", "parquet")


def friendly(fn):
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeepFMError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
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
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Input format (csv/tsv/parquet need --schema).")
@click.option("--train", "train_path", required=True, type=click.Path(exists=True), help="Training data.")
@click.option("--valid", "valid_path", type=click.Path(exists=True), help="Validation data (else --valid-fraction).")
@click.option("--valid-fraction", type=float, default=0.1, show_default=True,
              help="Seeded random share of --train held out for validation when --valid is not given.")
@click.option("--test", "test_path", type=click.Path(exists=True), help="Optional test data scored at the end.")
@click.option("--schema", "schema_path", type=click.Path(exists=True), help="Feature schema (YAML/JSON).")
@click.option("--out", required=True, type=click.Path(), help="Output bundle folder.")
@click.option("--model", type=click.Choice(["deepfm", "fm", "lr", "dnn"]), default=None,
              help="Model (default: the preset's, deepfm).")
@click.option("--preset", default="default", show_default=True, help="paper, bars, default, or a YAML file.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a preset option, e.g. --set model.dropout=0.2 --set train.lr=0.0005.")
@click.option("--epochs", type=int, help="Maximum epochs (early stopping on validation AUC).")
@click.option("--batch-size", help="Rows per step, or 'auto' (about 100 steps per epoch, 128-4096).")
@click.option("--lr", type=float)
@click.option("--seed", type=int, help="Seed for the split, initialisation, shuffling and dropout.")
@click.option("--threads", type=int, help="Intra-op CPU threads (default: the cores this process may use).")
@click.option("--embedding-update", type=click.Choice(["dense", "sparse", "auto"]),
              help="dense: Adam over whole tables (the reference); sparse: lazy Adam on the rows each batch "
                   "touches (cost independent of the vocabulary); auto: sparse from 1M table rows up.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]),
              help="bf16 autocast of the MLP (fast only on CPUs with AVX512-BF16/AMX, and on GPUs).")
@click.option("--min-count", type=int, help="Override every field's min_count.")
@click.option("--on-bad-rows", type=click.Choice(["error", "skip"]), default="error", show_default=True)
@click.option("--cache-dir", type=click.Path(), help="Encoded-store cache (default ~/.cache/deepfm, $DEEPFM_CACHE).")
@click.option("--no-cache", is_flag=True, help="Do not read or write the encoded-store cache.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly
def train(fmt, train_path, valid_path, valid_fraction, test_path, schema_path, out, model, preset, overrides,
          epochs, batch_size, lr, seed, threads, embedding_update, precision, min_count, on_bad_rows, cache_dir,
          no_cache, quiet) -> None:
    """Train a model and write a bundle.

    \b
    Examples:
      deepfm train --format criteo --train train.txt --valid-fraction 0.1 --out runs/criteo
      deepfm train --format avazu --train train.csv --valid valid.csv --preset paper --epochs 3 --out m/
      deepfm train --format csv --schema schema.yaml --train logs.csv --out m/ --set model.dropout=0.3
    """
    from deepfm import pipeline

    if fmt is None and schema_path is None:
        raise DeepFMError("pass --format (criteo, avazu, libfm, movielens) or --format csv/parquet with --schema")
    fmt = fmt or ("parquet" if str(train_path).endswith(".parquet") else "csv")
    if batch_size is not None and batch_size != "auto":
        if not batch_size.isdigit():
            raise DeepFMError(f"--batch-size must be a positive integer or 'auto', got {batch_size!r}")
        batch_size = int(batch_size)
    model_cfg, train_cfg = pipeline.resolve_config(preset, list(overrides), model=model, epochs=epochs,
                                                   batch_size=batch_size, lr=lr, seed=seed, threads=threads,
                                                   embedding_update=embedding_update, precision=precision)
    prep = pipeline.prepare(train_path, fmt, _schema(schema_path, fmt, min_count), valid_path, valid_fraction,
                            train_cfg.seed, on_bad_rows, cache_dir, not no_cache)
    pipeline.log(f"{prep.info['rows']:,} rows, {len(prep.fields)} fields, {prep.info['vocab_rows']:,} "
                 f"embedding rows; model {model_cfg.model}, preset {preset}")
    test = pipeline.encode_file(test_path, fmt, prep.pre, on_bad_rows) if test_path else None
    _, result = pipeline.train(prep, model_cfg, train_cfg, out, fmt, test, progress=not quiet,
                               extra_info={"preset": preset, "overrides": list(overrides)})
    for split, m in result["metrics"].items():
        click.echo(f"{split}: AUC {m['auc']:.4f}  logloss {m['logloss']:.4f}  calibration "
                   f"{m['calibration']:.3f}  rows {m['rows']:,}")
    click.echo(f"bundle written to {out}")


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
    p, res = pred.predict_file(data, fmt, on_bad_rows)
    if res.label is None:
        raise DeepFMError(f"{data}: no label column, cannot evaluate (use `deepfm predict` to score it)")
    m = metrics(res.label, p)
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
@click.option("--out", required=True, type=click.Path(), help="Output .parquet or .csv file.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Default: the format the bundle was trained on.")
@click.option("--id-column", help="A column of DATA to copy into the output (e.g. id). "
                                  "For files without a header use the schema's column name.")
@click.option("--on-bad-rows", type=click.Choice(["error", "skip"]), default="error", show_default=True)
@friendly
def predict(bundle, data, out, fmt, id_column, on_bad_rows) -> None:
    """Score raw rows: write one click probability per row.

    \b
    Example:
      deepfm predict runs/criteo day2.txt --out scores.parquet
      deepfm predict runs/avazu test.csv --format avazu --id-column id --out scores.csv
    """
    import pyarrow as pa

    from deepfm.serve.predictor import Predictor

    pred = Predictor(bundle)
    p, res = pred.predict_file(data, fmt, on_bad_rows)
    cols: dict[str, Any] = {}
    if id_column:
        cols[id_column] = _id_column(data, fmt or pred.data_format, id_column, res)
    cols["probability"] = pa.array(p)
    _write_table(pa.table(cols), Path(out))
    if res.skipped.count:
        click.echo(res.skipped.summary(str(data)), err=True)
    click.echo(f"wrote {len(p):,} predictions to {out}")


def _id_column(data: str, fmt: str, name: str, res: Any) -> Any:
    from deepfm.data.readers import read_column

    if res.skipped.count:
        raise DeepFMError("--id-column cannot be combined with skipped bad rows; fix the rows or drop --id-column")
    return read_column(data, fmt, name)


def _write_table(table: Any, out: Path) -> None:
    import os

    import pyarrow.csv as pv
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix in (".csv", ".tsv"):
        pv.write_csv(table, tmp, pv.WriteOptions(delimiter="\t" if out.suffix == ".tsv" else ","))
    elif out.suffix == ".parquet":
        pq.write_table(table, tmp)
    else:
        raise DeepFMError(f"--out {out}: use a .parquet, .csv or .tsv file name")
    os.replace(tmp, out)


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
               f"created {m['created']}, data format {m['data_format']})")
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
@click.option("--epochs", type=int, default=None)
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
@click.option("--min-count", type=int, default=1, show_default=True)
@friendly
def schema_infer(data, out, label, sample_rows, min_count) -> None:
    """Write a starting schema from a sample of a CSV/TSV (with header) or Parquet file.

    \b
    Example:
      deepfm schema infer logs.csv --out schema.yaml
    """
    import yaml

    from deepfm.data.infer import infer_schema

    s = infer_schema(data, label=label, sample_rows=sample_rows, min_count=min_count)
    if out:
        s.save(out)
        click.echo(f"wrote {out}: label {s.label!r}, {len(s.fields)} fields; review it before training")
    else:
        click.echo(yaml.safe_dump(s.to_dict(), sort_keys=False), nl=False)


if __name__ == "__main__":
    main()
