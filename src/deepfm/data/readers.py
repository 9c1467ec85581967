"""Readers: raw files -> a clean, typed Arrow table plus labels, with bad rows reported by file and line.

Every reader returns a :class:`ReadResult` whose ``table`` has one column per schema field (by the
field's ``source`` name): ``string`` for categorical and multi fields (null = missing) and ``float64``
for numeric fields (null = missing). Validation is vectorised (Arrow compute); a bad row either raises a
:class:`DataError` naming file, line and field, or, with ``on_bad_rows="skip"``, is dropped and counted.

Formats: ``criteo`` (Kaggle TSV, no header), ``avazu`` (CSV), ``libfm`` (Frappe/NFM, iPinYou/FNN),
``movielens`` (RecBole atomic files), ``csv``/``tsv``/``parquet`` (with a schema file).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv

from deepfm.config import FORMATS
from deepfm.data.numbers import NUMBER_RE, NUMERIC_RE, SPACE  # noqa: F401 (NUMERIC_RE: re-exported)
from deepfm.errors import DataError
from deepfm.schema import Field, Schema, short

MAX_EXAMPLES = 5
MAX_FIRST_LINE = 16 << 20  # bytes: a longer first line is not a text file of these formats


@dataclass
class BadRows:
    """Rows dropped under ``on_bad_rows="skip"``: the count and the first few by line, with line and reason
    (the same whether the file is read whole or in blocks)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list, repr=False)  # of the examples

    def add(self, n: int, examples: list[tuple[int, str]]) -> None:
        """Count ``n`` rows; ``examples``: (line, text) of (at least) the earliest few of them."""
        self.count += n
        kept = sorted([*zip(self.lines, self.examples, strict=True), *examples], key=lambda e: e[0])[:MAX_EXAMPLES]
        self.lines, self.examples = [int(line) for line, _ in kept], [text for _, text in kept]

    def summary(self, path: str) -> str:
        head = f"{path}: skipped {self.count} bad row(s)"
        return head + "".join(f"\n  {e}" for e in self.examples)


@dataclass
class ReadResult:
    table: pa.Table
    label: np.ndarray | None  # float32 0/1, None when the data has no label column
    schema: Schema
    path: str
    skipped: BadRows
    extra: dict[str, pa.Array] = field(default_factory=dict)  # passthrough columns (e.g. an id)

    @property
    def rows(self) -> int:
        return self.table.num_rows


# --------------------------------------------------------------------------- delimited text


def _first_line(path: Path) -> str:
    """The first line (header or first row) as text, without a UTF-8 byte-order mark (the CSV parser skips
    it too)."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:  # type: ignore[operator]
            line = fh.readline(MAX_FIRST_LINE + 1)
    except (OSError, EOFError) as e:  # EOFError: a gzip stream cut before its first line ends
        raise DataError(f"cannot read file: {e}", path=str(path),
                        hint="check that the file is complete (and gzip-compressed if named .gz)") from None
    if len(line) > MAX_FIRST_LINE:
        raise DataError(f"the first line is longer than {MAX_FIRST_LINE >> 20} MiB", path=str(path), line=1,
                        hint="is this a text file of the chosen --format?")
    if not line.strip():
        raise DataError("file is empty (or its first line is blank)", path=str(path), line=1,
                        hint="pass a file with at least one data row")
    return line.decode("utf-8-sig", errors="replace").rstrip("\r\n")


def _header(path: Path, names: list[str]) -> list[str]:
    """Header column names; a name given twice is an error (the columns could not be told apart)."""
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise DataError(f"column {n!r} appears more than once in the header", path=str(path), line=1,
                            hint="give every column a distinct name")
        seen.add(n)
    return names


def _csv_options(names: list[str], delimiter: str, skip_header: bool, quote: bool, use_threads: bool,
                 handler: Callable[[pv.InvalidRow], str], block_size: int = 1 << 20,
                 numeric: tuple[str, ...] = ()) -> dict:
    return dict(
        read_options=pv.ReadOptions(
            column_names=names, skip_rows=1 if skip_header else 0, use_threads=use_threads,
            block_size=block_size,  # 1-2 MB blocks parse 1.25x faster than 4 MB, 2.5x than 16 MB (cache)
        ),
        parse_options=pv.ParseOptions(
            delimiter=delimiter, quote_char='"' if quote else False, invalid_row_handler=handler,
            ignore_empty_lines=False,  # blank lines stay rows (of nulls), so row i keeps its line number
            newlines_in_values=quote,  # a quoted value may hold line breaks: block boundaries must respect quotes
        ),
        convert_options=pv.ConvertOptions(
            column_types={n: pa.float64() if n in numeric else pa.binary() for n in names},
            strings_can_be_null=True, null_values=[""],
            quoted_strings_can_be_null=False,
        ),
    )


class _InvalidRows:
    """Collects the rows with a wrong column count that pyarrow's parser reports (record, text, columns).

    pyarrow numbers records, not lines: a quoted value holding line breaks makes the two differ, so with
    ``quote`` the line breaks inside values are counted to turn record numbers into file lines."""

    def __init__(self, path: Path, n_names: int, on_bad_rows: str, bad: BadRows, quote: bool = False) -> None:
        self.path, self.n_names, self.on_bad_rows, self.bad, self.quote = path, n_names, on_bad_rows, bad, quote
        self.rows: list[tuple[int | None, str, int]] = []  # reported by the parser, not yet placed
        self.queue: list[tuple[int | None, str, int]] = []  # placed, waiting for the block they belong to
        self.bad_lines = np.empty(0, dtype=np.int64)  # record numbers of the invalid rows so far
        self.breaks = 0  # line breaks inside the values of the records read so far
        self.pending: DataError | None = None  # on_bad_rows="error": the first invalid row, for the Validator

    def __call__(self, row: pv.InvalidRow) -> str:
        self.rows.append((row.number, row.text, row.actual_columns))
        return "skip"

    def lines(self, first: int, start_row: int, block: pa.Table | pa.RecordBatch | None, last: bool) -> np.ndarray:
        """1-based file line of each row of ``block`` (rows ``start_row ..`` of the parsed output), shifted
        past the invalid rows before it. The invalid rows up to the block's last row (all when ``last``: the
        streaming parser reports rows of blocks ahead) are counted, or, with ``error``, the first is kept as
        ``pending`` for the Validator (which reports a bad value on an earlier line first), and raised when
        there is no row to validate."""
        new, self.rows = self.rows, []
        if new:
            self.bad_lines = np.sort(np.r_[self.bad_lines, np.array([t[0] or 0 for t in new], dtype=np.int64)])
            self.queue = sorted(self.queue + new, key=lambda t: t[0] or 0)
        n = 0 if block is None else block.num_rows
        lines = np.arange(first + start_row, first + start_row + n, dtype=np.int64)
        if self.bad_lines.size:
            lines += np.searchsorted(self.bad_lines - np.arange(self.bad_lines.size), lines, side="right")
        k = len(self.queue) if last or n == 0 else int(np.searchsorted([t[0] or 0 for t in self.queue], lines[-1],
                                                                             "right"))
        due, self.queue = self.queue[:k], self.queue[k:]
        nums = np.array([t[0] or 0 for t in due], dtype=np.int64)
        if self.quote:
            lines, nums = self._physical(lines, block, nums, [t[1] for t in due])
        if due and self.on_bad_rows != "skip":
            _, text, got = due[0]
            self.pending = DataError(f"expected {self.n_names} columns, found {got}: {text[:120]!r}",
                                     path=str(self.path), line=int(nums[0]),
                                     hint="fix the row, check --format, or pass --on-bad-rows skip")
            if n == 0:
                raise self.pending
        elif due:
            self.bad.add(len(due), [(num, f"line {num}: expected {self.n_names} columns, found {got}")
                                    for num, (_, _, got) in zip(nums[:MAX_EXAMPLES], due, strict=False)])
        return lines

    def _physical(self, lines: np.ndarray, block: pa.Table | pa.RecordBatch | None, nums: np.ndarray,
                  texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Record numbers -> file lines: add the line breaks inside the values of all earlier records."""
        inside = _line_breaks(block)
        extra = np.array([t.count("\n") for t in texts], dtype=np.int64)  # invalid rows: rare
        if inside is None and not extra.any():
            return lines + self.breaks, nums + self.breaks
        inside = np.zeros(len(lines), dtype=np.int64) if inside is None else inside
        keys, counts = np.r_[lines, nums], np.r_[inside, extra]
        order = np.argsort(keys, kind="stable")
        before = np.empty_like(counts)
        before[order] = np.cumsum(counts[order]) - counts[order]
        shift = self.breaks + before
        self.breaks += int(counts.sum())
        return lines + shift[: len(lines)], nums + shift[len(lines):]


def _line_breaks(block: pa.Table | pa.RecordBatch | None) -> np.ndarray | None:
    """Line breaks inside each row's values (None when there are none): a byte scan per column, and a
    per-row count only for the columns that hold one."""
    total = None
    for col in [] if block is None else block.columns:
        if not pa.types.is_binary(col.type):
            continue  # a column parsed as numbers holds no line break
        chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
        if not any(c.buffers()[2] is not None and (np.frombuffer(c.buffers()[2], np.uint8) == 10).any()
                   for c in chunks):
            continue
        n = pc.fill_null(pc.count_substring(col, "\n"), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        total = n if total is None else total + n
    return total


def _no_rows(path: Path | str, bad: BadRows) -> DataError:
    if bad.count:
        return DataError(f"every row was bad and skipped ({bad.count}); nothing left to read", path=str(path),
                         hint=f"first: {bad.examples[0]}" if bad.examples else None)
    return DataError("no data rows", path=str(path), hint="the file is empty or holds only a header")


def _parse_error(path: Path, e: Exception, block_size: int | None = None) -> DataError:
    """pyarrow's parse failure as a DataError; a row longer than the streaming block gets its own advice."""
    text = str(e)
    m = re.search(r"(?:Row #(\d+): )?Expected (\d+) columns, got (\d+)", text)
    if m:  # pyarrow decodes an invalid row's text as UTF-8 before calling the handler: it fails on bad bytes
        return DataError(f"expected {m[2]} columns, found {m[3]}, in a row that is not valid UTF-8", path=str(path),
                         line=int(m[1]) if m[1] else None, hint="delete or fix the row (this one cannot be "
                         "skipped), e.g. drop invalid bytes with `iconv -f utf-8 -t utf-8 -c`")
    if block_size is not None and ("straddl" in text or "larger than block size" in text):
        return DataError(f"a line is longer than the read block ({block_size} bytes)", path=str(path),
                         hint="pass a larger block_bytes")
    return DataError(f"cannot parse file: {e}", path=str(path),
                     hint="check the format/--format and that the file is complete")


def read_delimited(
    path: Path,
    names: list[str],
    delimiter: str,
    skip_header: bool,
    on_bad_rows: str,
    bad: BadRows,
    quote: bool = False,
    numeric: tuple[str, ...] = (),
) -> tuple[pa.Table, np.ndarray, DataError | None]:
    """Read a delimited text file as binary columns; return (table, 1-based line number per row, the
    first wrong-column-count error for the :class:`Validator` to raise, or None).

    Rows with the wrong column count are reported (naming the line) or skipped and counted. Columns are
    read as binary so that encoding errors are found per row afterwards instead of failing the whole read.
    ``numeric`` columns are first tried as float64 by the parser itself (parallel, no binary copy); if any
    value does not convert, the file is re-read all-binary so the Validator can name the row.
    """
    def read(use_threads: bool, numeric: tuple[str, ...]) -> tuple[pa.Table, _InvalidRows]:
        invalid = _InvalidRows(path, len(names), on_bad_rows, bad, quote)
        try:
            opts = _csv_options(names, delimiter, skip_header, quote, use_threads, invalid, numeric=numeric)
            return pv.read_csv(path, **opts), invalid
        except (pa.ArrowInvalid, OSError, EOFError) as e:
            raise _parse_error(path, e) from None

    def read_all(numeric: tuple[str, ...]) -> tuple[pa.Table, _InvalidRows]:
        try:
            return read(True, numeric)
        except DataError as e:
            if "not valid UTF-8" not in str(e):
                raise
            read(False, numeric)  # raises again, with the line: only the serial reader numbers rows
            raise

    try:
        table, invalid = read_all(numeric)
    except DataError as e:
        if not numeric or "conversion error" not in str(e):
            raise
        numeric = ()  # a value that is not a plain number: the binary read finds and names it
        table, invalid = read_all(numeric)
    if any(n is None for n, _, _ in invalid.rows):
        # the threaded reader does not know line numbers: re-read the (rare) bad file
        table, invalid = read(False, numeric)
    lines = invalid.lines(2 if skip_header else 1, 0, table, last=True)
    if table.num_rows == 0:
        raise _no_rows(path, bad)
    return table, lines, invalid.pending


def iter_delimited(
    path: Path, names: list[str], delimiter: str, skip_header: bool, on_bad_rows: str, bad: BadRows,
    quote: bool = False, block_size: int = 16 << 20,
) -> Iterator[tuple[pa.Table, np.ndarray, DataError | None]]:
    """``read_delimited`` in blocks of about ``block_size`` bytes (bounded memory for any file size)."""
    invalid = _InvalidRows(path, len(names), on_bad_rows, bad, quote)
    first, done = 2 if skip_header else 1, 0
    try:
        # single-threaded: the streaming parser only knows line numbers then (and is faster on 2 cores)
        reader = pv.open_csv(path, **_csv_options(names, delimiter, skip_header, quote, False, invalid, block_size))
        for batch in reader:
            if batch.num_rows == 0:
                continue  # a block of only invalid rows: they are placed with the next block
            lines = invalid.lines(first, done, batch, last=False)
            done += batch.num_rows
            yield pa.Table.from_batches([batch]), lines, invalid.pending
    except (pa.ArrowInvalid, OSError, EOFError) as e:
        raise _parse_error(path, e, block_size) from None
    invalid.lines(first, done, None, last=True)
    if done == 0:
        raise _no_rows(path, bad)


def _bad_utf8_rows(arr: pa.Array) -> np.ndarray:
    """Row positions whose bytes are not valid UTF-8, found by bisection (only runs on bad columns)."""
    try:
        pc.cast(arr, pa.string())
        return np.empty(0, dtype=np.int64)
    except pa.ArrowInvalid:
        if len(arr) == 1:
            return np.zeros(1, dtype=np.int64)
    mid = len(arr) // 2
    return np.concatenate([_bad_utf8_rows(arr.slice(0, mid)), mid + _bad_utf8_rows(arr.slice(mid))])


def clean_bytes(arr: pa.Array) -> bool:
    """True when a binary/string column's bytes are pure ASCII with no NUL: then every value is valid
    UTF-8 and NUL-free, and the slower per-row checks can be skipped (two reductions over the data buffer
    instead of a cast and a substring search)."""
    if not (pa.types.is_binary(arr.type) or pa.types.is_string(arr.type)) or len(arr) == 0:
        return False
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
    data = arr.buffers()[2]
    if data is None:
        return True
    b = np.frombuffer(data, dtype=np.uint8)[offsets[0]: offsets[-1]]
    return b.size == 0 or (int(b.max()) < 128 and int(b.min()) > 0)


class Validator:
    """Collects per-row problems found column by column, then drops them all at once (``skip``) or, in
    :meth:`finish`, raises the one on the earliest line (``error``): the same line whether the file is
    read whole or in blocks. ``pending``: an earlier problem of the block (a wrong column count)."""

    def __init__(self, path: Path | str, lines: np.ndarray, on_bad_rows: str, bad: BadRows,
                 pending: DataError | None = None) -> None:
        self.path, self.lines, self.on_bad_rows, self.bad = str(path), lines, on_bad_rows, bad
        self.n = len(lines)
        self.keep = np.ones(self.n, dtype=bool)
        self.first = pending  # on_bad_rows="error": the problem on the earliest line so far

    def flag(self, mask: np.ndarray, name: str | None, message: Callable[[int], str],
             hint: str = "fix the value or pass --on-bad-rows skip") -> None:
        """Drop the rows in ``mask`` and count them, or keep the first as the error to raise; ``name`` is the
        field, None for a whole row."""
        rows = np.flatnonzero(mask & self.keep)
        if rows.size == 0:
            return
        self.keep[rows] = False
        if self.on_bad_rows != "skip":
            r = int(rows[0])
            if self.first is None or self.first.line is None or self.lines[r] < self.first.line:
                self.first = DataError(message(r), path=self.path, line=int(self.lines[r]), field=name, hint=hint)
            return
        where = "" if name is None else f", field {name!r}"
        self.bad.add(int(rows.size), [(self.lines[r], f"line {self.lines[r]}{where}: {message(int(r))}")
                                      for r in rows[:MAX_EXAMPLES]])

    def blank(self, raw: pa.Table) -> None:
        """Flag blank lines: the parser reads them as rows whose every column is null (as is a row of only
        delimiters). Free (null counts only) for the usual file, where some column has no null."""
        if raw.num_columns == 0 or any(col.null_count == 0 for col in raw.columns):
            return
        mask = np.ones(raw.num_rows, dtype=bool)
        for col in raw.columns:
            mask &= pc.is_null(col).to_numpy(zero_copy_only=False)
        self.flag(mask, None, lambda r: "blank line (no values)")

    def text(self, arr: pa.Array, name: str) -> pa.Array:
        """binary -> string, flagging invalid UTF-8 and NUL bytes."""
        arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
        if clean_bytes(arr):
            return arr.view(pa.string()) if pa.types.is_binary(arr.type) else arr
        if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
            bad_rows = _bad_utf8_rows(arr)
            if bad_rows.size:
                mask = np.zeros(len(arr), dtype=bool)
                mask[bad_rows] = True
                self.flag(mask, name, lambda r: "invalid UTF-8 bytes")
                arr = pc.if_else(pa.array(mask), pa.scalar(None, arr.type), arr)
            arr = pc.cast(arr, pa.string())
        elif not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
            try:
                arr = pc.cast(arr, pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # list, struct, map... (Parquet)
                raise DataError(f"a column of type {arr.type} cannot be read as text or numbers", path=self.path,
                                field=name, hint="convert the column (e.g. join a list into one string for a "
                                "multi field)") from None
        nul = pc.fill_null(pc.match_substring(arr, "\x00"), False).to_numpy(zero_copy_only=False)
        self.flag(nul, name, lambda r: "contains a NUL byte")
        return arr

    def number(self, arr: pa.Array, name: str) -> pa.Array:
        """text -> float64 (null stays null), flagging non-numeric text and NaN/inf."""
        if pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type):
            arr = pc.cast(arr, pa.float64(), safe=False)  # |int| > 2**53 rounds (a safe cast refuses it)
        else:
            arr = self.text(arr, name)
            try:  # fast path: plain numbers cast directly; anything else (spaces, text) takes the checks
                arr = pc.cast(arr, pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                arr = self._number_slow(arr, name)
        vals = arr.to_numpy(zero_copy_only=False)  # nulls read as NaN
        finite = np.isfinite(vals)
        if int(finite.size - np.count_nonzero(finite)) == arr.null_count:
            return arr  # the only non-finite values are the nulls
        nonfinite = ~finite & ~np.asarray(pc.is_null(arr).to_numpy(zero_copy_only=False))
        self.flag(nonfinite, name, lambda r: f"non-finite value {float(vals[r])}")
        return pc.if_else(pa.array(nonfinite), pa.scalar(None, pa.float64()), arr)

    def _number_slow(self, arr: pa.Array, name: str) -> pa.Array:
        """Trim, regex-check and cast text to float64, flagging what is not a number."""
        s = pc.utf8_trim(arr, SPACE)  # ASCII spaces only, as serve.records (data.numbers)
        arr = pc.if_else(pc.equal(s, ""), pa.scalar(None, pa.string()), s)
        ok = pc.fill_null(pc.match_substring_regex(arr, NUMBER_RE), True).to_numpy(zero_copy_only=False)
        if not ok.all():
            shown = arr
            self.flag(~ok, name, lambda r: f"not a number: {str(shown[r].as_py())[:40]!r}")
            arr = pc.if_else(pa.array(ok), arr, pa.scalar(None, pa.string()))
        return pc.cast(arr, pa.float64())

    def label(self, arr: pa.Array, name: str, negatives: tuple[float, ...],
              label_map: tuple[tuple[str, int], ...] = ()) -> np.ndarray:
        if label_map:  # text labels (yes/no, click/skip) mapped by the schema
            return self._mapped_label(arr, name, dict(label_map))
        if not (pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type)):
            t = pc.utf8_trim(self.text(arr, name), SPACE)
            nonfinite = pc.is_in(pc.utf8_lower(pc.utf8_trim(t, "+-")), value_set=pa.array(["nan", "inf", "infinity"]))
            word = pc.and_(pc.and_(pc.invert(pc.match_substring_regex(t, NUMBER_RE)), pc.not_equal(t, "")),
                           pc.invert(nonfinite))  # nan/inf are numbers, refused as non-finite below
            word = pc.fill_null(word, False).to_numpy(zero_copy_only=False)
            if word.any():  # skipping them would skip every row: say how to map them instead
                words = pc.unique(pc.filter(t, pa.array(word))).to_pylist()[:2]
                example = ", ".join(f"{str(w)[:20]}: {1 - i}" for i, w in enumerate(words))
                self.flag(word, name, lambda r: f"label is not a number: {str(t[r].as_py())[:40]!r}",
                          hint=f"map text labels to 1/0 in the schema, e.g. label_map: {{{example}}}")
        vals = self.number(arr, name).to_numpy(zero_copy_only=False)
        allowed = np.isin(vals, (*negatives, 1.0))
        want = "/".join(str(int(v)) for v in dict.fromkeys((1.0, *negatives)))
        self.flag(~allowed, name, lambda r: f"label must be {want}, got "
                  + ("nothing (empty)" if np.isnan(vals[r]) else f"{float(vals[r]):g}"))
        return (vals == 1.0).astype(np.float32)

    def _mapped_label(self, arr: pa.Array, name: str, label_map: dict[str, int]) -> np.ndarray:
        t = pc.utf8_trim(pc.cast(arr, pa.string()), SPACE)
        keys = list(label_map)
        pos = pc.index_in(t, value_set=pa.array(keys, pa.string())).to_numpy(zero_copy_only=False)
        known = ~np.isnan(pos.astype(np.float64)) if pos.dtype.kind == "f" else np.ones(len(pos), bool)
        pos = np.nan_to_num(pos.astype(np.float64), nan=0).astype(np.int64)
        out = np.asarray([label_map[k] for k in keys], dtype=np.float32)[pos]
        shown = ", ".join(keys[:6])
        self.flag(~known, name, lambda r: f"label {str(t[r].as_py())[:40]!r} is not in the schema's label_map "
                  f"({shown})" if t[r].is_valid else "label is empty")
        return (out == 1).astype(np.float32)

    def finish(self, columns: dict[str, pa.Array], label: np.ndarray | None) -> tuple[pa.Table, np.ndarray | None]:
        if self.first is not None:
            raise self.first
        table = pa.table(columns)
        if self.keep.all():
            return table, label
        table = table.take(pa.array(np.flatnonzero(self.keep)))  # may be empty: callers check the whole file
        return table, None if label is None else label[self.keep]


class _Deferred(Validator):
    """A Validator for one column on a worker thread: records its flags for the real one to apply in
    column order (the same result as a sequential pass: no column's checks depend on another's)."""

    def __init__(self, v: Validator) -> None:
        self.path, self.lines, self.on_bad_rows, self.bad = v.path, v.lines, v.on_bad_rows, v.bad
        self.flags: list[tuple[np.ndarray, str | None, Callable[[int], str], str]] = []

    def flag(self, mask: np.ndarray, name: str | None, message: Callable[[int], str],
             hint: str = "fix the value or pass --on-bad-rows skip") -> None:
        self.flags.append((mask, name, message, hint))


def parallel_map(fn: Callable[[Any], Any], items: list) -> list:
    """fn over items on a thread per core, results in order (first error re-raised). For work that
    releases the GIL (Arrow compute, numpy)."""
    workers = min(len(items), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def _empty_strings(t: pa.Array) -> np.ndarray | None:
    """Mask of the non-null empty strings of a string/binary array, or None when there is none (from the
    offsets and the validity bitmap: no pass over the bytes)."""
    if not (pa.types.is_string(t.type) or pa.types.is_binary(t.type)) or len(t) == 0:
        empty = pc.fill_null(pc.equal(pc.binary_length(t), 0), False)  # large_* types: rare
        return empty.to_numpy(zero_copy_only=False) if pc.any(empty).as_py() else None
    offsets = np.frombuffer(t.buffers()[1], dtype=np.int32, count=len(t) + 1, offset=t.offset * 4)
    zero = offsets[1:] == offsets[:-1]
    if not zero.any():
        return None
    if t.null_count:
        valid = t.buffers()[0]
        bits = np.unpackbits(np.frombuffer(valid, dtype=np.uint8), bitorder="little")
        zero &= bits[t.offset: t.offset + len(t)].view(bool)
    return zero if zero.any() else None


def typed_columns(
    raw: pa.Table, schema: Schema, v: Validator, label_col: str | None, negatives: tuple[float, ...] = (0.0,),
    missing_hint: str = "check the schema file or --format",
) -> tuple[pa.Table, np.ndarray | None]:
    """Validate and type the raw columns a schema needs; missing columns are a clear error. Columns are
    typed on a thread per core; their problems are then applied in column order."""
    first: dict[str, Field] = {}
    for f in schema.fields:
        if f.source not in raw.column_names:
            if len(raw.column_names) == 1 and any(c in raw.column_names[0] for c in ",;\t|"):
                raise DataError(f"column {f.source!r} required by the schema is missing: the file has one column "
                                f"({short(raw.column_names[0], 60)}), so its delimiter is probably not the one "
                                "read", path=v.path, field=f.name,
                                hint="--format csv reads commas, tsv tabs; check --format")
            raise DataError(f"column {f.source!r} required by the schema is missing "
                            f"(columns present: {', '.join(raw.column_names[:12])}...)", path=v.path,
                            field=f.name, hint=missing_hint)
        first.setdefault(f.source, f)  # a source shared by several fields is typed by its first
    jobs: list[tuple[str, Field | None]] = list(first.items())
    if label_col is not None and label_col in raw.column_names:
        jobs.append((label_col, None))

    def typed(job: tuple[str, Field | None]) -> tuple[Any, _Deferred]:
        source, f = job
        d = _Deferred(v)
        arr = raw.column(source).combine_chunks()
        if f is None:
            return d.label(arr, source, negatives, schema.label_map), d
        if f.kind == "numeric":
            return d.number(arr, f.name), d
        if f.kind == "multi" and (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
            arr = _join_lists(arr, f)  # a list column (pandas lists, Arrow lists) of a multi-valued field
        t = d.text(arr, f.name)
        empty = _empty_strings(t)
        return (t if empty is None else pc.if_else(pa.array(empty), pa.scalar(None, t.type), t)), d

    done = parallel_map(typed, jobs)
    for _, d in done:
        for flag in d.flags:
            v.flag(*flag)
    label = done[-1][0] if jobs and jobs[-1][1] is None else None
    cols = {source: out for (source, f), (out, _) in zip(jobs, done, strict=True) if f is not None}
    return v.finish(cols, label)


def _join_lists(arr: pa.Array, f: Field) -> pa.Array:
    """A list column -> one string per row joined with the field's separator, which the multi-value path
    then splits again; an empty list is missing, like an empty string."""
    try:
        strings = pc.cast(arr, pa.list_(pa.string()))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"a list column of type {arr.type} cannot be read as values: {e}", field=f.name) from None
    return pc.binary_join(strings, f.sep)


# --------------------------------------------------------------------------- formats


def criteo_schema(min_count: int = 10, unlabeled: bool = False) -> Schema:
    """Kaggle Criteo: I1..I13 counts as value x vector after a signed log; C1..C26 categorical."""
    fields = [Field(f"I{i}", "numeric", transform="log") for i in range(1, 14)]
    fields += [Field(f"C{i}", "categorical", min_count=min_count) for i in range(1, 27)]
    return Schema(fields=tuple(fields), label="label")


CRITEO_NAMES = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]


@dataclass
class Plan:
    """How to read one delimited file: its columns, delimiter and header, the schema, and ``typed``,
    which turns a block of raw binary columns into validated ``(table, label)``. Used alike by ``read``
    (whole file) and ``iter_read`` (blocks)."""

    names: list[str]
    delimiter: str
    header: bool
    schema: Schema
    typed: Callable[[pa.Table, Validator], tuple[pa.Table, np.ndarray | None]]
    quote: bool = False
    numeric: tuple[str, ...] = ()  # columns ``typed`` only reads as numbers: the whole-file read parses them


def _number_columns(schema: Schema, label: str | None) -> tuple[str, ...]:
    """Raw columns that typed_columns reads as numbers: numeric fields' sources and the label."""
    first: dict[str, str] = {}
    for f in schema.fields:
        first.setdefault(f.source, f.kind)  # typed_columns types a shared source by its first field
    cols = [src for src, kind in first.items() if kind == "numeric"]
    return tuple(cols + ([label] if label is not None and label not in first else []))


def plan_criteo(path: Path, schema: Schema | None) -> Plan:
    first = _first_line(path)
    delim = "\t" if "\t" in first else ","
    ncols = len(first.split(delim))
    header = first.split(delim)[0].strip() == "label"
    if ncols not in (39, 40):
        raise DataError(f"a Criteo row has 40 columns (label, I1-I13, C1-C26) or 39 without the label; "
                        f"found {ncols}", path=str(path), line=1, hint="check --format")
    schema = schema or criteo_schema()
    label = "label" if ncols == 40 else None
    return Plan(CRITEO_NAMES if ncols == 40 else CRITEO_NAMES[1:], delim, header, schema,
                lambda raw, v: typed_columns(raw, schema, v, label), numeric=_number_columns(schema, label))


AVAZU_NAMES = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category",
               "app_id", "app_domain", "app_category", "device_id", "device_ip", "device_model",
               "device_type", "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]


def avazu_schema(min_count: int = 2) -> Schema:
    """Avazu: every column categorical; ``hour`` (YYMMDDHH) becomes hour_of_day and weekday."""
    names = ["hour_of_day", "weekday"] + AVAZU_NAMES[3:]
    return Schema(fields=tuple(Field(n, "categorical", min_count=min_count) for n in names), label="click")


def plan_avazu(path: Path, schema: Schema | None) -> Plan:
    first = _first_line(path).split(",")
    header = first[0].strip() == "id"
    names = _header(path, [c.strip() for c in first]) if header else (AVAZU_NAMES if len(first) == 24 else
                                                       [n for n in AVAZU_NAMES if n != "click"])
    if not header and len(first) not in (23, 24):
        raise DataError(f"an Avazu row has 24 columns (23 without 'click'); found {len(first)}",
                        path=str(path), line=1, hint="check --format")
    schema = schema or avazu_schema()
    return Plan(names, ",", header, schema, lambda raw, v: _typed_avazu(raw, v, schema))


def _typed_avazu(raw: pa.Table, v: Validator, schema: Schema) -> tuple[pa.Table, np.ndarray | None]:
    if "hour" in raw.column_names:
        hour = v.text(raw.column("hour").combine_chunks(), "hour")
        ok = pc.fill_null(pc.match_substring_regex(hour, r"^\d{8}$"), False).to_numpy(zero_copy_only=False)
        v.flag(~ok, "hour", lambda r: "hour must be YYMMDDHH (8 digits)")
        hour = pc.if_else(pa.array(ok), hour, pa.scalar("14102100"))
        day = pc.strptime(pc.binary_join_element_wise("20", pc.utf8_slice_codeunits(hour, 0, 6), ""),
                          format="%Y%m%d", unit="s", error_is_null=True)
        hh = pc.utf8_slice_codeunits(hour, 6, 8)
        real = pc.and_(pc.is_valid(day), pc.less(hh, "24")).to_numpy(zero_copy_only=False)
        v.flag(~real, "hour", lambda r: f"hour {hour[r].as_py()!r} is not a valid date and hour (YYMMDDHH)")
        raw = raw.append_column("hour_of_day", hh)
        raw = raw.append_column("weekday", pc.cast(pc.day_of_week(day), pa.string()))
    return typed_columns(raw, schema, v, "click" if "click" in raw.column_names else None)


def libfm_schema(n_fields: int, min_count: int = 1, names: list[str] | None = None) -> Schema:
    names = names or [f"f{i}" for i in range(n_fields)]
    return Schema(fields=tuple(Field(n, "categorical", min_count=min_count) for n in names), label="label")


def plan_libfm(path: Path, schema: Schema | None) -> Plan:
    """libFM/libSVM lines ``label id:value ...`` with a fixed field order: field i is token i.

    The feature id is the field's categorical value. Values must be 1 (one-hot data, as in Frappe/NFM
    and iPinYou/FNN); other values are reported as bad rows. Labels 1 and 0 or -1.
    """
    first = _first_line(path).strip().split()
    n_fields = len(first) - 1
    if n_fields < 1:
        raise DataError("a libFM line is '<label> <id>:<value> ...'; found no features", path=str(path), line=1)
    names = ["label"] + [f"f{i}" for i in range(n_fields)]
    schema = schema or libfm_schema(n_fields)
    return Plan(names, " ", False, schema, lambda raw, v: _typed_libfm(raw, v, schema))


def _typed_libfm(raw: pa.Table, v: Validator, schema: Schema) -> tuple[pa.Table, np.ndarray | None]:
    cols = {"label": raw.column("label")}
    for name in raw.column_names[1:]:
        tok = v.text(raw.column(name).combine_chunks(), name)
        parts = pc.split_pattern(tok, ":", max_splits=1)
        ok = pc.fill_null(pc.match_substring_regex(tok, "^[^:]+:"), False).to_numpy(zero_copy_only=False)
        parts = pc.if_else(pa.array(ok), parts, pa.scalar(["", "1"], parts.type))  # bad tokens: flagged below
        val = pc.list_element(parts, 1)
        one = pc.fill_null(pc.match_substring_regex(val, r"^1(\.0*)?$"), False).to_numpy(zero_copy_only=False)
        v.flag(~ok, name, lambda r: "expected a token '<id>:<value>'")
        v.flag(ok & ~one, name, lambda r: "only one-hot libFM values (':1') are supported")
        cols[name] = pc.list_element(parts, 0)
    return typed_columns(pa.table(cols), schema, v, "label", negatives=(0.0, -1.0))


def movielens_schema(min_count: int = 1) -> Schema:
    cat = ["user_id", "item_id", "age", "gender", "occupation", "zip_code", "release_year"]
    fields = [Field(n, "categorical", min_count=min_count) for n in cat]
    fields.append(Field("genres", "multi", column="class", sep=" ", max_len=6, pooling="mean",
                        min_count=min_count))
    return Schema(fields=tuple(fields), label="label")


def _read_atomic(path: Path, on_bad_rows: str, bad: BadRows) -> tuple[pa.Table, np.ndarray, DataError | None]:
    header = _first_line(path).split("\t")
    names = _header(path, [h.split(":")[0] for h in header])
    return read_delimited(path, names, "\t", True, on_bad_rows, bad)


def read_movielens(path: Path, schema: Schema | None, on_bad_rows: str, bad: BadRows,
                   label_rules: bool = True) -> ReadResult:
    """RecBole atomic files: ``X.inter`` joined with ``X.user`` and ``X.item`` found next to it.

    label = rating >= 4; rows rated exactly 3 are dropped (as RecBole's CTR setting does). That is a label
    rule: with ``label_rules=False`` (scoring) the rating is not read and every row is kept.
    """
    if path.is_dir():
        inters = sorted(path.glob("*.inter"))
        if not inters:
            raise DataError("no .inter file in this folder", path=str(path))
        path = inters[0]
    stem = path.with_suffix("")
    inter, lines, pending = _read_atomic(path, on_bad_rows, bad)
    _require(path, ["user_id", "item_id"], inter.column_names)
    v = Validator(path, lines, on_bad_rows, bad, pending)
    v.blank(inter)
    rating = (v.number(inter.column("rating").combine_chunks(), "rating")
              if label_rules and "rating" in inter.column_names else None)
    cols = {c: v.text(inter.column(c).combine_chunks(), c) for c in ("user_id", "item_id")}
    keep = np.ones(inter.num_rows, dtype=bool)
    if rating is not None:
        r = rating.to_numpy(zero_copy_only=False)
        v.flag(np.isnan(r), "rating", lambda i: "rating is missing")
        keep = r != 3
        cols["label"] = pa.array(np.where(r >= 4, 1.0, 0.0))
    table = pa.table(cols)
    if rating is not None:
        v.keep &= keep  # rating-3 rows are a documented drop, not bad rows
    for side, key in ((".user", "user_id"), (".item", "item_id")):
        side_path = stem.with_suffix(side)
        if side_path.exists():
            side_raw, side_lines, side_pending = _read_atomic(side_path, on_bad_rows, bad)
            _require(side_path, [key], side_raw.column_names)
            sv = Validator(side_path, side_lines, on_bad_rows, bad, side_pending)
            sv.blank(side_raw)
            side_cols = {c: sv.text(side_raw.column(c).combine_chunks(), c) for c in side_raw.column_names}
            side_tab, _ = sv.finish(side_cols, None)
            _unique_key(side_path, side_tab, key, side_lines[sv.keep])
            table = table.append_column("__row", pa.array(np.arange(table.num_rows)))
            table = table.join(side_tab, key, join_type="left outer").sort_by("__row").drop_columns("__row")
    schema = schema or movielens_schema()
    out, label = typed_columns(table, schema, v, "label" if rating is not None else None)
    if out.num_rows == 0:
        raise _no_rows(path, bad)
    return ReadResult(out, label, schema, str(path), bad)


def _unique_key(path: Path, table: pa.Table, key: str, lines: np.ndarray) -> None:
    """A side file (.user/.item) must list each id once: the join would repeat interactions otherwise."""
    col = table.column(key).combine_chunks()
    if pc.count_distinct(col).as_py() == len(col) - col.null_count:  # null ids match nothing in the join
        return
    counts = pc.value_counts(col)
    twice = pc.drop_null(counts.field("values").filter(pc.greater(counts.field("counts"), 1)))
    rows = np.flatnonzero(pc.fill_null(pc.is_in(col, value_set=twice), False).to_numpy(zero_copy_only=False))
    _, first = np.unique(col.take(pa.array(rows)).to_numpy(zero_copy_only=False), return_index=True)
    dup = int(rows[np.setdiff1d(np.arange(rows.size), first)[0]])  # the earliest row repeating an id
    raise DataError(f"{key} {col[dup].as_py()!r} is listed more than once", path=str(path), line=int(lines[dup]),
                    field=key, hint="keep one row per id")


def plan_table(path: Path, schema: Schema | None, fmt: str) -> Plan:
    """Generic CSV/TSV with a header, described by a schema file."""
    schema = _need_schema(path, schema, fmt)
    delim = "\t" if fmt == "tsv" or path.name.endswith((".tsv", ".tsv.gz")) else ","
    import csv

    # the header as a CSV row: quoted names ("y","c", as pyarrow and pandas may write them) lose their quotes
    try:
        names = next(csv.reader([_first_line(path)], delimiter=delim), [])
    except csv.Error as e:  # e.g. a bare carriage return inside the header line
        raise DataError(f"cannot parse the header line: {e}", path=str(path), line=1,
                        hint="the first line must be the column names, separated by the delimiter") from None
    header = _header(path, [h.strip() for h in names])
    negatives = (0.0, float(schema.negative_label))
    return Plan(header, delim, True, schema, lambda raw, v: typed_columns(raw, schema, v, schema.label, negatives),
                quote=True, numeric=_number_columns(schema, schema.label))


def _need_schema(path: Path, schema: Schema | None, fmt: str) -> Schema:
    if schema is None:
        raise DataError(f"--format {fmt} needs a schema (--schema FILE); create one with "
                        "`deepfm schema infer DATA`", path=str(path))
    return schema


def _parquet(path: Path, schema: Schema) -> tuple[Any, list[str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read Parquet: {e}", path=str(path)) from None
    present = pf.schema_arrow.names
    return pf, [c for c in dict.fromkeys([*(f.source for f in schema.fields), schema.label]) if c in present]


def _typed_parquet(raw: pa.Table, path: Path, schema: Schema, first_row: int, on_bad_rows: str,
                   bad: BadRows) -> ReadResult:
    lines = np.arange(first_row, first_row + raw.num_rows)  # Parquet has rows, not lines: the 1-based row
    v = Validator(path, lines, on_bad_rows, bad)
    table, label = typed_columns(raw, schema, v, schema.label, negatives=(0.0, float(schema.negative_label)))
    return ReadResult(table, label, schema, str(path), bad)


def default_schema(fmt: str) -> Schema | None:
    return {"criteo": criteo_schema, "avazu": avazu_schema, "movielens": movielens_schema}.get(fmt, lambda: None)()


def _check(path: str | Path, fmt: str, on_bad_rows: str) -> Path:
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})", path=str(path))
    if on_bad_rows not in ("error", "skip"):
        raise DataError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, ValueError) as e:  # e.g. a name too long for the file system
        raise DataError(f"cannot open: {e}", path=str(path)[:200]) from None
    if not exists:
        raise DataError("no such file or folder", path=str(path))
    if fmt != "movielens" and is_dir:
        raise DataError("expected a file, got a folder", path=str(path))
    return path


def plan(path: Path, fmt: str, schema: Schema | None) -> Plan:
    """The reading plan of a delimited format (criteo, avazu, libfm, csv, tsv)."""
    if fmt == "criteo":
        return plan_criteo(path, schema)
    if fmt == "avazu":
        return plan_avazu(path, schema)
    if fmt == "libfm":
        return plan_libfm(path, schema)
    return plan_table(path, schema, fmt)


def read(
    path: str | Path, fmt: str, schema: Schema | None = None, on_bad_rows: str = "error", label_rules: bool = True
) -> ReadResult:
    """Read ``path`` in format ``fmt``. ``schema`` defaults to the format's own schema.

    on_bad_rows: ``error`` (raise DataError at the first bad row) or ``skip`` (drop and count them).
    label_rules: apply the format's rules that derive labels and drop rows without one (movielens: rating 3);
    False where labels are not used (prediction scores every input row).
    """
    path = _check(path, fmt, on_bad_rows)
    bad = BadRows()
    if fmt == "movielens":
        return read_movielens(path, schema, on_bad_rows, bad, label_rules)
    if fmt == "parquet":
        schema = _need_schema(path, schema, fmt)
        pf, wanted = _parquet(path, schema)
        try:
            raw = pf.read(columns=wanted)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read Parquet: {e}", path=str(path)) from None
        if raw.num_rows == 0:
            raise DataError("no data rows", path=str(path))
        res = _typed_parquet(raw, path, schema, 1, on_bad_rows, bad)
    else:
        pl = plan(path, fmt, schema)
        raw, lines, pending = read_delimited(path, pl.names, pl.delimiter, pl.header, on_bad_rows, bad, pl.quote,
                                             pl.numeric)
        v = Validator(path, lines, on_bad_rows, bad, pending)
        v.blank(raw)
        table, label = pl.typed(raw, v)
        res = ReadResult(table, label, pl.schema, str(path), bad)
    if res.rows == 0:
        raise _no_rows(path, bad)
    return res


def iter_read(
    path: str | Path, fmt: str, schema: Schema | None = None, on_bad_rows: str = "error",
    block_bytes: int = 16 << 20, block_rows: int = 131072, columns: list[str] | None = None,
    label_rules: bool = True,
) -> Iterator[ReadResult]:
    """``read`` in consecutive blocks (about ``block_bytes`` of text or ``block_rows`` Parquet rows), for
    files larger than memory. Each block's ``skipped`` is the running total for the file; line numbers in
    errors are the file's. ``columns``: raw columns to pass through in ``ReadResult.extra`` (e.g. an id).
    movielens (a join of three files) is read whole, as one block. ``label_rules``: as in ``read``."""
    path = _check(path, fmt, on_bad_rows)
    bad = BadRows()
    columns = list(columns or [])
    if fmt == "movielens":
        if columns:
            raise DataError("passthrough columns are not available for --format movielens", path=str(path))
        yield read_movielens(path, schema, on_bad_rows, bad, label_rules)
        return
    if fmt == "parquet":
        schema = _need_schema(path, schema, fmt)
        pf, wanted = _parquet(path, schema)
        _require(path, columns, pf.schema_arrow.names)
        done = kept = 0
        try:
            for batch in pf.iter_batches(batch_size=block_rows, columns=list(dict.fromkeys(wanted + columns))):
                raw = pa.Table.from_batches([batch])
                res = _typed_parquet(raw.select(wanted), path, schema, done + 1, on_bad_rows, bad)
                done, kept = done + raw.num_rows, kept + res.rows
                if res.rows:
                    yield _with_extra(res, raw, columns, path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read Parquet: {e}", path=str(path)) from None
        if done == 0:
            raise DataError("no data rows", path=str(path))
        if kept == 0:
            raise _no_rows(path, bad)
        return
    pl = plan(path, fmt, schema)
    _require(path, columns, pl.names)
    kept = 0
    for raw, lines, pending in iter_delimited(path, pl.names, pl.delimiter, pl.header, on_bad_rows, bad, pl.quote,
                                              block_bytes):
        v = Validator(path, lines, on_bad_rows, bad, pending)
        v.blank(raw)
        table, label = pl.typed(raw, v)
        if table.num_rows == 0:
            continue  # a block of only bad rows (skipped): the file may go on
        kept += table.num_rows
        res = ReadResult(table, label, pl.schema, str(path), bad)
        for c in columns:  # rows dropped by the validator are dropped from the passthrough too
            res.extra[c] = pc.cast(raw.column(c).combine_chunks(), pa.string()).filter(pa.array(v.keep))
        yield res
    if kept == 0:
        raise _no_rows(path, bad)


def _require(path: Path, columns: list[str], present: list[str]) -> None:
    missing = [c for c in columns if c not in present]
    if missing:
        raise DataError(f"no column {missing[0]!r} (columns: {', '.join(present[:12])}"
                        f"{'...' if len(present) > 12 else ''})", path=str(path))


def _with_extra(res: ReadResult, raw: pa.Table, columns: list[str], path: Path) -> ReadResult:
    if columns and res.rows != raw.num_rows:
        raise DataError("passthrough columns cannot be combined with skipped bad rows in Parquet input",
                        path=str(path), hint="fix the rows or drop --id-column")
    for c in columns:
        res.extra[c] = pc.cast(raw.column(c), pa.string()).combine_chunks()
    return res


def from_arrow(table: pa.Table, schema: Schema, label: np.ndarray | None = None,
               source: str = "<table>") -> ReadResult:
    """Validate an in-memory Arrow table (from pandas/Polars via the estimator) like a file."""
    bad = BadRows()
    v = Validator(source, np.arange(1, table.num_rows + 1), "error", bad)
    out, lab = typed_columns(table, schema, v, None,  # the Python API: no file format, no schema file
                             missing_hint="pass the columns the model was fitted on")
    if label is not None:
        y = np.asarray(label, dtype=np.float64).ravel()
        if y.shape[0] != out.num_rows:
            raise DataError(f"y has {y.shape[0]} rows but X has {out.num_rows}", path=source)
        if not np.isin(y, (0.0, 1.0)).all():
            raise DataError("y must contain only 0 and 1", path=source)
        lab = y.astype(np.float32)
    return ReadResult(out, lab, schema, source, bad)

