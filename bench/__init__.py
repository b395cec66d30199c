"""Benchmarks, each a ratio against a baseline run in the same process: `python -m bench.<name>` from the
repository root."""
