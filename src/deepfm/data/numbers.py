"""What counts as a number in text, for the batch readers (Arrow, vectorised) and the server (one value at a
time, ``serve.records``) alike: both accept exactly the same values.

ASCII only: optional ASCII whitespace (space, tab, CR, LF, FF, VT) around ``[+-]`` digits with an optional
point and exponent. Unicode digits ("٣", "３") and Unicode spaces (NBSP, U+3000) are not numbers: Python's
``float()`` takes them, RE2 and Arrow's casts do not, and a value must not mean one thing online and another
in a file (or be dropped from one and scored by the other).
"""

from __future__ import annotations

import math
import re

SPACE = " \t\r\n\f\v"  # the whitespace trimmed around a number (Arrow: pc.utf8_trim(arr, SPACE))
_BODY = r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
NUMBER_RE = rf"^{_BODY}$"  # a trimmed value (RE2 and Python's re read it the same way)
NUMERIC_RE = rf"^[ \t\r\n\f\v]*{_BODY}[ \t\r\n\f\v]*$"  # an untrimmed value (type inference)
_NUMBER = re.compile(_BODY)


def parse_number(text: str) -> float | None:
    """``text`` as a float: NaN when blank (missing), None when it is not a number. May return inf for a
    value beyond float range (e.g. "1e400"): the caller refuses non-finite values as the batch path does."""
    s = text.strip(SPACE)
    if not s:
        return math.nan
    if _NUMBER.fullmatch(s) is None:
        return None
    return float(s)
