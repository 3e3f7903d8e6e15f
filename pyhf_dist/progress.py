"""A live progress bar for scans: done/total, failures, rate and time left (toys per second for toys)."""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["NoteHandler", "ProgressBar"]


class NoteHandler(logging.Handler):
    """Log records as lines on standard error that never share a line with a progress bar.

    While a bar is drawn, tqdm clears it, writes the line and draws the bar again below; without
    one (tqdm not even imported) the line is written as it is.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if "tqdm" in sys.modules:
                from tqdm import tqdm

                tqdm.write(line, file=sys.stderr)
            else:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
        except Exception:
            self.handleError(record)


class ProgressBar:
    """A tqdm bar (tqdm comes with pyhf) that counts records and failures.

    A toy scan's bar counts its toys instead (per hypothesis, as ``ntoys`` does), so that its
    rate and the time left come from the toys fitted; the fits and failures are written beside
    it, with the toys per second (both hypotheses: a toy is one test statistic). The count grows
    as chunks finish and, between, as their workers report how far they are
    (:mod:`pyhf_dist.scan.running_toys`).

    Args:
        total: Number of patches in the scan.
        stream: Where to draw; standard error by default.
        toys: Toys per hypothesis the scan covers (0: not a toy scan).
        toys_done: Those of them a resumed scan's journal holds already.
    """

    def __init__(self, total: int, stream=None, toys: int = 0, toys_done: int = 0):
        from tqdm.auto import tqdm

        self.failed, self.fits, self.total = 0, 0, int(total)
        self.toys, self.toys_done, self._began = int(toys), int(toys_done), time.monotonic()
        self._resumed = self.toys_done
        common = {"file": stream or sys.stderr, "dynamic_ncols": True, "postfix": self._postfix()}
        if self.toys:
            # smoothing=0: the time left from the average rate since the start (toys come in
            # chunks minutes apart: a moving average of the gaps between them misleads).
            self._bar = tqdm(total=self.toys, initial=self.toys_done, unit="toy", smoothing=0, **common,
                             bar_format="{l_bar}{bar}| {n:,.0f}/{total:,.0f} toys per hypothesis [{elapsed}<{remaining}{postfix}]")
        else:
            self._bar = tqdm(total=total, unit="fit", **common,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        # Records are counted here and handed to the bar at a fixed rate: per record, a scan of
        # 10^5 quick fits would spend more of the client's time on the bar than on the fits.
        self._pending, self._shown = 0, time.monotonic()
        # Where nothing handles pyhf-dist's notes (a script, a notebook: Python's last resort
        # prints them), they are printed as that would, but on lines of their own, for the bar's time.
        self._notes = None
        logger = logging.getLogger("pyhf_dist")
        if not logger.hasHandlers():
            self._notes = NoteHandler(logging.WARNING)
            logger.addHandler(self._notes)

    def _postfix(self) -> str:
        if not self.toys:
            return f"{self.failed} failed"
        fitted = self.toys_done - self._resumed
        rate = 2 * fitted / max(time.monotonic() - self._began, 1e-9)
        return f"{self.fits}/{self.total} fits, {self.failed} failed, {rate:,.0f} toys/s"

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
            self.fits += self._pending
            # A toy scan's bar counts toys, not these records: only its text changes, drawn now.
            self._bar.set_postfix_str(self._postfix(), refresh=bool(self.toys))
            if not self.toys:
                self._bar.update(self._pending)
            self._pending = 0

    def toys_fitted(self, count: int) -> None:
        """``count`` toys of each hypothesis fitted so far in this run (besides the resumed ones)."""
        grown = self._resumed + int(count) - self.toys_done
        if grown > 0:
            self.toys_done += grown
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(grown)

    def close(self) -> None:
        self._flush(time.monotonic())
        self._bar.close()
        if self._notes is not None:
            logging.getLogger("pyhf_dist").removeHandler(self._notes)
            self._notes = None
