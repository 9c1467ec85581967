"""``deepfm predict``: score raw rows into a .parquet/.csv/.tsv, streamed, published whole or not at all."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from deepfm import outputs
from deepfm.commands._options import FORMATS, FiniteFloat, device_option, friendly
from deepfm.errors import DeepFMError


@click.command("predict")
@click.argument("bundle", type=click.Path(exists=True))
@click.argument("data", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(), help="Output .parquet, .csv or .tsv file.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Default: the format the bundle was trained on.")
@click.option("--id-column", help="A column of DATA to copy into the output (e.g. id). "
                                  "For files without a header use the schema's column name.")
@click.option("--on-bad-rows", type=click.Choice(["error", "skip"]), default="error", show_default=True)
@click.option("--engine", type=click.Choice(["torch", "onnxruntime", "int8", "bf16", "auto"]), default="torch",
              show_default=True,
              help="Run the model with torch, or export it to ONNX and run it with onnxruntime; int8/bf16: the "
                   "MLP's hidden GEMMs in int8 or bf16 (parity against fp32 checked and printed on the first "
                   "10k rows); auto: int8 or bf16 where parity holds and it is faster here, else torch.")
@click.option("--threads", type=click.IntRange(min=0), default=0,
              help="Intra-op threads (default: the cores this process may use).")
@device_option(default="auto")
@click.option("--block-mb", type=FiniteFloat(min=0.001, max=1024), default=16, show_default=True,
              help="Rows are read, scored and written in blocks of about this much input text.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--force", is_flag=True, help="Overwrite --out even if it is not an earlier `deepfm predict` output.")
@friendly
@outputs.interruptible
def predict_command(bundle, data, out, fmt, id_column, on_bad_rows, engine, threads, block_mb, quiet, force,
                    device="auto") -> None:
    """Score raw rows: write one click probability per row (streamed: memory stays bounded for input
    larger than RAM; the output appears only when complete).

    \b
    Examples:
      deepfm predict runs/criteo day2.txt --out scores.parquet
      deepfm predict runs/avazu test.csv --format avazu --id-column id --out scores.csv
      deepfm predict runs/criteo day2.parquet --format parquet --engine onnxruntime --out scores.parquet
    """
    import pyarrow as pa
    from tqdm import tqdm

    from deepfm.serve.predictor import Predictor

    writer = _BlockWriter(Path(out), force, inputs=(data,))  # checks --out before the model loads
    pred = Predictor(bundle, threads=threads, engine=engine, device=device,
                     report=lambda line: click.echo(line, err=True))
    columns = [id_column] if id_column else None
    n, skipped = 0, None
    with outputs.locked(out):  # a second predict to the same --out is refused, never interleaved
        block_bytes = int(block_mb * (1 << 20))
        # A delimited text file is read in blocks of about block_bytes of its bytes: the bar counts bytes, so
        # it has a total and an ETA (rows as a postfix). Parquet and .gz: rows only. The bar appears with the
        # first block, so an error in the first rows prints no empty bar.
        size = Path(data).stat().st_size if Path(data).is_file() else 0
        by_bytes = size > 0 and Path(data).suffix not in (".parquet", ".gz")
        bar = None
        try:
            blocks = pred.iter_file(data, fmt, on_bad_rows, columns=columns, block_bytes=block_bytes)
            for p, block in blocks:
                cols: dict[str, Any] = {c: block.extra[c] for c in columns or []}
                cols["probability"] = pa.array(p)
                writer.write(pa.table(cols))
                n += len(p)
                skipped = block.skipped
                if bar is None:
                    bar = (tqdm(total=size, unit="B", unit_scale=True, desc="scoring", disable=quiet, file=sys.stderr)
                           if by_bytes else
                           tqdm(unit=" rows", unit_scale=True, desc="scoring", disable=quiet, file=sys.stderr))
                if by_bytes:
                    bar.update(min(block_bytes, size - bar.n))
                    bar.set_postfix_str(f"{n:,} rows", refresh=False)
                else:
                    bar.update(len(p))
            if bar is not None and by_bytes:
                bar.update(size - bar.n)
            writer.close()
        except BaseException:  # errors, Ctrl-C and SIGTERM (outputs.interruptible): no temporary file is left
            writer.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
    if skipped is not None and skipped.count:
        click.echo(skipped.summary(str(data)), err=True)
    click.echo(f"wrote {n:,} predictions to {out}")


class _BlockWriter:
    """Append tables to a .parquet/.csv/.tsv under a unique temporary name beside ``out`` (created at the first
    write); ``close`` renames it into place, ``abort`` removes it (a failed run never leaves a partial output).
    An existing ``out`` is overwritten only if it is an earlier predict output (or with ``force``)."""

    MARK = {b"deepfm": b"predict"}  # Parquet schema metadata: what makes a file a predict output

    def __init__(self, out: Path, force: bool = False, inputs: tuple = ()) -> None:
        if out.suffix not in (".parquet", ".csv", ".tsv"):
            raise DeepFMError(f"--out {out}: use a .parquet, .csv or .tsv file name")
        outputs.check_file_out(out, self.ours, "predict output", force=force, inputs=inputs)
        self.out, self.tmp, self.writer = out, None, None

    @classmethod
    def ours(cls, path: Path) -> bool:
        """Parquet: our schema metadata; CSV/TSV: the header ends with the probability column."""
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
            return (schema.metadata or {}).get(b"deepfm") == b"predict" or schema.names[-1:] == ["probability"]
        with open(path, "rb") as fh:
            head = fh.read(1 << 16).split(b"\n", 1)[0].rstrip(b"\r")
        return head.split(b"\t" if path.suffix == ".tsv" else b",")[-1].strip(b'"') == b"probability"

    def write(self, table: Any) -> None:
        import os
        import tempfile

        import pyarrow.csv as pv
        import pyarrow.parquet as pq

        try:
            if self.writer is None:
                self.out.parent.mkdir(parents=True, exist_ok=True)
                fd, name = tempfile.mkstemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent)
                self.tmp = Path(name)
                os.close(fd)
                outputs.follow_umask(self.tmp, is_dir=False)  # mkstemp makes 0600
                if self.out.suffix == ".parquet":
                    self.writer = pq.ParquetWriter(self.tmp, table.schema.with_metadata(self.MARK))
                else:
                    opts = pv.WriteOptions(delimiter="\t" if self.out.suffix == ".tsv" else ",")
                    self.writer = pv.CSVWriter(self.tmp, table.schema, write_options=opts)
            self.writer.write_table(table)
        except outputs.WRITE_ERRORS as e:
            raise outputs.write_error(e, "the predictions", self.out) from None

    def close(self) -> None:
        import os

        if self.writer is not None:
            try:
                self.writer.close()
                with open(self.tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(self.tmp, self.out)
            except outputs.WRITE_ERRORS as e:
                raise outputs.write_error(e, "the predictions", self.out) from None

    def abort(self) -> None:
        import contextlib
        import os

        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
