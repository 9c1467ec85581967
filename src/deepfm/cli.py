"""Compatibility: the command line lives in ``deepfm.commands`` (one module per command); ``deepfm.cli:main``
and ``python -m deepfm.cli`` keep working."""

from __future__ import annotations

from deepfm.commands import _Commands, main

__all__ = ["_Commands", "main"]

if __name__ == "__main__":
    main()
