"""The fast path's one error: "not covered here, use plain pyhf for this patch"."""

from __future__ import annotations

from pyhf_dist.exceptions import PyhfDistError

__all__ = ["FastPathUnsupported"]


class FastPathUnsupported(PyhfDistError):
    """The fast path does not reproduce pyhf for this patch; the caller falls back to plain pyhf."""
