"""Benchmarks the ``vilbert`` CLI runs (``vilbert model bench``): :mod:`components.bench.throughput`, training
throughput and memory of this ViLBERT against the original.  The scripts behind the figures of
``benchmarks/RESULTS.md`` live in ``benchmarks/``."""
