"""Data: read raw files, fit preprocessing on training data, encode into a memory-mapped columnar store."""
