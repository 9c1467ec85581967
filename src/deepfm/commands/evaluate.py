"""``deepfm evaluate``: AUC, logloss and calibration of a bundle on labelled data."""

from __future__ import annotations

import json

import click

from deepfm.commands._options import FORMATS, friendly, jsonable
from deepfm.errors import DeepFMError


@click.command("evaluate")
@click.argument("bundle", type=click.Path(exists=True))
@click.argument("data", type=click.Path(exists=True))
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Default: the format the bundle was trained on.")
@click.option("--on-bad-rows", type=click.Choice(["error", "skip"]), default="error", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (auc, logloss, rows, ...).")
@friendly
def evaluate_command(bundle, data, fmt, on_bad_rows, as_json) -> None:
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
        click.echo(json.dumps(jsonable(m)))
    else:
        if res.skipped.count:
            click.echo(res.skipped.summary(str(data)), err=True)
        for k, v in m.items():
            click.echo(f"{k:>14}: {v:.6f}" if isinstance(v, float) else f"{k:>14}: {v:,}")
