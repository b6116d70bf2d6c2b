"""The one summary of per-chunk latencies used by every report (bench rows, eval, demo, controller logs)."""
from __future__ import annotations

from typing import Iterable

import numpy as np


def latency_summary(latencies_ms: Iterable[float]) -> dict[str, float]:
    """p50, p99 and mean of per-chunk latencies.

    Args:
        latencies_ms: per-chunk latencies in milliseconds (any iterable of numbers).

    Returns:
        {"latency_ms_p50", "latency_ms_p99", "latency_ms_mean"} as Python floats in ms (numpy's linear
        percentile interpolation), or {} when there are no latencies.
    """
    lat = np.asarray(list(latencies_ms), dtype=np.float64)
    if lat.size == 0:
        return {}
    return {"latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p99": float(np.percentile(lat, 99)),
            "latency_ms_mean": float(lat.mean())}
