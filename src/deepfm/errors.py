"""The project's own error types. Every user-facing failure is one of these, with a message that names
the file, line and field when they are known, and says what to do."""

from __future__ import annotations


class DeepFMError(Exception):
    """Base class: the CLI prints these as one clean message (no traceback) and exits with status 2."""


class SchemaError(DeepFMError):
    """A schema file or schema object is invalid."""


class BundleError(DeepFMError):
    """A model bundle is missing, corrupt, or of another format version."""


class DataError(DeepFMError, ValueError):
    """Bad input data. Carries the location so callers and tests can check it. A ValueError too, as
    scikit-learn and its users expect of bad input."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.path, self.line, self.field, self.hint = path, line, field, hint
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        text = (": ".join([", ".join(where), message]) if where else message)
        if hint:
            text += f" ({hint})"
        super().__init__(text)
