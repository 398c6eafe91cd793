"""The command line run in this process: a child process spends ~9 s importing torch and diffusers, so tests that
need the command's exit code and stderr, not a process of their own, call ``cli.main`` here."""

import contextlib
import io
import logging
import os

from diffkd.cli import main


def run_in_process(argv: list[str], env: dict) -> tuple[int, str]:
    """cli.main with stderr captured; log records go to the same stream, as they would in a terminal."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with contextlib.redirect_stderr(stream):
            code = main(argv)
    finally:
        root.removeHandler(handler)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    return code, stream.getvalue()
