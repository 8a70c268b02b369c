"""What the test suites and the benchmarks share: where the backing services are, the platform's processes
and private brokers, load generation, waiting on a condition, and measuring (metrics, percentiles, CPU).

Imported by ``tests/`` and ``bench/`` alike; neither imports the other.
"""
