"""The teacher panel: teachers no recipe was tuned on, each distilled by the default recipe with only
``teacher.source`` and ``data.source`` changed, in one table against each teacher's DDIM-64 and the best
training-free solver at the same k.

The panel's data is made here from images scikit-learn ships (``load_sample_images``: china.jpg, flower.jpg), cut
into 16 px RGB patches; its feature network is the seeded random conv network (``random-conv``): the digits
classifier reads grey digits, and it needs neither a download nor training. Keep these teachers out of recipe
tuning: a recipe change is judged on digits and then checked here.

    python eval/panel.py [--teachers photo-eps,photo-v,photo-flow,photo-latent-eps] [--seeds 0,1,2,3] [--num-samples 1000]
        [--teacher-steps 3000] [--teacher-widths 32,64,64] [--validated] [--student-set SECTION.KEY=VALUE ...]

A teacher is one ``PanelTeacher`` line in ``PANEL``: its data and the ``denoise`` options that make it (epsilon,
v and rectified flow, each a pixel-space UNet; and an LDMPipeline, epsilon on the latents of a VQModel the ``vq``
method trains first).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("panel")

PATCH = 16


@dataclass(frozen=True)
class PanelTeacher:
    name: str
    data: str  # a key of DATA
    method: dict = field(default_factory=dict)  # overrides of configs/digits-teacher.yaml's method section
    autoencoder: dict | None = None  # a latent teacher: the vq stage's options; its UNet trains on those latents


DATA = {"photo-patches": "sklearn sample images (china.jpg, flower.jpg) at 1/4 and 1/3 scale, 16 px RGB patches, "
                         "stride 8, with their mirror images"}

PANEL = [
    PanelTeacher("photo-eps", "photo-patches", {"prediction_type": "epsilon", "beta_schedule": "linear",
                                                "clip_sample": False}),
    PanelTeacher("photo-v", "photo-patches", {"prediction_type": "v_prediction",
                                              "beta_schedule": "squaredcos_cap_v2", "clip_sample": True}),
    PanelTeacher("photo-flow", "photo-patches", {"prediction_type": "flow", "shift": 1.0}),
    # LDM's own kind (CompVis/ldm-celebahq-256): epsilon on a VQModel's latents, 16 px -> 8x8x3, 256 codes
    PanelTeacher("photo-latent-eps", "photo-patches", {"prediction_type": "epsilon", "beta_schedule": "linear",
                                                       "clip_sample": False},
                 autoencoder={"num_steps": 1500, "sample_size": PATCH, "block_out_channels": [32, 64],
                              "latent_channels": 3, "num_vq_embeddings": 256}),
]


def photo_patches(folder: Path) -> Path:
    """Write the patch set as PNGs (once): a folder is a data.source and an eval.reference as it stands."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for image in load_sample_images().images:
        for scale in (4, 3):
            small = np.asarray(Image.fromarray(image).resize((image.shape[1] // scale, image.shape[0] // scale),
                                                              Image.Resampling.LANCZOS))
            for top in range(0, small.shape[0] - PATCH + 1, PATCH // 2):
                for left in range(0, small.shape[1] - PATCH + 1, PATCH // 2):
                    patch = small[top:top + PATCH, left:left + PATCH]
                    for variant in (patch, patch[:, ::-1]):
                        Image.fromarray(np.ascontiguousarray(variant)).save(folder / f"{count:05d}.png")
                        count += 1
    (folder / "done").write_text(str(count))
    log.info("wrote %d patches to %s", count, folder)
    return folder


def teacher_config(teacher: PanelTeacher, data: Path, steps: int, widths: list[int] | None = None,
                   components: Path | None = None) -> dict:
    """configs/digits-teacher.yaml made RGB, with the panel teacher's options (and, for a quick look on a busy
    machine, fewer steps or narrower blocks); a latent teacher's UNet trains on ``components``' latents."""
    config = yaml.safe_load((ROOT / "configs" / "digits-teacher.yaml").read_text())
    config["method"].update(channels=3, num_steps=steps, **teacher.method)
    if components is not None:
        config["method"]["components"] = str(components)
    if widths:
        config["method"]["block_out_channels"] = widths
    config["data"]["source"] = str(data)
    return config


def autoencoder_config(teacher: PanelTeacher, data: Path) -> dict:
    """A latent teacher's first stage: the vq method on the panel's data, with the digits teacher's training
    options less its EMA (as configs/glyphs-vae.yaml trains its autoencoder)."""
    config = yaml.safe_load((ROOT / "configs" / "digits-teacher.yaml").read_text())
    return {"method": {"name": "vq", **teacher.autoencoder}, "data": {"source": str(data)},
            "train": {**config["train"], "batch_size": 32, "ema_decay": 0.0}}


VALIDATED = {"method": {"num_steps": 1400}, "train": {"validate_every": 200, "validate_steps": [2, 4]}}


def student_config(teacher: Path, data: Path, validated: bool, settings: list[str] = ()) -> dict:
    """The default recipe with only teacher.source and data.source changed (the evaluation is run here); with
    ``validated``, also the longer validated run its comment names (``VALIDATED``); ``settings``: further
    SECTION.KEY=VALUE changes (as ``--set`` reads them), to measure an option against the default."""
    from diffkd.config import apply_override

    config = yaml.safe_load((ROOT / "configs" / "digits-consistency.yaml").read_text())
    config["teacher"]["source"], config["data"]["source"] = str(teacher), str(data)
    if validated:
        for section, values in VALIDATED.items():
            config.setdefault(section, {}).update(values)
    for setting in settings:
        apply_override(config, setting)
    return {**config, "run_eval": False}


def student_name(validated: bool, settings: list[str]) -> str:
    """The run's folder: ``student``, ``student-validated``, with each setting appended as a slug."""
    slugs = [re.sub(r"[^A-Za-z0-9]+", "-", setting.split(".", 1)[-1]).strip("-") for setting in settings]
    return "-".join(["student", *(["validated"] if validated else []), *slugs])


def run(config: dict, output: Path) -> Path:
    from diffkd.api import distill
    from diffkd.config import parse_config

    if (output / "finished.json").is_file():
        return Path(json.loads((output / "finished.json").read_text())["pipeline"])
    return distill(parse_config(config), output, resume=True)


def evaluate_seed(student: Path, teacher: Path, data: Path, seed: int, num_samples: int, output: Path) -> dict:
    from diffkd.eval_options import EvalConfig
    from diffkd.evaluation.sweep import evaluate

    path = output / "results.json"
    if path.is_file():
        return json.loads(path.read_text())
    results = evaluate(EvalConfig(pipelines=[str(student)], teacher=str(teacher), steps=[2, 4], reference=str(data),
                                  feature="random-conv", num_samples=num_samples, seed=seed, fidelity=False,
                                  output=str(output)))
    return results.to_dict()


def ratios(results: dict) -> dict:
    """Student FD over the teacher's DDIM-64 FD at k = 2, 4, and over the best training-free solver's at 4."""
    rows = results["rows"]
    reference = next(r["fd"] for r in rows if r["is_reference"])
    student = {r["steps"]: r["fd"] for r in rows if r["role"] == "student"}
    solver4 = min(r["fd"] for r in rows if r["role"] == "teacher" and not r["is_reference"] and r["steps"] == 4)
    return {"reference_fd": reference, "student_2": student[2] / reference, "student_4": student[4] / reference,
            "student_4_vs_solver": student[4] / solver4, "best_solver_4": solver4 / reference}


def table(figures: dict[str, list[dict]], summaries: dict[str, dict]) -> str:
    from statistics import mean, stdev

    def cell(values: list[float]) -> str:
        return f"{mean(values):.2f}" + (f" ± {stdev(values):.2f}" if len(values) > 1 else "")

    header = ("| teacher | seeds | teacher DDIM-64 FD | student 4 / DDIM-64 (target <= 1.25) | student 4 / best "
              "solver 4 (<= 0.5) | student 2 / DDIM-64 (<= 1.5) | best solver 4 / DDIM-64 | exported step (of last) | "
              "exported sampler |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for name, seeds in figures.items():
        summary = summaries[name]
        lines.append(f"| {name} | {len(seeds)} | {cell([s['reference_fd'] for s in seeds])} | "
                     f"{cell([s['student_4'] for s in seeds])} | {cell([s['student_4_vs_solver'] for s in seeds])} | "
                     f"{cell([s['student_2'] for s in seeds])} | {cell([s['best_solver_4'] for s in seeds])} | "
                     f"{exported(summary.get('validation'))} | {sampler(summary.get('sampler_choice'))} |")
    return "\n".join(lines)


def exported(record: dict) -> str:
    """Which step the run exported: validation's choice, or its last step when it ran without validation."""
    return f"{record['best_step']} (of {record['history'][-1]['step']})" if record else "last (not validated)"


def sampler(choice: dict | None) -> str:
    """The scheduler the run exported and the validation FD of each it scored; a path with one consistency
    scheduler (flow) scores none."""
    if not choice:
        return "its consistency scheduler (none other offered)"
    scores = ", ".join(f"{name.removesuffix('Scheduler')} {fd:.3g}" for name, fd in choice["fd"].items())
    return f"{choice['exported']} ({scores})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", default=",".join(t.name for t in PANEL))
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--teacher-steps", type=int, default=3000)
    parser.add_argument("--teacher-widths", default="", help="e.g. 16,32,32 (default: the digits teacher's)")
    parser.add_argument("--output", default=str(ROOT / "eval" / "out" / "panel"))
    parser.add_argument("--validated", action="store_true", help="distil with the validated 1,400-step run")
    parser.add_argument("--student-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change the student's recipe (repeatable), e.g. method.student_prediction_type=v_prediction")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.output)
    data = {"photo-patches": photo_patches(out / "data" / "photo-patches")}
    figures, summaries = {}, {}
    widths = [int(w) for w in args.teacher_widths.split(",")] if args.teacher_widths else None
    for teacher in (t for t in PANEL if t.name in args.teachers.split(",")):
        components = (run(autoencoder_config(teacher, data[teacher.data]), out / teacher.name / "vq")
                      if teacher.autoencoder else None)
        pipeline = run(teacher_config(teacher, data[teacher.data], args.teacher_steps, widths, components),
                       out / teacher.name / "teacher")
        name = student_name(args.validated, args.student_set)
        student = run(student_config(pipeline, data[teacher.data], args.validated, args.student_set),
                      out / teacher.name / name)
        summaries[teacher.name] = json.loads((student.parent / "training_summary.json").read_text())
        figures[teacher.name] = [ratios(evaluate_seed(student, pipeline, data[teacher.data], seed, args.num_samples,
                                                      out / teacher.name / f"eval-{name}-seed{seed}"))
                                 for seed in map(int, args.seeds.split(","))]
        print(table(figures, summaries), flush=True)
    print(table(figures, summaries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
