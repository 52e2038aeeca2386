"""Benchmarks: `python -m bench.<name>`, one per module, each ending with a one-line summary (`make bench`).

Kept empty on purpose: a benchmark imports what it measures.
"""
