"""``deepfm evaluate``: AUC, logloss and calibration of a bundle on labelled data."""

from __future__ import annotations

import json

import click

from deepfm.commands._options import FORMATS, device_option, friendly, jsonable
from deepfm.errors import DeepFMError


@click.command("evaluate")
@click.argument("bundle", type=click.Path(exists=True))
@click.argument("data", type=click.Path(exists=True))
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Default: the format the bundle was trained on.")
@click.option("--on-bad-rows", type=click.Choice(["error", "skip"]), default="error", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (auc, logloss, rows, ...).")
@click.option("--weight-column", help="Column of per-row sample weights: every metric weighted (default: the "
                                     "bundle's train.weight_column, if the data has that column).")
@click.option("--group-column", help="Column of group keys (e.g. a user id): adds grouped AUC (gauc).")
@device_option(default="auto")
@friendly
def evaluate_command(bundle, data, fmt, on_bad_rows, as_json, weight_column=None, group_column=None,
                     device="auto") -> None:
    """AUC, logloss and calibration of a bundle on labelled data.

    \b
    Example:
      deepfm evaluate runs/criteo test.txt --json
    """
    from deepfm.serve.predictor import Predictor
    from deepfm.train.metrics import evaluate as metrics

    pred = Predictor(bundle, device=device)
    if weight_column is None:
        weight_column = pred.bundle.training.get("train", {}).get("weight_column")
        if weight_column and not _has_column(data, weight_column):
            weight_column = None  # the bundle's weight column is not in this data: unweighted
    if weight_column or group_column:
        res, weights, groups = _scored_with_side(pred, data, fmt, on_bad_rows, weight_column, group_column)
    else:
        res, weights, groups = pred.predict_file(data, fmt, on_bad_rows), None, None
    if res.label is None:
        raise DeepFMError(f"{data}: no label column, cannot evaluate (use `deepfm predict` to score it)")
    m = metrics(res.label, res.probabilities, weights, groups)
    m["skipped_rows"] = res.skipped.count
    if as_json:
        click.echo(json.dumps(jsonable(m)))
    else:
        if res.skipped.count:
            click.echo(res.skipped.summary(str(data)), err=True)
        for k, v in m.items():
            click.echo(f"{k:>14}: {v:.6f}" if isinstance(v, float) else f"{k:>14}: {v:,}")


def _has_column(path: str, column: str) -> bool:
    """Whether a file with a header names ``column`` (a weight column recorded in the bundle)."""
    try:
        if str(path).endswith(".parquet"):
            import pyarrow.parquet as pq

            return column in pq.ParquetFile(path).schema_arrow.names
        import gzip

        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:  # type: ignore[operator]
            head = fh.readline(1 << 20)
        return any(column == c.strip().strip('"') for c in head.replace("\t", ",").split(","))
    except OSError:
        return False


def _scored_with_side(pred, data, fmt, on_bad_rows, weight_column, group_column):  # type: ignore[no-untyped-def]
    """Score ``data`` block by block keeping its weight / group columns (passed through the reader)."""
    import numpy as np
    import pyarrow as pa

    from deepfm.data import readers
    from deepfm.data.side import group_codes, weights
    from deepfm.serve.predictor import Scored

    cols = [c for c in (weight_column, group_column) if c]
    probs, labels, ws, gs, skipped = [], [], [], [], readers.BadRows()
    for p, block in pred.iter_file(data, fmt, on_bad_rows, columns=cols, label_rules=True):
        probs.append(p)
        labels.append(block.label)
        if weight_column:
            ws.append(block.extra[weight_column])
        if group_column:
            gs.append(block.extra[group_column])
        skipped = block.skipped
    label = None if any(lab is None for lab in labels) else np.concatenate(labels)
    w = weights(pa.concat_arrays(ws), str(data), weight_column) if weight_column else None
    g = group_codes(pa.concat_arrays(gs)) if group_column else None
    return Scored(np.concatenate(probs), label, skipped), w, g
