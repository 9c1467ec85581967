"""The ``deepfm`` command line: the group ``main``, one module per command, shared options in ``_options``.

The top layer: commands import the library (pipeline, serve, train, data, ...), nothing in the library imports
commands (or click). Errors of the project's own types print as one line (exit status 2).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from deepfm.errors import DeepFMError


class _Commands(click.Group):
    """The paper-comparison tools load only when used (``deepfm --help`` and every other command stay free of
    their imports: optuna, matplotlib, torch); the other commands are light and registered below."""

    lazy = {"compare": "deepfm.commands.compare:compare_command", "explain": "deepfm.commands.explain:explain_command",
            "tune": "deepfm.commands.tune:tune_command"}
    # What `deepfm --help` lists for them: importing the modules for their docstrings would import torch
    # (seconds). tests/test_cli_help.py checks these against the commands' own help.
    lazy_help = {"compare": "Compare models as in the DeepFM paper's Table 2: every model on the same splits.",
                 "explain": "Interaction map and field importance of a bundle on DATA.",
                 "tune": "Search DeepFM's hyper-parameters with Optuna (TPE, median pruning)."}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))  # as click's own listing
        rows = []
        for name in names:
            if name in self.lazy and name not in self.commands:
                rows.append((name, click.utils.make_default_short_help(self.lazy_help[name], limit)))
                continue
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            import importlib

            module, attr = self.lazy[name].split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                return None
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        """Every user mistake ends as one ``error: ...`` line and exit status 2: a bad option value or usage
        (click's three-line usage message), and any library error (DeepFMError and its subclasses in
        deepfm.errors) that a command did not already turn into one."""
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            raise _OneLine(e.format_message() + where) from None
        except DeepFMError as e:
            raise _OneLine(str(e)) from None

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        """click's main; and when it runs as the process itself (no ``args``: the console script, ``python -m
        deepfm``), an error exit ends without the C++ static destructors. Native worker pools (Arrow's, OpenMP)
        still winding down there abort a busy machine's run after its clean error line: "terminate called
        without an active exception", exit 134 instead of 2. Python's exit handlers still run first."""
        if args is not None:  # in-process callers (CliRunner, scripts) keep the normal exit
            return super().main(args, *rest, **kwargs)
        try:
            return super().main(args, *rest, **kwargs)
        except SystemExit as e:
            if e.code is None or e.code == 0:
                raise
            _error_exit(e.code)


def _error_exit(code: object) -> None:
    """Exit with ``code`` after the atexit handlers (logging, temporary files) and flushed output, but
    without interpreter teardown, where native threads alive at exit can abort the process."""
    import atexit
    import os

    if not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class _OneLine(click.ClickException):
    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="deepfm")
def main() -> None:
    """deepfm: paper-faithful DeepFM for click-through-rate prediction, from raw logs to a saved model.

    \b
    Quick start (about a few minutes on 2 cores):
      deepfm demo
    Real data:
      deepfm train --format criteo --train train.txt --valid-fraction 0.1 --out model/
      deepfm evaluate model/ test.txt --json
      deepfm predict model/ new.txt --out scores.parquet
    """


def _register() -> None:
    """The light commands: each module imports only click and light deepfm modules at its top (the library it
    runs is imported inside the command)."""
    from deepfm.commands.demo import demo_command
    from deepfm.commands.evaluate import evaluate_command
    from deepfm.commands.export import export_command
    from deepfm.commands.info import info_command
    from deepfm.commands.predict import predict_command
    from deepfm.commands.request import request_command
    from deepfm.commands.schema import schema_group
    from deepfm.commands.serve import serve_command
    from deepfm.commands.synth import synth_command
    from deepfm.commands.train import train_command

    for cmd in (train_command, evaluate_command, predict_command, serve_command, request_command, export_command,
                info_command, synth_command, demo_command, schema_group):
        main.add_command(cmd)


_register()
