"""What every benchmark reports the same way: the machine it ran on, this process's memory, and the JSON file."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch


def status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def rss_mb() -> float:
    return status_mb("VmRSS")


def peak_rss_mb() -> float:
    # VmHWM is this address space's own high-water mark. getrusage's ru_maxrss is not: Linux carries the larger of
    # the parent's peak into the child across fork+exec, so every worker would report at least the parent's RSS.
    return status_mb("VmHWM")


def machine(threads: int) -> dict[str, Any]:
    """The CPU, software versions, threads and load average at the start of a run."""
    model_name = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            model_name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "platform": platform.platform(),
        "processor": model_name or platform.processor(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "load_average_at_start": list(load),
    }


def write_report(report: dict[str, Any], out: Path, *, started: float) -> dict[str, Any]:
    """Add the load average at the end and the wall time since `started` (perf_counter), write `out` as JSON."""
    report["load_average_at_end"] = list(os.getloadavg())
    report["wall_seconds"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
