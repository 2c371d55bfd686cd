"""Benchmarks (not tests): `make bench-edge` runs `python -m bench.edge`."""
