"""Does in-run validation rank a run's checkpoints as the evaluation does? Each kept checkpoint of a consistency run
is scored by the evaluation (k = 2 and 4, four seeds, ratio to the per-seed 64-step references) and by the in-run
``Validator`` itself (its protocol: k-step FD of fixed noise to the teacher's DDIM-64 samples) at each of --samples.

    python eval/validation_ranking.py --run RUN --teacher TEACHER --references R0,R1,R2,R3 \
        [--checkpoints 200,400,...] [--samples 256,1024] [--seed 0] [--no-truth]

--references: the teacher's per-seed 64-step FDs on seeds 0-3 (eval/RESULTS.md records them for each digits
teacher). Checkpoints are the run's ckpt-r00-sNNNNNNNN folders; their raw student weights are scored (the default
recipe keeps no EMA). --no-truth scores the validator only (the evaluation's four seeds are most of the time).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from student_seeds import mean_ratio, own_scheduler, sampled_fd

from diffkd import checkpoint
from diffkd.evaluation.features import load_feature_network
from diffkd.evaluation.reference import default_cache_dir, load_real_set
from diffkd.io import load_pipeline
from diffkd.run_validation import Validator


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--references", required=True, help="the teacher's 64-step FD on seeds 0-3")
    parser.add_argument("--checkpoints", default="200,400,600,800,1000,1200")
    parser.add_argument("--samples", default="256,1024")
    parser.add_argument("--no-truth", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="the validator's noise seed (a run's train.seed)")
    args = parser.parse_args()
    run, references = Path(args.run), [float(r) for r in args.references.split(",")]
    feature = load_feature_network("digits-classifier")
    student, teacher = load_pipeline(str(run / "student")), load_pipeline(args.teacher)
    real = load_real_set("digits", feature, student.image_size, student.image_channels, default_cache_dir())
    sample = own_scheduler(student.pipeline)
    with tempfile.TemporaryDirectory() as scratch:
        validators = {n: Validator(teacher, student.pipeline.scheduler, student.denoiser.prediction_type, 4, n,
                                   "digits-classifier", Path(scratch) / str(n), args.seed)
                      for n in map(int, args.samples.split(","))}
        for step in map(int, args.checkpoints.split(",")):
            tensors, _ = checkpoint.load(run / "checkpoints" / checkpoint.name_for(0, step))
            student.denoiser.unet.load_state_dict(tensors["student"])
            row = {"step": step}
            for k in () if args.no_truth else (2, 4):
                fds = [sampled_fd(student.denoiser, sample, k, seed, 1000, feature, real) for seed in range(4)]
                row[f"truth k={k}"] = round(mean_ratio(fds, references), 3)
            for n, validator in validators.items():
                row[f"validation FD, {n}"] = round(validator(student.denoiser.unet), 2)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
