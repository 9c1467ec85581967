"""``deepfm train``: train a model and write a bundle (also what ``--nproc`` runs on every torchrun rank)."""

from __future__ import annotations

import sys

import click

from deepfm import outputs
from deepfm.commands._options import (
    BatchSize,
    FiniteFloat,
    batch_size_option,
    device_option,
    friendly,
    input_format,
    input_options,
    load_schema,
    loading_options,
)
from deepfm.config import MODEL_NAMES
from deepfm.errors import DeepFMError


@click.command("train")
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
@click.option("--precision", type=click.Choice(["fp32", "bf16", "auto"]),
              help="bf16 autocast of the MLP (fast only on CPUs with AVX512-BF16/AMX, and on GPUs); auto (the "
                   "default preset's): bf16 where this CPU runs the model's GEMMs clearly faster in it "
                   "(measured once, cached; training.json records the decision).")
@loading_options
@device_option
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
@click.option("--weight-column", help="Input column of per-row sample weights (finite, >= 0; the config key "
                                     "train.weight_column): a weighted loss, weighted validation metrics and so "
                                     "weighted early stopping.")
@click.option("--group-column", help="Input column of group keys (e.g. a user id) for grouped AUC (gauc) in the "
                                    "validation and test metrics.")
@click.option("--calibrate", type=click.Choice(["none", "platt", "isotonic"]),
              help="Calibrate the probabilities on the validation split's predictions after training (the config "
                   "key train.calibrate; default none): platt (logistic regression on the logit) or isotonic "
                   "(pool-adjacent-violators); stored in the bundle's calibration.json, applied by predict, "
                   "evaluate, serve and the Python API.")
@click.option("--negative-rate", type=FiniteFloat(0, 1, min_open=True), metavar="Q",
              help="Negative downsampling (train.negative_rate; 0 < Q <= 1, default 1): train on every positive "
                   "and a seeded random fraction Q of the training split's negatives (validation and test "
                   "untouched); served probabilities are corrected by p / (p + (1 - p) / Q).")
@click.option("--split", "split", default="random", show_default=True, metavar="random|time:COLUMN",
              help="How --train is split when there is no --valid: random rows (--valid-fraction), or by time: "
                   "train before, valid and test after cut points of COLUMN (the recommended protocol for logs).")
@click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              help="--split time: the latest fraction of the rows is a test split (default 0: none).")
@click.option("--valid-from", metavar="VALUE", help="--split time: rows from this time value on are validation "
                                                   "(instead of the latest --valid-fraction).")
@click.option("--test-from", metavar="VALUE", help="--split time: rows from this time value on are the test split.")
@click.option("--tensorboard", "tensorboard_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write TensorBoard scalars to DIR: the training loss every --tensorboard-every steps, the "
                   "validation metrics (AUC, logloss, monitored value) and the learning rate at each validation, "
                   "the test metrics at the end (needs the tensorboard package).")
@click.option("--tensorboard-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Steps between training-loss scalars in --tensorboard.")
@click.option("--mlflow/--no-mlflow", "use_mlflow", default=None,
              help="Log the run to MLflow: the resolved config as params, the validation metrics, the final "
                   "test metrics and the bundle path (tag deepfm.bundle); needs the mlflow package. Default: on "
                   "when MLFLOW_TRACKING_URI is set.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--force", is_flag=True, help="Replace --out even if it is a folder that is not a deepfm bundle "
                                            "(its files are deleted).")
@friendly
@outputs.interruptible
def train_command(fmt, train_path, valid_path, valid_fraction, test_path, schema_path, out, model, preset, overrides,
          epochs, batch_size, lr, seed, threads, embedding_update, precision, min_count, on_bad_rows, cache_dir,
          no_cache, streaming, shard_rows, init_from, nproc, checkpoint_every, resume, quiet, force, calibrate=None,
          negative_rate=None, weight_column=None,
          group_column=None, split="random", test_fraction=0.0, valid_from=None, test_from=None, tensorboard_dir=None,
          tensorboard_every=50, use_mlflow=None, device=None) -> None:
    """Train a model and write a bundle.

    \b
    Examples:
      deepfm train --format criteo --train train.txt --valid-fraction 0.1 --out runs/criteo
      deepfm train --format avazu --train train.csv --valid valid.csv --preset paper --epochs 3 --out m/
      deepfm train --format csv --schema schema.yaml --train logs.csv --out m/ --set model.dropout=0.3
      deepfm train --format csv --schema s.yaml --train logs.csv --split time:day --valid-from 2024-05-06 \
        --test-from 2024-05-07 --weight-column w --group-column user_id --out m/
    """
    from deepfm import pipeline
    from deepfm.train import distributed as dist
    from deepfm.train.callbacks import tracking

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
    batch_size = batch_size_option(batch_size)
    model_cfg, train_cfg = pipeline.resolve_config(preset, list(overrides), model=model, epochs=epochs,
                                                   batch_size=batch_size, lr=lr, seed=seed, threads=threads,
                                                   embedding_update=embedding_update, precision=precision,
                                                   negative_rate=negative_rate, calibrate=calibrate,
                                                   checkpoint_every=checkpoint_every, weight_column=weight_column,
                                                   device=device)
    from deepfm.device import resolve_device

    ranked = dist.init_from_env(resolve_device(train_cfg.device))  # nccl only when training on CUDA
    lead = dist.rank() == 0
    # before reading data: a missing tensorboard/mlflow package is an error now, not after the preprocessing
    trackers = tracking(tensorboard_dir, use_mlflow, tensorboard_every,
                        {"data.train": train_path, "data.format": fmt, "preset": preset}) if lead else []
    from deepfm.data.side import SideColumns

    side = SideColumns(train_cfg.weight_column, group_column)
    if streaming and (side or split != "random"):
        raise DeepFMError("--weight-column, --group-column and --split time are not available with --streaming "
                          "yet (the shards carry no side columns): train in memory, without --streaming")
    if streaming and train_cfg.negative_rate != 1:
        raise DeepFMError("--negative-rate is not available with --streaming yet: train in memory, without "
                          "--streaming")
    if test_path and (test_fraction or test_from is not None):
        raise DeepFMError("--test FILE and a time-split test part (--test-fraction / --test-from): give one")
    schema = load_schema(schema_path, fmt, min_count)
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
                                cache_dir, not no_cache, parent=parent.preprocessor if parent else None, side=side,
                                split=split, test_fraction=test_fraction, valid_from=valid_from, test_from=test_from)
    if ranked and lead:
        dist.barrier()
    pipeline.log(f"{prep.info['rows']:,} rows, {len(prep.fields)} fields, {prep.info['vocab_rows']:,} "
                 f"embedding rows; model {model_cfg.model}, preset {preset}")
    test = None
    if test_path:
        test = (pipeline.shard_file(test_path, fmt, prep.pre, on_bad_rows, cache_dir, shard_rows) if streaming
                else pipeline.encode_file(test_path, fmt, prep.pre, on_bad_rows, side=side))
    _, result = pipeline.train(prep, model_cfg, train_cfg, out, fmt, test, progress=not quiet,
                               extra_info={"preset": preset, "overrides": list(overrides)}, resume=resume,
                               init_from=parent, force=force, callbacks=tuple(trackers))
    if not lead:
        return
    for part, m in result["metrics"].items():
        auc = f"{m['auc']:.4f}" if m["auc"] == m["auc"] else "undefined (one class)"
        extra = "".join(f"  {k.upper()} {m[k]:.4f}" for k in ("ne", "gauc", "ece")
                        if m.get(k, float("nan")) == m.get(k))
        click.echo(f"{part}: AUC {auc}  logloss {m['logloss']:.4f}{extra}  calibration "
                   f"{m['calibration']:.3f}  rows {m['rows']:,}" + ("  (weighted)" if "weight_sum" in m else ""))
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
