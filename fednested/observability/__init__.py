"""Observability of the federation's processes: traces (tracing.py) and structured logs (logs.py)."""
