"""`deepfm --help` lists every command without importing torch (issue 20.6: it took 2.7 s)."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from deepfm.cli import _Commands, main


def test_top_level_help_does_not_import_torch() -> None:
    code = ("import sys; from deepfm.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'deepfm --help imported torch'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("train", "predict", "serve", "compare", "explain", "tune"):
        assert f"  {name} " in out.stdout


def test_lazy_listing_matches_each_command_help() -> None:
    group = main
    assert isinstance(group, _Commands)
    for name, short in _Commands.lazy_help.items():
        cmd = group.get_command(None, name)  # type: ignore[arg-type]
        assert cmd is not None
        text = " ".join((cmd.help or "").split())
        assert text.startswith(short.rstrip(".")), (name, short, text[:120])


def test_lazy_commands_still_run() -> None:
    res = CliRunner().invoke(main, ["tune", "--help"])
    assert res.exit_code == 0 and "Optuna" in res.output
