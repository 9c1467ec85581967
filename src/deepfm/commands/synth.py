"""``deepfm synth``: seeded synthetic Criteo-format data with its oracle (deepfm.synth)."""

from __future__ import annotations

import click

from deepfm.commands._options import friendly


@click.command("synth")
@click.option("--rows", type=int, default=1_000_000, show_default=True, help="Total rows (train+valid+test).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="Output folder.")
@click.option("--vocab-scale", type=float, default=1.0, show_default=True, help="Scale every cardinality.")
@click.option("--valid-fraction", type=float, default=0.1, show_default=True)
@click.option("--test-fraction", type=float, default=0.1, show_default=True)
@click.option("--tail", type=float, default=0.0, show_default=True,
              help="Probability that a value of a large field is a one-off id (a large min-count-1 vocabulary).")
@friendly
def synth_command(rows, seed, out, vocab_scale, valid_fraction, test_fraction, tail) -> None:
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
