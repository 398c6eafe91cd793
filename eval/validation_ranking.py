"""Does in-run validation rank a run's checkpoints as the evaluation does? Each kept checkpoint of a consistency run
is scored by the evaluation (k = 2 and 4, four seeds, ratio to the per-seed 64-step references) and by the in-run
``Validator`` itself, for each reference (the training images; the teacher's DDIM-64 samples of the same noise) and
each validation noise seed (a run's train.seed), at k = 2 and 4: which checkpoint each would export.

    python eval/validation_ranking.py --run RUN --teacher TEACHER --references R0,R1,R2,R3 \
        [--checkpoints 400,600,...] [--samples 1024] [--seeds 0,1,2] [--validation-references data,teacher]
        [--data digits] [--feature digits-classifier] [--validation-feature latent-random-conv]
        [--samplers LCMScheduler,DDIMScheduler] [--validation-sampler LCMScheduler] [--no-truth | --no-validation]

--references: the teacher's per-seed 64-step FDs on seeds 0-3 (eval/RESULTS.md records them for each digits
teacher). Checkpoints are the consistency round's ckpt-rNN-sNNNNNNNN folders (after a reparameterisation round, if
any); their raw student weights are scored (the default recipe keeps no EMA). The evaluation's four seeds are most of the time; --no-truth leaves them out. --samplers: the
schedulers the truth samples with (default: the exported one), each built by ``from_config`` of the exported one;
--validation-sampler: the one in-run validation ranked checkpoints with (a consistency run's LCMScheduler, whatever
its end exported). --data / --feature: the run's data and the evaluation's feature network (the panel: its patch
folder and random-conv), which validation uses too unless --validation-feature names another.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import diffusers
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from student_seeds import mean_ratio, sampled_fd, with_scheduler

from diffkd import checkpoint
from diffkd.config import DataConfig
from diffkd.evaluation.features import load_feature_network
from diffkd.evaluation.reference import default_cache_dir, load_real_set
from diffkd.io import load_pipeline
from diffkd.run_validation import Validator
from diffkd.selection import geometric_mean

STEPS = (2, 4)


def checkpoint_at(run: Path, step: int) -> Path:
    """The checkpoint of ``step`` of the consistency round, the run's last (a reparameterisation round may come
    first); its last step is the one written at the round's end (the next round index, step 0)."""
    last = yaml.safe_load((run / "config.yaml").read_text())["method"]["num_steps"]
    ended = checkpoint.read_state(checkpoint.latest(run / "checkpoints"))["progress"]["round"]  # the rounds it ran
    return run / "checkpoints" / (checkpoint.name_for(ended, 0) if step == last else checkpoint.name_for(ended - 1, step))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--references", required=True, help="the teacher's 64-step FD on seeds 0-3")
    parser.add_argument("--checkpoints", default="400,600,800,1000,1200,1400")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--seeds", default="0,1,2", help="validation noise seeds (a run's train.seed)")
    parser.add_argument("--validation-references", default="data,teacher")
    parser.add_argument("--data", default="digits", help="the run's data.source")
    parser.add_argument("--feature", default="digits-classifier")
    parser.add_argument("--validation-feature", default="", help="the feature validation ranks with (default: "
                                                                    "--feature; latent-random-conv on a latent teacher)")
    parser.add_argument("--samplers", default="", help="scheduler classes the truth samples with (default: exported)")
    parser.add_argument("--validation-sampler", default="", help="the scheduler validation ranks with (default: "
                                                                     "exported)")
    parser.add_argument("--no-truth", action="store_true")
    parser.add_argument("--no-validation", action="store_true")
    args = parser.parse_args()
    run, references = Path(args.run), [float(r) for r in args.references.split(",")]
    feature = load_feature_network(args.feature)
    student, teacher = load_pipeline(str(run / "student")), load_pipeline(args.teacher)
    real = load_real_set(args.data, feature, student.image_size, student.image_channels, default_cache_dir())
    exported = student.pipeline.scheduler

    def scheduler(name: str):
        return getattr(diffusers, name).from_config(exported.config) if name else exported

    samplers = {name: with_scheduler(scheduler(name))
                for name in (args.samplers.split(",") if args.samplers else [type(exported).__name__])}
    kinds = [] if args.no_validation else args.validation_references.split(",")
    seeds = list(map(int, args.seeds.split(",")))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        validators = {(kind, seed): Validator(teacher, scheduler(args.validation_sampler),
                                              student.denoiser.prediction_type, STEPS, args.samples,
                                              args.validation_feature or args.feature,
                                              Path(scratch) / f"{kind}-{seed}", seed,
                                              DataConfig(source=args.data) if kind == "data" else None)
                      for kind in kinds for seed in seeds}
        for step in map(int, args.checkpoints.split(",")):
            tensors, _ = checkpoint.load(checkpoint_at(run, step))
            student.denoiser.unet.load_state_dict(tensors["student"])
            row = {"step": step}
            for (name, sample), k in ([] if args.no_truth else [(s, k) for s in samplers.items() for k in STEPS]):
                fds = [sampled_fd(student.denoiser, sample, k, seed, 1000, feature, real) for seed in range(4)]
                row[f"truth {name} k={k}"] = round(mean_ratio(fds, references), 3)
                row[f"truth {name} k={k} per seed"] = [round(fd / r, 3) for fd, r in zip(fds, references)]
            for (kind, seed), validator in validators.items():
                fds = validator(student.denoiser.unet)
                row[f"{kind} seed {seed}"] = {k: round(fd, 2) for k, fd in fds.items()}
                row[f"{kind} seed {seed} score"] = geometric_mean(fds.values())
            rows.append(row)
            print(json.dumps(row), flush=True)
    for (kind, seed) in validators:
        pick = min(rows, key=lambda r: r[f"{kind} seed {seed} score"])  # first best, as diffkd.selection keeps
        print(f"{kind} reference, seed {seed}: exports step {pick['step']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
