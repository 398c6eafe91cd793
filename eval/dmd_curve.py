"""FD vs training steps of a DMD (or any one-network) run on digits-16: every complete checkpoint of RUN (its
student's weights and, when the run keeps one, its export EMA's) and the exported student, sampled at k steps by
the run's exported scheduler (DDIM on the trailing grid while the run has none yet), with the noise that
eval/digits_quality.py uses (same seed, same batches), scored by the digits-classifier FD against the real set.

    python eval/dmd_curve.py --run runs/digits-dmd --steps 1 [--steps 4] [--num-samples 1000] [--reference-steps 64]
        [--seeds 0,1,2,3 --reference eval/out/methods-table]

Prints one row per checkpoint: FD at each k (the mean over the seeds) and its ratio to the teacher's DDIM at
--reference-steps (the mean over the same seeds), sampled here or read from a methods-table run (--reference) or
given (--reference-fd, one per seed).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from student_seeds import own_scheduler, reference_fd, sampled_fd

from diffkd import checkpoint
from diffkd.evaluation.features import load_feature_network
from diffkd.evaluation.reference import default_cache_dir, load_real_set
from diffkd.io import load_pipeline
from diffkd.models import Denoiser
from diffkd.sampling import ddim_sample

log = logging.getLogger("dmd_curve")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a distill output folder (checkpoints/, student/)")
    parser.add_argument("--teacher", default="teachers/digits-16")
    parser.add_argument("--steps", type=int, action="append", default=[])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seeds", default="0", help="evaluation seeds, comma-separated")
    parser.add_argument("--reference-steps", type=int, default=64)
    parser.add_argument("--reference-fd", help="the teacher's reference FD per seed from an earlier run (same noise, "
                        "e.g. eval/digits_quality.py's), comma-separated: skips sampling the teacher")
    parser.add_argument("--reference", help="an eval/methods_table.py output folder whose seedN/results.json give "
                        "the reference FDs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    teacher = load_pipeline(args.teacher)
    feature = load_feature_network("digits-classifier")
    real = load_real_set("digits", feature, teacher.image_size, teacher.image_channels, default_cache_dir())
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.reference_fd:
        references = [float(fd) for fd in args.reference_fd.split(",")]
    elif args.reference:
        references = [reference_fd(Path(args.reference), seed)[0] for seed in seeds]
    else:
        references = [sampled_fd(teacher.denoiser, ddim_sample, args.reference_steps, seed, args.num_samples, feature,
                                 real)
                      for seed in seeds]
        print(f"teacher ddim-{args.reference_steps}: FD {references}", flush=True)
    if len(references) != len(seeds):
        raise SystemExit(f"--reference-fd gives {len(references)} figures for {len(seeds)} seeds")
    reference = sum(references) / len(references)
    run = Path(args.run)
    student = Denoiser(copy.deepcopy(teacher.unet), teacher.denoiser.path, teacher.denoiser.prediction_type,
                       teacher.denoiser.clip_sample)
    names = [name for name, _ in student.unet.named_parameters()]
    sources = []
    for folder in checkpoint.complete(run / "checkpoints"):
        tensors = checkpoint.load(folder)[0]
        sources.append((folder.name, tensors["student"]))
        if "ema.student" in tensors:  # the export EMA's shadow parameters, in parameter order
            shadow = tensors["ema.student"]
            sources.append((f"{folder.name} EMA", {**tensors["student"],
                                                   **{name: shadow[str(i)] for i, name in enumerate(names)}}))
    exported = run / "student" / "unet" / "diffusion_pytorch_model.safetensors"
    if exported.is_file():
        from safetensors.torch import load_file

        sources.append(("exported student", load_file(str(exported))))
    sampler = own_scheduler(load_pipeline(str(run / "student"))) if (run / "student").is_dir() else ddim_sample
    print("| weights | " + " | ".join(f"FD k={k} | ratio k={k}" for k in args.steps) + " |")
    for name, weights in sources:
        student.unet.load_state_dict(weights)
        cells = []
        for k in args.steps:
            fd = sum(sampled_fd(student, sampler, k, seed, args.num_samples, feature, real) for seed in seeds) / len(seeds)
            cells += [f"{fd:.2f}", f"{fd / reference:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
