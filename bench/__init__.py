"""mpirt's benchmark harness: ``python -m bench SUITE [options]``.

Every suite runs its baselines in the same run as the thing measured and writes one JSON file
(machine, versions, git commit, every sample) and its PNG plot under ``bench/results/latest/``
(``MPIRT_BENCH_OUT`` elsewhere); ``python -m bench report`` turns them into ``bench/RESULTS.md``.
"""
