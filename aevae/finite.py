"""Whether an array holds NaN or infinity, or values float32 cannot hold, and where: one owner for the
service's checks of requests and outputs, the batch jobs' of their inputs and the client's of what it is about to
send (numpy only, so the thin client can import it)."""

from __future__ import annotations

import math
import warnings

import numpy as np


def quiet_sums() -> None:
    """+inf and -inf in one array sum to NaN with numpy's RuntimeWarning, which the first such request printed
    into a service's log; the answer (not finite) is all all_finite needs. Filtered for this module alone, once
    at import (a caller's catch_warnings, as pytest's, drops it: call again inside one): an errstate around the
    sum cost 2 us on every request."""
    warnings.filterwarnings("ignore", message="invalid value encountered in reduce", category=RuntimeWarning,
                            module=__name__)


quiet_sums()


def all_finite(array: np.ndarray) -> bool:
    """No NaN and no infinity, in one pass and without a temporary the size of the array (a boolean mask is a
    copy of a big batch): a NaN or an infinity makes the sum non-finite, and finite float32 values cannot
    overflow a float64 sum."""
    return math.isfinite(np.add.reduce(array, axis=None, dtype=np.float64))


def nonfinite(array: np.ndarray, field: str) -> str | None:
    """Why `array` is refused when it holds a NaN or an infinity, naming the first one's index; None when all
    is finite. The mask that finds it is made only then (a bad request's cost, not every request's)."""
    if all_finite(array):
        return None
    bad = np.argwhere(~np.isfinite(array))
    where = bad[0].tolist() if len(bad) else []
    return f"{field}: expected finite values, got {array[tuple(where)]} at index {where}"


def past_float32(array: np.ndarray) -> list[int] | None:
    """The index of the first finite value beyond float32's range (a float64's 1e39: cast, it becomes infinity
    with numpy's overflow warning, and was then refused as "not finite"), or None. One min and max over the
    array when all is well; the mask that finds the place is made only when one is out of range."""
    if array.dtype.kind != "f" or array.dtype.itemsize <= 4 or not array.size:
        return None
    top = float(np.finfo(np.float32).max)
    if -top <= array.min() <= array.max() <= top:  # NaN fails it too: then the mask below decides
        return None
    with np.errstate(invalid="ignore"):
        over = np.isfinite(array) & (np.abs(array) > top)
    return np.argwhere(over)[0].tolist() if over.any() else None
