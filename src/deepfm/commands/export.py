"""``deepfm export``: a bundle's model to ONNX or TorchScript, checked against the torch model."""

from __future__ import annotations

from pathlib import Path

import click

from deepfm import outputs
from deepfm.commands._options import friendly
from deepfm.errors import DeepFMError


@click.command("export")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True)
@click.option("--out", type=click.Path(), help="Output file (default: BUNDLE/../<bundle name>.onnx or .pt).")
@click.option("--check-rows", type=int, default=10000, show_default=True,
              help="Rows of random encoded input on which the export is checked against the torch model.")
@click.option("--force", is_flag=True, help="Overwrite --out even if it is not an earlier `deepfm export` file.")
@friendly
@outputs.interruptible
def export_command(bundle, fmt, out, check_rows, force) -> None:
    """Export a bundle's model to ONNX (or TorchScript) and check it against the torch model.

    The exported graph takes encoded inputs (idx int64 [batch, slots], val float32 [batch, slots]) and returns
    logit and probability [batch]; preprocessing.json in the bundle holds what encodes raw values.

    \b
    Example:
      deepfm export runs/criteo --format onnx --out criteo.onnx
    """
    import numpy as np

    from deepfm.serve.bundle import load
    from deepfm.serve.export import check_export, export_onnx, export_torchscript, is_export

    path = Path(out) if out else Path(bundle).resolve().parent / (Path(bundle).resolve().name
                                                                   + (".onnx" if fmt == "onnx" else ".pt"))
    if outputs.holds(Path(bundle), path):
        raise DeepFMError(f"--out {path} is inside the bundle {bundle}: write the export beside it")
    outputs.check_file_out(path, lambda p: is_export(p, fmt), f"{fmt} export", force=force, inputs=(bundle,))
    b = load(bundle)
    try:  # written and checked under a temporary name: a failed check leaves an earlier export at --out intact
        with outputs.locked(path), outputs.atomic_file(path, suffix=path.suffix) as tmp:
            (export_onnx if fmt == "onnx" else export_torchscript)(b.model, tmp)
            diff = check_export(b.model, tmp, fmt, rows=check_rows) if check_rows > 0 else float("nan")
            if np.isfinite(diff) and diff > 1e-5:
                raise DeepFMError(f"export check failed: max |p_{fmt} - p_torch| = {diff:.2e} > 1e-5; nothing "
                                  "written")
    except outputs.WRITE_ERRORS as e:
        raise outputs.write_error(e, "the export", path) from None
    click.echo(f"wrote {path}; max |p_{fmt} - p_torch| over {check_rows:,} random rows: {diff:.2e}")
