"""``deepfm schema``: feature schema tools (``schema infer``)."""

from __future__ import annotations

import click

from deepfm.commands._options import friendly


@click.group("schema")
def schema_group() -> None:
    """Feature schema tools."""


@schema_group.command("infer")
@click.argument("data", type=click.Path(exists=True))
@click.option("--out", type=click.Path(), help="Write the schema here (.yaml or .json); default: print it.")
@click.option("--label", default=None, help="Label column (default: label/click/target/y if present).")
@click.option("--sample-rows", type=int, default=100_000, show_default=True)
@click.option("--min-count", type=click.IntRange(min=1), default=None,
              help="Values seen fewer times in training go to the field's OOV row (default: 10, the rule the "
                   "Python API and the criteo format use; docs/quality.md).")
@click.option("--hash-buckets", type=click.IntRange(min=1),
              help="Hash every categorical/multi field into this many buckets (no vocabulary pass: a quick start "
                   "on unknown or unbounded data, and streaming needs only one pass).")
@friendly
def infer_command(data, out, label, sample_rows, min_count, hash_buckets) -> None:
    """Write a starting schema from a sample of a CSV/TSV (with header) or Parquet file.

    \b
    Example:
      deepfm schema infer logs.csv --out schema.yaml
    """
    import yaml

    from deepfm.data.infer import DEFAULT_MIN_COUNT, infer_schema

    mc = DEFAULT_MIN_COUNT if min_count is None else min_count
    s = infer_schema(data, label=label, sample_rows=sample_rows, min_count=mc, hash_buckets=hash_buckets)
    rule = (f"min_count {mc}: a categorical value seen fewer than {mc} times in training shares its field's OOV row"
            + (" (the default rule, as the Python API and the criteo format; --min-count to change)"
               if min_count is None else "") if hash_buckets is None else
            f"hashed into {hash_buckets:,} buckets (min_count 1)")
    if out:
        s.save(out)
        click.echo(f"wrote {out}: label {s.label!r}, {len(s.fields)} fields, {rule}; review it before training")
    else:
        click.echo(f"# {rule}\n" + yaml.safe_dump(s.to_dict(), sort_keys=False), nl=False)
