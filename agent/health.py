"""What a station reports about itself beside its results: latency percentiles and the machine's load.

Each reading is best effort: where a machine does not expose one (no GPU, no
thermal zone, no psutil), it reads -1, which the hub shows as unknown.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np


def latency_percentiles(values: deque[float]) -> tuple[float, float]:
    """p50 and p95 of a latency window; -1 for an empty one."""
    if not values:
        return -1.0, -1.0
    a = np.array(values)
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


# Jetson boards report GPU load in tenths of a percent here
JETSON_GPU_LOAD = ("/sys/devices/gpu.0/load", "/sys/devices/platform/gpu.0/load",
                   "/sys/devices/platform/bus@0/17000000.gpu/load")


def gpu_percent() -> float:
    """GPU load in percent where readable: Jetson sysfs, else NVML (nvidia-ml-py) if installed; -1 otherwise."""
    for path in JETSON_GPU_LOAD:
        try:
            return int(Path(path).read_text().strip()) / 10.0
        except (OSError, ValueError):
            continue
    try:
        import pynvml

        pynvml.nvmlInit()
        return float(pynvml.nvmlDeviceGetUtilizationRates(pynvml.nvmlDeviceGetHandleByIndex(0)).gpu)
    except Exception:   # no NVML library, no GPU, no driver: unknown
        return -1.0


def cpu_percent() -> float:
    """CPU use in percent since the previous call (psutil), -1 without psutil."""
    try:
        import psutil

        return float(psutil.cpu_percent(interval=None))
    except ImportError:
        return -1.0


def temperature() -> float:
    """The hottest thermal zone (Jetsons and most PCs expose them), -1 when none is readable."""
    temps = []
    for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
        try:
            temps.append(int(zone.read_text().strip()) / 1000.0)
        except (OSError, ValueError):
            continue
    return max(temps) if temps else -1.0
