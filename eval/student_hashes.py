"""The sha256 of each method's exported student on one tiny VP teacher: run it with two checkouts of diffkd on
PYTHONPATH (before and after a refactor) to show that the refactor leaves VP students byte-identical.

    OMP_NUM_THREADS=1 PYTHONPATH=OLD_CHECKOUT python eval/student_hashes.py --teacher /tmp/t --work /tmp/old
    OMP_NUM_THREADS=1 PYTHONPATH=. python eval/student_hashes.py --teacher /tmp/t --work /tmp/new

(the same thread count for both: float sums, and so the bytes, depend on it).

The teacher is trained by the faults catalogue's TEACHER_CONFIG if --teacher does not hold one yet (train it with
one checkout and pass the same folder to both); each method runs the catalogue's small config (progressive 4 -> 1,
consistency, DMD2 with GAN, regression and two steps, generator).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from diffkd.api import distill
from diffkd.config import parse_config
from tests import faults

METHODS = ("progressive", "consistency", "dmd", "generator")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="folder for the tiny teacher run (trained if absent)")
    parser.add_argument("--work", required=True, help="scratch folder for the students")
    args = parser.parse_args()
    teacher_run = Path(args.teacher)
    if not (teacher_run / "pipeline").exists():
        distill(parse_config(faults.TEACHER_CONFIG), teacher_run)
    hashes = {}
    for name in METHODS:
        config = getattr(faults, f"{name}_config")(str(teacher_run / "pipeline"))
        config["train"]["checkpoint_every"] = 1000
        folder = distill(parse_config(config), Path(args.work) / name)
        weights = min((folder / "unet").glob("*.safetensors"))
        hashes[name] = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    print(json.dumps(hashes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
