"""``deepfm schema infer``: a starting schema from a sample of a CSV/TSV/Parquet file."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from deepfm.data.readers import NUMERIC_RE
from deepfm.errors import DataError
from deepfm.schema import Field, Schema

LABEL_NAMES = ("label", "click", "clicked", "target", "y", "is_click")
# The one min_count rule for a schema inferred from raw logs (`deepfm schema infer`, DeepFMClassifier without a
# schema), the same as the criteo format's: a categorical value seen fewer than 10 times in the training rows
# shares the field's OOV row. Chosen by measurement (docs/quality.md, scripts/quality.py --min-count K, 3 seeds,
# validation AUC of the default preset / LR): Criteo sample 0.7392 / 0.7362 at 1, 0.7406 / 0.7391 at 2,
# 0.7379 / 0.7361 at 5, 0.7474 / 0.7433 at 10; Avazu sample 0.7077 / 0.7065, 0.7039 / 0.7035, 0.7024 / 0.7014,
# 0.7042 / 0.7018 (10: 2 seeds); the sum over both sets is highest at 10. Formats whose files already hold a
# curated vocabulary keep theirs (libfm, movielens: 1; avazu: 2, as BARS).
DEFAULT_MIN_COUNT = 10


def infer_schema(path: str | Path, label: str | None = None, sample_rows: int = 100_000,
                 min_count: int = DEFAULT_MIN_COUNT, max_numeric_levels: int = 20,
                 hash_buckets: int | None = None) -> Schema:
    """Numbers with many distinct values -> numeric (log transform if non-negative and heavy-tailed);
    text with a frequent separator ('|', ';', ',' inside a value) -> multi; everything else categorical.
    hash_buckets: hash every categorical and multi field into that many buckets ("hash everything": no
    vocabulary pass, unbounded values; a quick start on unknown data)."""
    path = Path(path)
    table = _sample(path, sample_rows)
    names = table.column_names
    if label is None:
        label = next((n for n in names if n.lower() in LABEL_NAMES), None)
        if label is None:
            raise DataError(f"cannot tell the label column among {names[:10]}...; pass --label", path=str(path))
    if label not in names:
        raise DataError(f"label column {label!r} not found", path=str(path))
    fields = infer_fields(table, {label}, min_count, max_numeric_levels)
    if hash_buckets is not None:
        fields = [Field(**{**f.__dict__, "hash_buckets": hash_buckets, "min_count": 1}) if f.kind != "numeric" else f
                  for f in fields]
    return Schema(fields=tuple(fields), label=label)


def infer_fields(table: pa.Table, exclude: set[str], min_count: int = DEFAULT_MIN_COUNT,
                 max_numeric_levels: int = 20) -> list[Field]:
    """Guess each column's kind from its values (see :func:`infer_schema`)."""
    fields = []
    for name in table.column_names:
        if name in exclude or name.lower() == "id":
            continue
        col = table.column(name)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            # A list column is a multi-valued field; the reader joins each list with `sep` before splitting,
            # so pick a separator that no value contains.
            values = pc.cast(pc.list_flatten(col), pa.string())
            sep = next((c for c in ("|", ";", "\x1f") if not pc.any(pc.match_substring(values, c)).as_py()), None)
            if sep is None:
                raise DataError(f"column {name!r} holds lists whose values contain '|', ';' and '\\x1f': "
                                "declare it as a multi field with another sep", field=name)
            fields.append(Field(name, "multi", sep=sep, min_count=min_count))
            continue
        non_null = pc.drop_null(pc.cast(col, pa.string()))
        numeric = len(non_null) > 0 and pc.all(pc.match_substring_regex(non_null, NUMERIC_RE)).as_py()
        distinct = pc.count_distinct(non_null).as_py()
        if numeric and distinct > max_numeric_levels:
            x = pc.cast(non_null, pa.float64())
            heavy = pc.min(x).as_py() >= 0 and pc.max(x).as_py() > 100 * max(pc.mean(x).as_py(), 1e-9) ** 0.5
            fields.append(Field(name, "numeric", transform="log" if heavy else "standardize"))
            continue
        for sep in ("|", ";"):
            share = pc.mean(pc.cast(pc.match_substring(non_null, sep), pa.float64())).as_py() or 0.0
            if share > 0.1:
                fields.append(Field(name, "multi", sep=sep, min_count=min_count))
                break
        else:
            fields.append(Field(name, "categorical", min_count=min_count))
    if not fields:
        raise DataError("no feature columns to infer a schema from")
    return fields


def _sample(path: Path, rows: int) -> pa.Table:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        return pa.Table.from_batches([next(pf.iter_batches(batch_size=rows))])
    import pyarrow.csv as pv

    delim = "\t" if path.suffix in (".tsv", ".txt") or path.name.endswith(".tsv.gz") else ","
    try:
        reader = pv.open_csv(path, read_options=pv.ReadOptions(block_size=8 << 20),
                             parse_options=pv.ParseOptions(delimiter=delim),
                             convert_options=pv.ConvertOptions(strings_can_be_null=True))
        batches, n = [], 0
        for b in reader:
            batches.append(b)
            n += b.num_rows
            if n >= rows:
                break
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read a sample: {e}", path=str(path)) from None
    return pa.Table.from_batches(batches).slice(0, rows)
