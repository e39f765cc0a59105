"""Benchmarks of heksher_shm against heksher 0.2.2; run them with ``python -m benchmarks.run``."""
