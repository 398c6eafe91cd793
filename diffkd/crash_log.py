"""Where an unforeseen exception goes: a log file with its traceback, so the user reads one line, not fifty.

Every error diffkd can foresee is a ``DiffkdError`` (one line, exit 2). Anything else is a bug or a case no check
knew of; its traceback is what a maintainer needs, but it is not what a user should read first. The file lives
outside the run's folder (which a failed start must leave untouched): ``$DIFFKD_LOG_DIR`` or
``<tempdir>/diffkd-logs``.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path


def log_dir() -> Path:
    return Path(os.environ.get("DIFFKD_LOG_DIR") or Path(tempfile.gettempdir()) / "diffkd-logs")


def write_crash_log(error: BaseException, argv: list[str]) -> Path:
    """Write ``error``'s traceback and the command line to a new file; return its path."""
    folder = log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    path.write_text(f"diffkd {' '.join(argv)}\n\n{text}")
    return path
