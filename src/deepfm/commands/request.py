"""``deepfm request``: a POST /v1/predict body made of the first rows of a data file."""

from __future__ import annotations

import json

import click

from deepfm.commands._options import FORMATS, friendly, jsonable
from deepfm.errors import DeepFMError


@click.command("request")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("data", type=click.Path(exists=True))
@click.option("--rows", "n_rows", type=int, default=1, show_default=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Default: the format the bundle was trained on.")
@friendly
def request_command(bundle, data, n_rows, fmt) -> None:
    """Print a POST /v1/predict body made of the first rows of DATA (the raw values the model reads).

    \b
    Example:
      deepfm request runs/criteo test.txt --rows 2 > req.json
      curl -s localhost:8000/v1/predict -H 'content-type: application/json' -d @req.json
    """
    from deepfm.data import readers
    from deepfm.serve.bundle import load

    b = load(bundle)
    fmt = fmt or b.data_format
    if fmt is None:
        raise DeepFMError("the bundle records no data format; pass --format")
    block = next(readers.iter_read(data, fmt, b.preprocessor.schema, block_bytes=1 << 20))
    click.echo(json.dumps({"rows": jsonable(block.table.slice(0, n_rows).to_pylist())}))
