"""Benchmarks and the GPU check, apart from the entry points, on one timing harness.

- ``harness``: device sync, the median of interleaved timed calls, fwd+bwd closures, tables.
- ``benchmark``: the ``python -m pipelines.benchmark`` command, one module per subcommand:
  ``loss``, ``augment``, ``train``, ``ingest``.
- ``gpu_check``: the ``python -m pipelines.gpu_check`` command (correctness, loss and augmentation
  timing), ``gpu_training`` (its training-step and end-to-end sections), ``gpu_plans`` (its sizes).

``pipelines/benchmark.py`` and ``pipelines/gpu_check.py`` keep the documented commands.
"""
