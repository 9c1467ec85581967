"""What the fields are: a feature schema declared as data (YAML or JSON) and validated with clear messages.

A field is one of
- ``categorical``: one token per row -> one embedding row. Options: ``min_count`` (rarer values go to the
  OOV index), ``hash_buckets`` (no vocabulary: ``hash(value) % buckets``).
- ``numeric``: one number per row -> ``value x vector`` (one learned vector per field). Options:
  ``transform`` = ``none`` | ``log`` (sign(x) * log1p(|x|)) | ``standardize`` (fitted mean/std) |
  ``bucketize`` (Criteo-style: x > 2 -> floor(ln(x)^2), else floor(x); the field then becomes categorical and
  ``min_count`` applies).
- ``multi``: a list of tokens in one column, split on ``sep``, truncated to ``max_len``, pooled with
  ``mean`` or ``sum`` into one field embedding.

Missing values are explicit: an empty or null categorical/multi value maps to the field's MISSING index;
a missing numeric value uses a separate learned "missing" vector of the field (value 1) instead of value x
vector. Unseen or rare values map to the field's OOV index.
"""

from __future__ import annotations

import json
import reprlib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from deepfm.errors import SchemaError

KINDS = ("categorical", "numeric", "multi")
TRANSFORMS = ("none", "log", "standardize", "bucketize")
POOLINGS = ("mean", "sum")

# Reserved per-field indices of every vocabulary-backed field (categorical, bucketized, multi).
OOV = 0
MISSING = 1
N_RESERVED = 2

MAX_SCHEMA_BYTES = 4 << 20  # a schema of 10,000 fields is about 0.5 MB
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 120
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = _SHORT.maxset = 8
_SHORT.maxlevel = 3


def short(value: Any, limit: int = 200) -> str:
    """A bounded ``repr`` for messages: never the whole of a (possibly huge) value, at most ``limit``
    characters, built without first writing the full repr."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class NoAliasLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader without aliases (``*name``): a few nested aliases expand a 500-byte file into
    gigabytes ("billion laughs"), and a schema never needs them. Refused as the parser meets the first."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not allowed; write the values out",
                self.peek_event().start_mark)
        return super().compose_node(parent, index)


def yaml_problem(e: yaml.YAMLError) -> str:
    """One short line for a YAML error: what and where (PyYAML's own text spans lines and quotes input)."""
    mark = getattr(e, "problem_mark", None)
    what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return (what if len(what) <= 300 else what[:297] + "...") + where


@dataclass(frozen=True)
class Field:
    """One input field. ``column`` is the source column (defaults to ``name``)."""

    name: str
    kind: str = "categorical"
    column: str | None = None
    min_count: int = 1
    hash_buckets: int | None = None
    transform: str = "none"
    sep: str = "|"
    max_len: int = 8
    pooling: str = "mean"

    @property
    def source(self) -> str:
        return self.column or self.name

    @property
    def encoded_kind(self) -> str:
        """How the field is stored and embedded: ``cat``, ``num`` or ``multi``."""
        if self.kind == "numeric":
            return "cat" if self.transform == "bucketize" else "num"
        return "cat" if self.kind == "categorical" else "multi"

    def to_dict(self) -> dict[str, Any]:
        """Only the options that differ from the defaults, so schema files stay short."""
        default = Field(name=self.name)
        out = {"name": self.name, "kind": self.kind}
        for k, v in asdict(self).items():
            if k not in out and v != getattr(default, k):
                out[k] = v
        return out


@dataclass(frozen=True)
class Schema:
    """The label column and the ordered input fields. ``label`` may be absent in data used for scoring."""

    fields: tuple[Field, ...]
    label: str = "label"
    negative_label: int = 0  # libFM data uses -1 for negatives
    label_map: tuple[tuple[str, int], ...] = ()  # text label -> 1/0, e.g. (("yes", 1), ("no", 0))
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        validate(self)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label}
        if self.negative_label != 0:
            out["negative_label"] = self.negative_label
        if self.label_map:
            out["label_map"] = dict(self.label_map)
        out["fields"] = [f.to_dict() for f in self.fields]
        return out

    def with_overrides(self, **options: Any) -> Schema:
        """A copy with ``options`` (e.g. ``min_count=10``) applied to every field where they make sense."""
        new = []
        for f in self.fields:
            d = asdict(f)
            for k, v in options.items():
                if k == "min_count" or (k == "hash_buckets" and f.encoded_kind != "num"):
                    d[k] = v
            new.append(Field(**d))
        return replace(self, fields=tuple(new))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = (
            json.dumps(self.to_dict(), indent=2)
            if path.suffix == ".json"
            else yaml.safe_dump(self.to_dict(), sort_keys=False)
        )
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


_FIELD_KEYS = {f.name for f in fields(Field)}


def validate(schema: Schema) -> None:
    """Raise SchemaError naming the field and option for any invalid setting."""
    if not schema.fields:
        raise SchemaError("schema has no fields: declare at least one field under 'fields'")
    seen: set[str] = set()
    for i, f in enumerate(schema.fields):
        where = f"fields[{i}] ({short(f.name)})"
        if not isinstance(f.name, str) or not f.name:
            raise SchemaError(f"fields[{i}]: 'name' must be a non-empty string")
        if f.name in seen:
            raise SchemaError(f"{where}: duplicated field name {short(f.name)}; field names must be unique")
        seen.add(f.name)
        if f.column is not None and (not isinstance(f.column, str) or not f.column):
            raise SchemaError(f"{where}: 'column' must be a non-empty string (the source column), got "
                              f"{short(f.column)}")
        if f.name == schema.label or f.source == schema.label:
            raise SchemaError(f"{where}: the label column {short(schema.label)} cannot also be a feature")
        if f.kind not in KINDS:
            raise SchemaError(f"{where}: unknown kind {short(f.kind)} (expected one of {', '.join(KINDS)})")
        if f.transform not in TRANSFORMS:
            raise SchemaError(
                f"{where}: unknown transform {short(f.transform)} (expected one of {', '.join(TRANSFORMS)})"
            )
        if f.transform != "none" and f.kind != "numeric":
            raise SchemaError(f"{where}: transform {short(f.transform)} only applies to numeric fields")
        if f.kind == "numeric" and f.hash_buckets is not None:
            raise SchemaError(f"{where}: hash_buckets does not apply to numeric fields")
        if not isinstance(f.min_count, int) or isinstance(f.min_count, bool) or f.min_count < 1:
            raise SchemaError(f"{where}: min_count must be an integer >= 1, got {short(f.min_count)}")
        if f.hash_buckets is not None and (
            not isinstance(f.hash_buckets, int) or isinstance(f.hash_buckets, bool) or f.hash_buckets < 1
        ):
            raise SchemaError(f"{where}: hash_buckets must be a positive integer, got {short(f.hash_buckets)}")
        if f.kind == "multi":
            if not isinstance(f.sep, str) or not f.sep:
                raise SchemaError(f"{where}: 'sep' must be a non-empty string")
            if not isinstance(f.max_len, int) or isinstance(f.max_len, bool) or f.max_len < 1:
                raise SchemaError(f"{where}: max_len must be an integer >= 1, got {short(f.max_len)}")
            if f.pooling not in POOLINGS:
                raise SchemaError(f"{where}: unknown pooling {short(f.pooling)} (expected mean or sum)")


def from_dict(data: Any, source: str = "schema") -> Schema:
    """Build and validate a Schema from a parsed YAML/JSON document."""
    if not isinstance(data, dict):
        raise SchemaError(f"{source}: expected a mapping with 'label' and 'fields', got {type(data).__name__}")
    unknown = set(data) - {"label", "fields", "negative_label", "label_map", "defaults", "format"}
    if unknown:
        raise SchemaError(f"{source}: unknown top-level key(s) {short(sorted(unknown, key=str))}")
    raw_fields = data.get("fields")
    if not isinstance(raw_fields, list):
        raise SchemaError(f"{source}: 'fields' must be a list of field mappings")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - _FIELD_KEYS:
        raise SchemaError(f"{source}: 'defaults' must be a mapping of field options ({sorted(_FIELD_KEYS)})")
    out = []
    for i, raw in enumerate(raw_fields):
        if isinstance(raw, str):
            raw = {"name": raw}
        if not isinstance(raw, dict):
            raise SchemaError(f"{source}: fields[{i}] must be a mapping or a field name")
        bad = set(raw) - _FIELD_KEYS
        if bad:
            raise SchemaError(
                f"{source}: fields[{i}] ({short(raw.get('name'))}): unknown option(s) {short(sorted(bad, key=str))}; "
                f"allowed: {sorted(_FIELD_KEYS)}"
            )
        if "name" not in raw:
            raise SchemaError(f"{source}: fields[{i}] has no 'name'")
        opts = {**defaults, **raw}
        if opts.get("kind", "categorical") != "numeric" and "transform" not in raw:
            opts.pop("transform", None)  # a default transform only concerns numeric fields
        out.append(Field(**opts))
    label = data.get("label", "label")
    if not isinstance(label, str) or not label:
        raise SchemaError(f"{source}: 'label' must be a column name")
    neg = data.get("negative_label", 0)
    if neg not in (0, -1):
        raise SchemaError(f"{source}: negative_label must be 0 or -1, got {short(neg)}")
    try:
        return Schema(fields=tuple(out), label=label, negative_label=neg,
                      label_map=_label_map(data.get("label_map"), source), meta={"format": data.get("format")})
    except SchemaError as e:
        raise SchemaError(f"{source}: {e}") from None


# YAML 1.1 reads an unquoted yes/no/on/off/true/false as a boolean: a label_map key True stands for all
# the spellings that YAML turns into True.
_YAML_BOOL = {True: ("yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"),
              False: ("no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF")}


def _label_map(raw: Any, source: str) -> tuple[tuple[str, int], ...]:
    """``label_map: {yes: 1, no: 0}``: text labels -> 1 (click) / 0; at least one of each."""
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        raise SchemaError(f"{source}: 'label_map' must be a mapping of label text to 1 or 0, e.g. {{yes: 1, no: 0}}")
    out: dict[str, int] = {}
    for k, v in raw.items():
        if isinstance(v, bool) or v not in (0, 1):
            raise SchemaError(f"{source}: label_map value for {short(k)} must be 1 or 0, got {short(v)}")
        for text in _YAML_BOOL[k] if isinstance(k, bool) else (str(k),):
            out[text] = int(v)
    if set(out.values()) != {0, 1}:
        raise SchemaError(f"{source}: label_map must map at least one label to 1 and one to 0")
    return tuple(out.items())


def load(path: str | Path) -> Schema:
    """Load a schema from a .yaml/.yml/.json file (UTF-8; a leading byte-order mark is allowed)."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_SCHEMA_BYTES:
            raise SchemaError(f"{path}: larger than {MAX_SCHEMA_BYTES >> 20} MB; is this a schema file?")
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise SchemaError(f"cannot read schema file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SchemaError(f"{path}: not UTF-8 text (byte {e.start}); save the schema file as UTF-8") from None
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=NoAliasLoader)
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path}: not valid {kind}: {e}") from None
    except yaml.YAMLError as e:
        raise SchemaError(f"{path}: not valid {kind}: {yaml_problem(e)}") from None
    except RecursionError:
        raise SchemaError(f"{path}: not valid {kind}: nested too deeply") from None
    if data is None:
        raise SchemaError(f"{path}: the schema file is empty; declare 'label' and 'fields'")
    return from_dict(data, source=str(path))
