"""``deepfm tune``: the Optuna search (deepfm.tune) as a command."""

from __future__ import annotations

import time
from pathlib import Path

import click

from deepfm import outputs
from deepfm.commands._options import (
    batch_size_option,
    device_option,
    friendly,
    input_format,
    input_options,
    loading_options,
)
from deepfm.config import MODEL_NAMES
from deepfm.errors import DeepFMError


@click.command("tune")
@input_options
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: study.db, trials.csv, best.yaml, study.json, history.png, importance.png.")
@click.option("--trials", type=click.IntRange(min=1), help="Trials in the study, in all (with --resume, those "
                                                           "already finished count).")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True),
              help="Start no new trial after this many minutes (a running trial finishes).")
@click.option("--preset", default="default", show_default=True,
              help="The base configuration the search varies (paper, bars, default, or a YAML file).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Fix a base option, e.g. --set model.batch_norm=false --set train.batch_size=2048.")
@click.option("--model", type=click.Choice(list(MODEL_NAMES)), default=None,
              help="Model kind (default: the preset's, deepfm). Kinds without an MLP (lr, fm) tune only the "
                   "embedding size, learning rate and embedding L2.")
@click.option("--epochs", type=click.IntRange(min=1), help="Maximum epochs per trial (early stopping as in train).")
@click.option("--batch-size", help="Rows per step, or 'auto'.")
@click.option("--seed", type=int, help="Seed of the split, the training and the TPE sampler (default: the preset's).")
@click.option("--max-neurons", type=click.IntRange(min=1), default=800, show_default=True,
              help="Neurons per layer are searched in 100..N, in steps of 100 if N is a multiple of 100 (else of "
                   "1); N < 100 (quick looks): N/2..N.")
@click.option("--max-layers", type=click.IntRange(min=1), default=5, show_default=True,
              help="Hidden layers are searched in 1..N.")
@click.option("--no-prune", is_flag=True, help="Run every trial to the end (no median pruning).")
@click.option("--resume", is_flag=True, help="Continue the study in --out (same options).")
@loading_options
@device_option
@click.option("--force", is_flag=True, help="Write into --out even if it is a folder that is not a tune output.")
@friendly
@outputs.interruptible
def tune_command(fmt, train_path, valid_path, valid_fraction, schema_path, out, trials, minutes, preset, overrides,
                 model, epochs, batch_size, seed, max_neurons, max_layers, no_prune, resume, threads, min_count,
                 on_bad_rows, cache_dir, no_cache, force, device=None) -> None:
    """Search DeepFM's hyper-parameters with Optuna (TPE, median pruning) for the best validation AUC.

    Axes (the paper's Sec. 3.3 study, plus three): dropout 0.1-0.9, neurons per layer, hidden layers,
    activation (relu, tanh, sigmoid), network shape (constant, increasing, decreasing, diamond: the
    layers x neurons total spread over the layers), embedding size, learning rate and embedding L2 (log
    scale). The data is read and encoded once; each trial trains on it and is scored on the validation rows.

    \b
    Writes to --out:
      best.yaml       the best trial as a preset: deepfm train --preset OUT/best.yaml ...
      trials.csv      one row per trial: state, validation AUC / logloss, epochs, seconds, parameters
      history.png     validation AUC per trial and the best so far
      importance.png  Optuna's parameter importances (or why there are none yet)
      study.json      all of the above, the search space and the setup; study.db: the study (for --resume)

    \b
    Examples:
      deepfm tune --format criteo --train train.txt --valid-fraction 0.1 --trials 50 --out runs/tune
      deepfm tune --format criteo --train train.txt --valid valid.txt --minutes 120 --epochs 3 --out runs/tune
      deepfm tune --format criteo --train train.txt --trials 50 --out runs/tune --resume   # after a stop
      deepfm train --format criteo --train train.txt --preset runs/tune/best.yaml --out runs/best
    """
    from deepfm import pipeline
    from deepfm.tune import SearchSpace, tune

    if trials is None and minutes is None:
        raise DeepFMError("give a budget: --trials N and/or --minutes M")
    fmt = input_format(fmt, schema_path, train_path)
    outputs.check_dir_out(out, ("tune",), force=force, inputs=(train_path, valid_path, schema_path))
    batch_size = batch_size_option(batch_size)
    model_cfg, train_cfg = pipeline.resolve_config(preset, list(overrides), model=model, epochs=epochs,
                                                   batch_size=batch_size, seed=seed, threads=threads,
                                                   device=device)
    from deepfm import schema as schema_mod
    from deepfm.data import readers

    schema = schema_mod.load(schema_path) if schema_path else readers.default_schema(fmt)
    if schema is not None and min_count is not None:
        schema = schema.with_overrides(min_count=min_count)
    prep = pipeline.prepare(train_path, fmt, schema, valid_path, valid_fraction, train_cfg.seed, on_bad_rows,
                            cache_dir, not no_cache)
    if prep.valid is None:
        raise DeepFMError("tuning needs validation data (--valid or --valid-fraction)")
    pipeline.log(f"{prep.info['rows']:,} rows, {len(prep.fields)} fields, {prep.info['vocab_rows']:,} embedding "
                 f"rows; tuning {model_cfg.model} from preset {preset}")
    setup = {"train": str(Path(train_path).resolve()), "valid": str(Path(valid_path).resolve()) if valid_path else None,
             "valid_fraction": None if valid_path else valid_fraction, "format": fmt,
             "schema": schema.to_dict() if schema else None, "preset": preset, "overrides": list(overrides)}
    t0 = time.perf_counter()
    try:
        study = tune(prep, model_cfg, train_cfg, out, trials, minutes, SearchSpace.capped(max_neurons, max_layers),
                     prune=not no_prune, resume=resume, setup=setup, log=pipeline.log, force=force)
    except KeyboardInterrupt:
        click.echo(f"interrupted: the finished trials are in {out}; rerun the same command with --resume to "
                   "continue", err=True)
        raise SystemExit(130) from None
    best = study.best_trial
    click.echo(f"best: trial {best.number}, validation AUC {best.value:.4f} ({len(study.trials)} trials, "
               f"{(time.perf_counter() - t0) / 60:.1f} min)")
    click.echo(f"wrote best.yaml, trials.csv, history.png, importance.png, study.json to {out}")
    again = [f"--format {fmt}"] + ([f"--schema {schema_path}"] if schema_path else []) + [f"--train {train_path}"]
    again += [f"--valid {valid_path}"] if valid_path else []
    click.echo(f"next: deepfm train --preset {Path(out) / 'best.yaml'} {' '.join(again)} --out MODEL_DIR")
