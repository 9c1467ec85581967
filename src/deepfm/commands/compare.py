"""``deepfm compare``: the paper's Table 2 comparison (deepfm.compare) as a command."""

from __future__ import annotations

import click

from deepfm import outputs
from deepfm.commands._options import FORMATS, device_option, friendly, loading_options
from deepfm.config import MODEL_NAMES


@click.command("compare")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Input format (csv/tsv/parquet need --schema).")
@click.option("--train", "train_path", required=True, type=click.Path(), help="Training data.")
@click.option("--valid", "valid_path", type=click.Path(), help="Validation data (else --valid-fraction).")
@click.option("--valid-fraction", type=float, default=0.1, show_default=True,
              help="Seeded random share of --train held out for validation (early stopping) when --valid is not "
                   "given; the same split for every run.")
@click.option("--test", "test_path", required=True, type=click.Path(), help="Labelled test data (the table's numbers).")
@click.option("--schema", "schema_path", type=click.Path(), help="Feature schema (YAML/JSON).")
@click.option("--models", default="lr,fm,deepfm", show_default=True,
              help=f"Comma-separated models, in table order; any of {', '.join(MODEL_NAMES)} "
                   "(wdl = the paper's LR&DNN, fmdnn = FM&DNN, pnnstar = PNN*).")
@click.option("--seeds", type=int, default=3, show_default=True,
              help="Runs per model, with seeds 1..N (initialisation, shuffling, dropout; the split stays fixed).")
@click.option("--split-seed", type=int, default=2017, show_default=True,
              help="Seed of the --valid-fraction split (one split for all runs).")
@click.option("--preset", default="default", show_default=True, help="paper, bars, default, or a YAML file.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a preset option for every model, e.g. --set model.hidden=[400,400,400].")
@click.option("--epochs", type=int, help="Maximum epochs (early stopping on the validation metric).")
@loading_options
@device_option
@click.option("--streaming", is_flag=True,
              help="Out of core, as `deepfm train --streaming`: fit in one streaming pass, train from shards on disk.")
@click.option("--budget-minutes", type=float,
              help="Start no new run once this many minutes have passed; the report then lists the missing runs "
                   "(rerun the same command to add them).")
@click.option("--weight-column", help="Column of per-row sample weights: a weighted loss and weighted metrics.")
@click.option("--group-column", help="Column of group keys (e.g. a user id): adds the test GAUC to the tables.")
@click.option("--out", required=True, type=click.Path(), help="Output folder (rerun with the same --out to resume).")
@click.option("--force", is_flag=True, help="Write into --out even if it is a folder that is not a compare output.")
@friendly
@outputs.interruptible
def compare_command(fmt, train_path, valid_path, valid_fraction, test_path, schema_path, models, seeds, split_seed,
                    preset, overrides, epochs, threads, min_count, on_bad_rows, cache_dir, no_cache, streaming,
                    budget_minutes, out, force, weight_column=None, group_column=None, device=None) -> None:
    """Compare models as in the DeepFM paper's Table 2: every model on the same splits and preprocessing,
    N seeds each; writes results.csv, table.md/.csv (AUC and logloss mean ± std, RelaImpr vs LR), plots and
    one self-contained report.html. Resumable: rerunning the same command skips the runs already done.

    \b
    Examples:
      deepfm compare --format criteo --train train.txt --test test.txt --models lr,fm,deepfm --seeds 3 --out cmp/
      deepfm compare --format criteo --train train.txt --valid-fraction 0.1 --test test.txt \\
          --models lr,fm,fnn,ipnn,opnn,pnnstar,wdl,fmdnn,deepfm --seeds 5 --preset paper --out table2/
      deepfm compare --format avazu --train train.csv --valid valid.csv --test test.csv --budget-minutes 60 --out a/
    """
    from deepfm.compare import command_line, compare, table_markdown

    params = {"--format": fmt, "--schema": schema_path, "--train": train_path, "--valid": valid_path,
              "--valid-fraction": None if valid_path else valid_fraction, "--test": test_path,
              "--models": models, "--seeds": seeds, "--split-seed": split_seed, "--preset": preset,
              "--set": list(overrides), "--epochs": epochs, "--threads": threads, "--min-count": min_count,
              "--on-bad-rows": on_bad_rows if on_bad_rows != "error" else None, "--cache-dir": cache_dir,
              "--no-cache": no_cache, "--streaming": streaming, "--budget-minutes": budget_minutes,
              "--weight-column": weight_column, "--group-column": group_column, "--device": device, "--out": out}
    res = compare(train_path, test_path, out, fmt=fmt, models=models, seeds=seeds, valid_path=valid_path,
                  valid_fraction=valid_fraction, split_seed=split_seed, schema_path=schema_path, preset=preset,
                  overrides=list(overrides), epochs=epochs, threads=threads, min_count=min_count,
                  on_bad_rows=on_bad_rows, cache_dir=cache_dir, use_cache=not no_cache,
                  streaming=streaming, budget_minutes=budget_minutes, command=command_line(params), echo=click.echo,
                  force=force, weight_column=weight_column, group_column=group_column, device=device)
    click.echo("")
    click.echo(table_markdown(res.rows, "lr" in [r.model for r in res.runs]).rstrip())
    click.echo("")
    click.echo(f"{len(res.trained)} run(s) trained, {len(res.reused)} reused, {len(res.missing)} missing; "
               f"report: {res.out / 'report.html'}")
