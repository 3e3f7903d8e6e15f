"""A live progress bar for scans: done/total, failures, rate and time left."""

from __future__ import annotations

import sys

__all__ = ["ProgressBar"]


class ProgressBar:
    """A tqdm bar (tqdm comes with pyhf) that counts records and failures.

    Args:
        total: Number of patches in the scan.
        stream: Where to draw; standard error by default.
    """

    def __init__(self, total: int, stream=None):
        from tqdm.auto import tqdm

        self.failed = 0
        self._bar = tqdm(total=total, unit="fit", file=stream or sys.stderr, dynamic_ncols=True,
                         bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        self._bar.set_postfix_str("0 failed", refresh=False)

    def update(self, record) -> None:
        if not record.ok:
            self.failed += 1
            self._bar.set_postfix_str(f"{self.failed} failed", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
