"""Per-process event counts of the server (the protocol and the app run in the same worker process), shown
by /healthz. A module of their own so that the protocol and the app both import them, not each other."""

from __future__ import annotations

from collections import Counter

COUNTERS: Counter[str] = Counter()
