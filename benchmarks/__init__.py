"""The llmkernels benchmark suite: ``python -m benchmarks.run`` (see benchmarks/README.md).

Where things are: ``workloads.py`` (every shape), ``providers.py`` (every implementation timed),
``metrics.py`` (FLOP and byte counts), ``timing.py`` (timers, memory, ceilings), ``report.py`` (table, JSON,
plots), ``static_report.py`` (compiler reports without a GPU), ``run.py`` (the command line),
``gpu_suite.sh`` (one call on a GPU machine), ``bench_*.py`` (pytest-benchmark, small sizes, run in CI).
"""
