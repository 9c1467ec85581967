"""``deepfm demo``: synthetic data, train and evaluate, the model's test AUC next to the oracle's."""

from __future__ import annotations

import json
from pathlib import Path

import click

from deepfm.commands._options import friendly


@click.command("demo")
@click.option("--rows", type=int, default=1_000_000, show_default=True)
@click.option("--out", default="demo", show_default=True, type=click.Path(), help="Working folder.")
@click.option("--preset", default="default", show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@friendly
def demo_command(rows, out, preset, epochs, seed) -> None:
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
