"""What ``vilbert model bench`` and ``vilbert model demo`` run: :mod:`components.bench.throughput`, training
throughput and memory of this ViLBERT against the original, and :mod:`components.bench.demo`, a few pretraining
steps of the demo model.  The scripts behind the figures of ``benchmarks/RESULTS.md`` live in ``benchmarks/``."""
