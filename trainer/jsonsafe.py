"""Plain JSON from the trainer's results: the manifest and the reports are strict JSON."""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np


def json_safe(x: Any) -> Any:
    """NaN and infinities to None, numpy scalars to Python, keys to str, paths to str, dataclasses to dicts."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "__dataclass_fields__") and not isinstance(x, type):
        return json_safe(asdict(x))
    return x
