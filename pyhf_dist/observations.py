"""Observed counts a fit can use: finite, and 0 or more.

pyhf's schema takes any number as an observed count. A negative one gave converged, "ok" CLs on
the fast path and failed fits in pyhf; both are refused before any fit, naming the count's place.
"""

from __future__ import annotations

import math
from typing import Any

from pyhf_dist.exceptions import WorkspaceError

__all__ = ["check_counts", "check_patch_counts"]


def check_patch_counts(operations: list, where: str) -> None:
    """:func:`check_counts` on what a patch's operations put under ``/observations``."""
    for operation in operations:
        path = str(operation.get("path", ""))
        if operation.get("op") not in ("add", "replace") or not path.startswith("/observations"):
            continue
        parts = path.split("/")[1:]
        value = operation.get("value")
        if len(parts) <= 2:  # all observations, or one
            check_counts(value, where, path)
        elif parts[2] == "data" and len(parts) == 3:
            for number, count in enumerate(value if isinstance(value, list) else []):
                _check_count(count, where, f"{path}/{number}")
        elif parts[2] == "data":
            _check_count(value, where, path)


def check_counts(observations: Any, where: str, path: str) -> None:
    """Refuse observed counts that are negative or not finite (a list of pyhf observations, or
    one: what a patch puts at ``path``), naming the first in one line."""
    for index, observation in enumerate(observations if isinstance(observations, list) else [observations]):
        data = observation.get("data", []) if isinstance(observation, dict) else []
        at = f"{path}/{index}" if isinstance(observations, list) else path
        for number, count in enumerate(data if isinstance(data, list) else []):
            _check_count(count, where, f"{at}/data/{number}", observation.get("name"))


def _check_count(count: Any, where: str, at: str, channel: str | None = None) -> None:
    if isinstance(count, (int, float)) and not isinstance(count, bool) and not 0 <= count < math.inf:
        of = f" of channel {channel!r}" if channel else ""
        raise WorkspaceError(
            f"{where}: observed count {count}{of} at {at}: counts of events must be finite and 0 or more; "
            "fix the observations"
        )
