"""``deepfm info``: describe a bundle."""

from __future__ import annotations

import json

import click

from deepfm.commands._options import friendly, jsonable


@click.command("info")
@click.argument("bundle", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True)
@friendly
def info_command(bundle, as_json) -> None:
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
        click.echo(json.dumps(jsonable(summary), indent=1))
        return
    m = b.manifest
    click.echo(f"bundle {b.path}: {m['model']} (format v{m['format_version']}, deepfm {m['deepfm_version']}, "
               f"created {m['created']}, data format "
               f"{m['data_format'] or 'none: saved from the Python API, give --format to predict or evaluate'})")
    click.echo(f"parameters: {summary['parameters']:,}; config: {json.dumps(summary['model'])}")
    click.echo(f"fields ({len(fields)}): " + ", ".join(f"{f['name']}[{f['kind']}:{f['table_rows']}]" for f in fields))
    for split, met in b.metrics.items():
        click.echo(f"{split}: AUC {met['auc']:.4f}  logloss {met['logloss']:.4f}  rows {met['rows']:,}")
