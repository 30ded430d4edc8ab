"""mpirt's benchmark harness: ``python -m bench SUITE [options]``.

Every suite runs its baselines in the same run as the thing measured and writes
one JSON file (machine, versions, git commit, every sample) under ``bench/out/``.
"""
