"""The export's sampler choice (diffkd.sampler_choice): the least validation FD wins only by more than the margin,
the swaps the card lists are the candidates within ALSO_WORKS of the winner, a consistency run on an
unconditional VP teacher scores LCM and DDIM and exports exactly the scheduler its record names, and
method.sampler fixes the choice or is refused with the names it may take."""

import json
import math

import pytest
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, LCMScheduler

from diffkd.api import distill, make_chooser, make_validator, prepare
from diffkd.config import parse_config
from diffkd.errors import DiffkdError
from diffkd.methods.base import ExportSpec
from diffkd.paths import VPPath
from diffkd.sampler_choice import choose, pick
from tests import faults


def test_another_sampler_wins_only_by_more_than_the_margin():
    assert pick({"LCM": 10.0, "DDPM": 9.5, "DDIM": 8.0}, "LCM") == "DDIM"  # 0.8x: clearly better
    assert pick({"LCM": 10.0, "DDPM": 9.5, "DDIM": 9.1}, "LCM") == "LCM"  # 0.91x: a near-tie keeps the own
    assert pick({"LCM": 10.0, "DDIM": 8.999}, "LCM") == "DDIM" and pick({"LCM": 10.0, "DDIM": 9.0}, "LCM") == "LCM"
    assert pick({"LCM": math.inf, "DDPM": 50.0, "DDIM": 40.0}, "LCM") == "DDIM"  # a diverged own sampler
    assert pick({"LCM": math.inf, "DDIM": math.inf}, "LCM") == "LCM"


def spec_of(scheduler, **fields) -> ExportSpec:
    return ExportSpec(scheduler, 4, "v_prediction", **fields)


def test_choose_exports_the_winner_and_lists_the_near_ones_as_swaps():
    """Geometric mean over k: DDIM sqrt(2 * 8) = 4 against LCM sqrt(4 * 9) = 6 and DDPM sqrt(4 * 6.25) = 5; DDPM
    is within 1.25x of DDIM (5 <= 5), LCM is not (6 > 5)."""
    lcm, ddpm, ddim = LCMScheduler(), DDPMScheduler(), DDIMScheduler()
    spec = spec_of(lcm, also_samples_with=("TCDScheduler",),
                   alternatives={"DDPMScheduler": spec_of(ddpm), "DDIMScheduler": spec_of(ddim)})
    figures = {LCMScheduler: {2: 4.0, 4: 9.0}, DDPMScheduler: {2: 4.0, 4: 6.25}, DDIMScheduler: {2: 2.0, 4: 8.0}}
    chosen, record = choose(spec, lambda scheduler: figures[type(scheduler)])
    assert chosen.scheduler is ddim and chosen.alternatives == {} and chosen.also_samples_with == ("DDPMScheduler",)
    assert record["exported"] == "DDIMScheduler" and record["own"] == "LCMScheduler"
    assert record["fd"] == pytest.approx({"LCMScheduler": 6.0, "DDPMScheduler": 5.0, "DDIMScheduler": 4.0})
    assert record["fd_per_k"]["DDIMScheduler"] == {"2": 2.0, "4": 8.0}


def test_vp_alternatives_start_at_the_top_of_the_grid_on_any_teacher_spacing():
    """From a teacher whose config samples the leading grid (SD's: 751, 501, 251, 1 at k = 4) the alternatives
    still start from pure noise, as the consistency student was trained to."""
    teacher = DDIMScheduler(timestep_spacing="leading", steps_offset=1, prediction_type="epsilon")
    path = VPPath(teacher.alphas_cumprod)
    lcm = path.consistency_scheduler(teacher, 50, "v_prediction", None, 10.0)
    alternatives = path.consistency_alternatives(lcm)
    assert set(alternatives) == {"DDIMScheduler"}  # DDPM: better than LCM at 4 steps on digits, far worse at 8
    for scheduler in alternatives.values():
        scheduler.set_timesteps(4)
        assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
        assert scheduler.config.prediction_type == "v_prediction"  # the student's, not the teacher's


def sampler_config(teacher: str, sampler: str = "auto") -> dict:
    config = faults.consistency_config(teacher)
    config["method"].update(num_steps=2, sampler=sampler)
    config["train"]["validate_samples"] = 32
    return config


def test_a_run_exports_the_sampler_its_record_names_and_that_sampler_scores_as_recorded(tiny_teacher, tmp_path):
    folder = distill(parse_config(sampler_config(tiny_teacher)), tmp_path / "run")
    choice = json.loads((tmp_path / "run" / "training_summary.json").read_text())["sampler_choice"]
    assert set(choice["fd"]) == {"LCMScheduler", "DDIMScheduler"}
    assert choice["exported"] == pick(choice["fd"], "LCMScheduler") and 0 < choice["share_of_wall_time"]
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe.scheduler).__name__ == choice["exported"]
    card = (folder / "README.md").read_text()
    assert f"exported: {choice['exported']}" in card and "## Sampler" in card
    config = parse_config(sampler_config(tiny_teacher))
    teacher, method, _ = prepare(config)
    method.student.load_state_dict(pipe.unet.state_dict())
    chooser = make_chooser(config, teacher, method, tmp_path / "run")
    assert chooser.steps == (4,) and chooser.samples == 32  # in-run validation's settings
    scored = chooser(method.student, pipe.scheduler)
    assert {str(k): fd for k, fd in scored.items()} == pytest.approx(choice["fd_per_k"][choice["exported"]], rel=1e-9)


def test_a_named_sampler_is_exported_without_scoring(tiny_teacher, tmp_path):
    config = parse_config(sampler_config(tiny_teacher, "DDIMScheduler"))
    teacher, method, _ = prepare(config)
    spec = method.export_spec()
    assert isinstance(spec.scheduler, DDIMScheduler) and spec.alternatives == {} and spec.also_samples_with == ()
    assert make_chooser(config, teacher, method, tmp_path) is None  # nothing to choose


def test_a_sampler_the_path_does_not_offer_is_refused_with_the_names_it_may_take(tiny_teacher, tmp_path):
    with pytest.raises(DiffkdError, match="method.sampler='EulerDiscreteScheduler' .* auto .* LCMScheduler, "
                                          "DDIMScheduler"):
        distill(parse_config(sampler_config(tiny_teacher, "EulerDiscreteScheduler")), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_text_teachers_student_keeps_its_consistency_scheduler(tiny_sd, tmp_path):
    """No unconditional validation for a text teacher: LCMScheduler with the path's swaps, nothing scored."""
    config = parse_config({"method": {"name": "consistency", "teacher_grid": 20}, "teacher": {"source": tiny_sd},
                           "data": {"source": "glyphs"}, "train": {"device": "cpu"}, "run_eval": False})
    teacher, method, _ = prepare(config)
    assert make_chooser(config, teacher, method, tmp_path) is None
    assert isinstance(method.export_spec().scheduler, LCMScheduler)


def test_a_validated_run_chooses_with_its_in_run_validator(tiny_teacher, tmp_path):
    """The same settings: the in-run validator (its reference already made) scores the samplers too."""
    config = parse_config(sampler_config(tiny_teacher))
    config.train.validate_every = 2
    teacher, method, _ = prepare(config)
    validator = make_validator(config, teacher, method, tmp_path)
    assert make_chooser(config, teacher, method, tmp_path, validator) is validator
    assert make_chooser(config, teacher, method, tmp_path) is not validator


def test_a_validated_run_scores_only_the_alternatives_at_its_end(tiny_teacher, tmp_path, monkeypatch):
    """In-run validation already scored the exported (best validated) weights with their own scheduler: the choice
    takes those figures and samples the alternatives alone."""
    from diffkd.run_validation import Validator

    called, validate = [], Validator.__call__
    monkeypatch.setattr(Validator, "__call__", lambda self, student, scheduler=None: called.append(
        type(scheduler).__name__) or validate(self, student, scheduler))
    config = sampler_config(tiny_teacher)
    config["train"]["validate_every"] = 1
    distill(parse_config(config), tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    validation, choice = summary["validation"], summary["sampler_choice"]
    best = next(entry for entry in validation["history"] if entry["step"] == validation["best_step"])
    assert choice["fd_per_k"]["LCMScheduler"] == best["fd_per_k"]
    assert called == ["NoneType", "NoneType", "DDIMScheduler"]  # two validations, then DDIM alone
