"""A live progress bar for scans: done/total, failures, rate and time left (toys per second for toys)."""

from __future__ import annotations

import sys
import time

__all__ = ["ProgressBar"]


class ProgressBar:
    """A tqdm bar (tqdm comes with pyhf) that counts records and failures.

    Args:
        total: Number of patches in the scan.
        stream: Where to draw; standard error by default.
    """

    def __init__(self, total: int, stream=None, toys: int = 0):
        from tqdm.auto import tqdm

        self.failed = 0
        #: Toys per hypothesis still to fit in the scan (0: not a toy scan), and those done.
        self.toys, self.toys_done, self._began = int(toys), 0, time.monotonic()
        self._bar = tqdm(total=total, unit="fit", file=stream or sys.stderr, dynamic_ncols=True,
                         bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        self._bar.set_postfix_str("0 failed", refresh=False)
        # Records are counted here and handed to the bar at a fixed rate: per record, a scan of
        # 10^5 quick fits would spend more of the client's time on the bar than on the fits.
        self._pending, self._shown = 0, time.monotonic()

    def _postfix(self) -> str:
        text = f"{self.failed} failed"
        if self.toys:
            rate = 2 * self.toys_done / max(time.monotonic() - self._began, 1e-9)
            text += f", toys {self.toys_done:,}/{self.toys:,} per hypothesis, {rate:,.0f} toys/s"
        return text

    #: Seconds between two updates of the bar.
    interval = 0.2

    def update(self, record) -> None:
        if not record.ok:
            self.failed += 1
        self._pending += 1
        now = time.monotonic()
        if now - self._shown >= self.interval:
            self._flush(now)

    def _flush(self, now: float) -> None:
        self._shown = now
        if self._pending:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(self._pending)
            self._pending = 0

    def chunk(self, outcome: dict) -> None:
        """A chunk of toys finished (both hypotheses: a toy is one test statistic)."""
        part = outcome.get("toys") or {}
        self.toys_done += int(part.get("stop", 0)) - int(part.get("start", 0))
        self._bar.set_postfix_str(self._postfix())

    def close(self) -> None:
        self._flush(time.monotonic())
        self._bar.close()
