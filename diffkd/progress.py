"""One progress display per long task (the whole training run, the whole evaluation) with its ETA.

On a terminal it is a tqdm bar; otherwise (a log file, a batch job) it is a log line every ``every`` percent, so a
run of thousands of steps leaves a few dozen readable lines instead of carriage-return floods.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def eta(seconds_per_item: float, remaining: int) -> str:
    """Remaining time as H:MM:SS."""
    total = round(seconds_per_item * remaining)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


class Progress:
    """Counts ``total`` items from ``initial``; ``update(n, note)`` after each. ``stream`` defaults to stderr."""

    def __init__(self, total: int, desc: str, initial: int = 0, enabled: bool = True, every: float = 5.0,
                 stream: TextIO | None = None):
        self.total, self.desc, self.done, self.enabled = total, desc, initial, enabled
        self.start_done, self.started = initial, time.perf_counter()
        self.step = max(1, round(total * every / 100))
        self.next_line = (initial // self.step + 1) * self.step
        stream = stream or sys.stderr
        self.bar = (tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=stream)
                    if enabled and stream.isatty() else None)

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note)
        elif self.done >= self.next_line or self.done == self.total:
            self.next_line = (self.done // self.step + 1) * self.step
            per_item = (time.perf_counter() - self.started) / max(1, self.done - self.start_done)
            log.info("%s: %d/%d (%.0f%%), ETA %s%s", self.desc, self.done, self.total, 100 * self.done / self.total,
                     eta(per_item, self.total - self.done), f", {note}" if note else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
