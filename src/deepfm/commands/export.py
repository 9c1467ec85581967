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
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Write the int8 model (ONNX only; onnxruntime's dynamic quantisation of the MLP's hidden "
                   "layers after the first, as `deepfm predict --engine int8`); its parity against fp32 is "
                   "printed, with a warning beyond max |dp| 2e-3.")
@friendly
@outputs.interruptible
def export_command(bundle, fmt, out, check_rows, force, quantize=None) -> None:
    """Export a bundle's model to ONNX (or TorchScript) and check it against the torch model.

    The exported graph takes encoded inputs (idx int64 [batch, slots], val float32 [batch, slots]) and returns
    logit and probability [batch]; preprocessing.json in the bundle holds what encodes raw values. The graph is
    the model alone: when the bundle has a calibration.json (--negative-rate, --calibrate), it is written beside
    the export as OUT.calibration.json, a post-processing step to apply to the graph's logit
    (docs/bundle-format.md; deepfm.calibration.PostProcess.from_dict(...).from_logits(logit)).

    \b
    Example:
      deepfm export runs/criteo --format onnx --out criteo.onnx
    """
    import numpy as np

    from deepfm.serve.bundle import load
    from deepfm.serve.export import check_export, export_onnx, export_torchscript, is_export

    if quantize and fmt != "onnx":
        raise DeepFMError(f"--quantize {quantize} writes ONNX: use --format onnx")
    suffix = (".int8.onnx" if quantize else ".onnx") if fmt == "onnx" else ".pt"
    path = Path(out) if out else Path(bundle).resolve().parent / (Path(bundle).resolve().name + suffix)
    if outputs.holds(Path(bundle), path):
        raise DeepFMError(f"--out {path} is inside the bundle {bundle}: write the export beside it")
    outputs.check_file_out(path, lambda p: is_export(p, fmt), f"{fmt} export", force=force, inputs=(bundle,))
    b = load(bundle)
    if not b.postprocess.identity:  # before anything is written
        outputs.check_file_out(calibration_path(path), _ours, "calibration file", force=force)
    try:  # written and checked under a temporary name: a failed check leaves an earlier export at --out intact
        with outputs.locked(path), outputs.atomic_file(path, suffix=path.suffix) as tmp:
            if quantize:
                from deepfm.serve.quantize import export_onnx_int8

                export_onnx_int8(b.model, tmp)
            else:
                (export_onnx if fmt == "onnx" else export_torchscript)(b.model, tmp)
            diff = check_export(b.model, tmp, fmt, rows=check_rows) if check_rows > 0 else float("nan")
            if np.isfinite(diff) and diff > 1e-5 and not quantize:
                raise DeepFMError(f"export check failed: max |p_{fmt} - p_torch| = {diff:.2e} > 1e-5; nothing "
                                  "written")
    except outputs.WRITE_ERRORS as e:
        raise outputs.write_error(e, "the export", path) from None
    if quantize:
        from deepfm.serve.quantize import MAX_DP

        click.echo(f"wrote {path} ({quantize}); max |p_{quantize} - p_fp32| over {check_rows:,} random rows: "
                   f"{diff:.2e} (parity target <= {MAX_DP:g})")
        if np.isfinite(diff) and diff > MAX_DP:
            click.echo(f"warning: the {quantize} export misses the parity target (max |dp| {diff:.2e} > "
                       f"{MAX_DP:g}); compare it on your data with `deepfm predict --engine {quantize}`", err=True)
    else:
        click.echo(f"wrote {path}; max |p_{fmt} - p_torch| over {check_rows:,} random rows: {diff:.2e}")
    _calibration_beside(b, path)


def calibration_path(path: Path) -> Path:
    return path.with_name(path.name + ".calibration.json")


def _ours(p: Path) -> bool:
    import json

    from deepfm.calibration import FORMAT

    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _calibration_beside(b, path: Path) -> None:  # type: ignore[no-untyped-def]
    """The bundle's post-processing (calibration.json) beside the export, or an earlier one of ours removed
    when the bundle has none (a stale file would be applied to the wrong model)."""
    import json

    side = calibration_path(path)
    post = b.postprocess
    if post.identity:
        if side.is_file() and _ours(side):
            side.unlink()
            click.echo(f"removed {side}, left by an earlier export: this bundle has no calibration")
        return
    try:
        outputs.write_text(side, json.dumps(post.to_dict(), indent=1))
    except outputs.WRITE_ERRORS as e:
        raise outputs.write_error(e, "the calibration file", side) from None
    steps = ([f"negative-rate correction (q = {post.negative_rate:g})"] if post.negative_rate != 1 else []) + \
        ([f"{post.method} calibration"] if post.method != "none" else [])
    click.echo(f"wrote {side}: the graph outputs the uncorrected model; apply its {' then '.join(steps)} to the "
               "graph's logit (docs/bundle-format.md), as deepfm predict/serve do")
