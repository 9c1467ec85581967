"""``deepfm explain``: interaction map and field importance (deepfm.explain) as a command."""

from __future__ import annotations

import time
from pathlib import Path

import click

from deepfm.commands._options import FORMATS, friendly


@click.command("explain")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("data", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Default: the format the bundle was trained on.")
@click.option("--rows", type=click.IntRange(min=1), help="Use only the first N rows of DATA (default: all).")
@click.option("--permutation-rows", type=click.IntRange(min=0), default=100_000, show_default=True,
              help="Seeded uniform sample of rows scored for the permutation importance (0: skip it).")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Shuffles per field for the permutation importance (the CSV gets their mean and std).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample and the shuffles.")
@click.option("--on-bad-rows", type=click.Choice(["error", "skip"]), default="error", show_default=True)
@click.option("--threads", type=int, default=0, help="Intra-op threads (default: the cores this process may use).")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="Field pairs and fields to print.")
@friendly
def explain_command(bundle, data, out, fmt, rows, permutation_rows, repeats, seed, on_bad_rows, threads,
                    top) -> None:
    """Interaction map and field importance of a bundle on DATA.

    \b
    Writes to --out:
      interactions.csv / .png  mean |<e_i, e_j>| per field pair (FM part; fm, deepfm, fmdnn), as an F x F heatmap
      importance.csv / .png    per field: first order mean |w_i x_i|, FM mean |sum_j <e_i, e_j>|, and the
                               AUC drop when the field is shuffled across rows (labelled DATA only)
      explain.json             all of it, with notes on what was skipped
    Models without an FM part (lr, dnn, wdl, fnn, pnn*) get the importances only.

    \b
    Examples:
      deepfm explain runs/criteo valid.txt --out runs/criteo/explain
      deepfm explain runs/criteo day2.txt --rows 1000000 --permutation-rows 50000 --repeats 3 --out ex/
    """
    import numpy as np

    from deepfm.explain import explain_file, write_outputs

    t0 = time.perf_counter()
    ex = explain_file(bundle, data, fmt, rows, permutation_rows, repeats, seed, on_bad_rows, threads)
    written = write_outputs(ex, Path(out))
    for note in ex.notes:
        click.echo(f"note: {note}", err=True)
    if ex.interactions is not None and top:
        click.echo(f"strongest FM interactions (mean |<e_i, e_j>| over {ex.rows:,} rows):")
        for a, b, v in ex.top_pairs(top):
            click.echo(f"  {a:>12} x {b:<12} {v:.4g}")
    if ex.permutation is not None and top:
        click.echo(f"permutation importance (AUC {ex.base_auc:.4f} on {ex.permutation_rows:,} rows, drop when "
                   "shuffled):")
        for i in np.argsort(-ex.permutation, kind="stable")[:top]:
            click.echo(f"  {ex.fields[i]:>12} {ex.permutation[i]:+.4f}")
    click.echo(f"wrote {', '.join(p.name for p in written)} to {out} ({time.perf_counter() - t0:.1f} s)")
