"""A live progress bar for scans: done/total, failures, rate and time left (toys per second for toys)."""

from __future__ import annotations

import sys

__all__ = ["ProgressBar"]


class ProgressBar:
    """A tqdm bar (tqdm comes with pyhf) that counts records and failures.

    Args:
        total: Number of patches in the scan.
        stream: Where to draw; standard error by default.
    """

    def __init__(self, total: int, stream=None, toys: int = 0):
        import time

        from tqdm.auto import tqdm

        self.failed = 0
        #: Toys per hypothesis still to fit in the scan (0: not a toy scan), and those done.
        self.toys, self.toys_done, self._began = int(toys), 0, time.monotonic()
        self._bar = tqdm(total=total, unit="fit", file=stream or sys.stderr, dynamic_ncols=True,
                         bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        self._bar.set_postfix_str("0 failed", refresh=False)

    def _postfix(self) -> str:
        text = f"{self.failed} failed"
        if self.toys:
            import time

            rate = 2 * self.toys_done / max(time.monotonic() - self._began, 1e-9)
            text += f", toys {self.toys_done:,}/{self.toys:,} per hypothesis, {rate:,.0f} toys/s"
        return text

    def update(self, record) -> None:
        if not record.ok:
            self.failed += 1
        self._bar.set_postfix_str(self._postfix(), refresh=False)
        self._bar.update(1)

    def chunk(self, outcome: dict) -> None:
        """A chunk of toys finished (both hypotheses: a toy is one test statistic)."""
        part = outcome.get("toys") or {}
        self.toys_done += int(part.get("stop", 0)) - int(part.get("start", 0))
        self._bar.set_postfix_str(self._postfix())

    def close(self) -> None:
        self._bar.close()
