"""Benchmark of issue 16's start-up time: wall seconds of `diffkd --help` and of a config error, repeated.

Each command runs in a fresh interpreter (``python -m diffkd ...`` with this checkout first on PYTHONPATH), ``--runs``
times; the median is reported with the range. With ``--baseline COMMIT`` the same commands also run on that
commit's tree (``git archive`` into a temporary folder), interleaved run by run with this tree so that both see the
same machine load, and the table gives the ratio of the medians. ``python -c pass`` is the interpreter's own floor.

    python eval/startup_time.py [--runs 10] [--baseline COMMIT] [--write]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from results_file import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("startup_time")


def commands(scratch: Path) -> dict[str, list[str]]:
    return {
        "python -c pass": ["-c", "pass"],
        "diffkd --help": ["-m", "diffkd", "--help"],
        "config key typo": ["-m", "diffkd", "distill", "configs/digits-progressive.yaml", "--output",
                            str(scratch / "run"), "--set", "method.steps_per_rond=3"],
    }


def timed(source: Path, args: list[str]) -> float:
    """Wall seconds of ``python ARGS`` run in ``source`` with it first on PYTHONPATH (the exit code is not checked:
    the config error exits 2 by design)."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=source, env=env, capture_output=True, check=False)
    return time.perf_counter() - start


def checkout(commit: str, folder: Path) -> Path:
    """The tree of ``commit`` (tracked files only) in ``folder``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def measure(sources: dict[str, Path], runs: int, scratch: Path) -> dict[tuple[str, str], list[float]]:
    """Seconds per (source, command), the sources interleaved within each repetition."""
    times: dict[tuple[str, str], list[float]] = {}
    for index in range(runs):
        for label, source in sources.items():
            for name, args in commands(scratch).items():
                times.setdefault((label, name), []).append(timed(source, args))
        log.info("run %d/%d done", index + 1, runs)
    return times


def table(times: dict[tuple[str, str], list[float]], labels: list[str], runs: int) -> str:
    names = list(dict.fromkeys(name for _, name in times))
    head = "| command | " + " | ".join(f"{label}: median s (min-max)" for label in labels)
    head += " | before / after |" if len(labels) == 2 else " |"
    lines = [head, "|" + "---|" * (len(labels) + 1 + (len(labels) == 2))]
    for name in names:
        cells = []
        for label in labels:
            values = times[(label, name)]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
        ratio = ""
        if len(labels) == 2:
            ratio = f" {statistics.median(times[(labels[0], name)]) / statistics.median(times[(labels[1], name)]):.1f}x |"
        lines.append(f"| {name} | " + " | ".join(cells) + " |" + ratio)
    return "\n".join(lines) + f"\n\n{runs} runs of each, interleaved."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--baseline", help="a commit to compare with (e.g. the one before the start-up work)")
    parser.add_argument("--write", action="store_true", help="write the 'startup-time' section of eval/RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {"after": ROOT}
        if args.baseline:
            (tmp / "baseline").mkdir()
            sources = {f"before ({args.baseline[:7]})": checkout(args.baseline, tmp / "baseline"), **sources}
        (tmp / "scratch").mkdir()
        times = measure(sources, args.runs, tmp / "scratch")
    result = table(times, list(sources), args.runs)
    command = "python eval/startup_time.py --runs {}{} --write".format(
        args.runs, f" --baseline {args.baseline}" if args.baseline else "")
    log.info("%s", result)
    if args.write:
        write_section("startup-time", f"""
## Start-up time (issue 16)

`diffkd --help` and a one-line config error (a typo in the method section), each in a fresh interpreter, wall
seconds. Machine: {machine()}; 2 cores shared with other jobs while this ran, so the absolute seconds are noisy:
compare within a column, and the ratio, which was taken in one run.
Command: `{command}`

{result}
""")


if __name__ == "__main__":
    main()
