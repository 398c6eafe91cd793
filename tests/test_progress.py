"""Progress off a terminal: a log line every few percent with an ETA, not a carriage-return per step."""

import io
import logging

from diffkd.progress import Progress, eta


def test_eta_is_seconds_per_item_times_items_left():
    assert eta(2.5, 100) == "0:04:10"  # 250 s
    assert eta(1.0, 3725) == "1:02:05"


def test_off_a_terminal_progress_logs_every_five_percent(caplog):
    stream = io.StringIO()  # not a tty
    with caplog.at_level(logging.INFO, logger="diffkd.progress"):
        progress = Progress(1600, "training", stream=stream)
        for _ in range(1600):
            progress.update(1, "loss 0.1")
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 20 and stream.getvalue() == ""  # 80 steps apart; nothing written to the stream itself
    assert lines[0].startswith("training: 80/1600 (5%), ETA ") and lines[-1].startswith("training: 1600/1600 (100%)")
    assert "\r" not in "".join(lines)


def test_a_resumed_run_counts_from_where_it_was():
    progress = Progress(100, "training", initial=40, stream=io.StringIO())
    progress.update(1)
    assert progress.done == 41 and progress.next_line == 45
