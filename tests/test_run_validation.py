"""In-run validation (diffkd.run_validation, diffkd.selection): the record picks the first best by the geometric
mean of its per-k FDs and counts the validations since, early stopping fires after ``patience`` of them, the
references are the training images or the teacher's samples of the validation's own noise, that noise is none the
evaluation draws, the random feature network is a pure function of its seed, and a validated run exports the
weights its record names and resumes to the same choice."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from diffkd.api import distill, make_validator, prepare
from diffkd.conditioning import batch_conditioning, encode_captions, validation_prompts
from diffkd.config import parse_config
from diffkd.data import load_digits, load_images
from diffkd.errors import DiffkdError
from diffkd.evaluation.features import load_feature_network, to_uint8
from diffkd.evaluation.frechet import frechet_distance, frechet_distance_of_features, gaussian_stats
from diffkd.evaluation.random_features import LatentRandomConvFeatures, RandomConvFeatures
from diffkd.evaluation.sweep import batch_noise
from diffkd.glyphs import glyphs
from diffkd.guidance_embedding import guidance_scale_embedding
from diffkd.run_validation import (
    NOISE_STREAM,
    REFERENCE_FILE,
    REFERENCE_STEPS,
    Validator,
    default_feature,
    validation_noise,
)
from diffkd.sampling import ddim_sample, scheduler_sample
from diffkd.selection import Selection
from diffkd.trainer import Trainer, make_accelerator
from tests import faults
from tests.captioned_sets import flat_rows, write_metadata_folder


def test_selection_keeps_the_first_best_and_counts_validations_since():
    selection = Selection()
    for step, fd in [(10, 5.0), (20, 3.0), (30, 3.0), (40, 4.0)]:
        selection.record(step, {4: fd}, "net")
    assert (selection.best_step, selection.best_fd, selection.since_best) == (20, 3.0, 2)
    assert selection.should_stop(2) and not selection.should_stop(3) and not selection.should_stop(0)
    assert selection.record(50, {4: 2.5}, "net") and selection.since_best == 0 and not selection.should_stop(1)


def test_selection_ranks_by_the_geometric_mean_over_k():
    """sqrt(32 * 2) = 8 beats sqrt(4 * 20) = 8.94, though the second's arithmetic mean (12) is less than the
    first's (17): a step count whose FDs run higher must not outweigh the others. A NaN FD is never best."""
    selection = Selection()
    assert selection.record(100, {2: float("nan"), 4: 1.0}, "net")
    assert selection.record(200, {2: 32.0, 4: 2.0}, "net") and selection.best_fd == pytest.approx(8.0)
    assert not selection.record(300, {2: 4.0, 4: 20.0}, "net")
    assert selection.best_step == 200 and selection.history[-1]["fd"] == pytest.approx(math.sqrt(80))
    assert selection.history[1]["fd_per_k"] == {"2": 32.0, "4": 2.0}


def test_a_record_goes_on_in_one_feature_networks_fds():
    """FDs of two networks are two scales: a record extends only validations by its own network; one kept before
    the network was recorded was scored on decoded images, so it extends an image feature and not a latent one."""
    selection = Selection()
    assert selection.extends("latents", reads_images=False)  # nothing recorded yet
    selection.record(10, {4: 5.0}, "images")
    assert selection.extends("images", reads_images=True) and not selection.extends("latents", reads_images=False)
    with pytest.raises(ValueError, match="cannot extend"):
        selection.record(20, {4: 1.0}, "latents")
    legacy = Selection(history=[{"step": 10, "fd": 5.0, "fd_per_k": {"4": 5.0}}], best_step=10, best_fd=5.0)
    assert legacy.extends("images", reads_images=True) and not legacy.extends("latents", reads_images=False)


def test_validation_noise_is_no_noise_the_evaluation_draws():
    """The checkpoint is chosen on noise of its own stream, not on the evaluation's batches (seed x 1,000,003 +
    batch) that judge it afterwards."""
    shape = (1, 8, 8)
    noise = validation_noise(250, shape, 0)
    assert torch.equal(noise, torch.randn(250, *shape, generator=torch.Generator().manual_seed(NOISE_STREAM)))
    for seed in range(4):
        for batch in range(4):
            assert not torch.allclose(noise, batch_noise(shape, seed, batch, 250, torch.device("cpu")))


def test_random_conv_features_are_a_pure_function_of_the_seed():
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    first, second = RandomConvFeatures()(images), RandomConvFeatures()(images)
    assert first.shape == (6, 640) and torch.equal(first, second)
    assert not torch.equal(first, RandomConvFeatures(seed=1)(images))
    grey = RandomConvFeatures()(images[:, :1].repeat(1, 3, 1, 1))
    assert torch.equal(RandomConvFeatures()(images[:, :1]), grey)  # grey reads as grey RGB


def test_random_conv_weights_are_he_scaled():
    """std sqrt(2 / (9 fan_in)) per 3x3 conv (He et al. 2015): features neither vanish nor explode with depth."""
    for conv in RandomConvFeatures().convs:
        expected = (2 / (conv.in_channels * 9)) ** 0.5
        assert abs(conv.weight.std().item() / expected - 1) < 0.1


def test_random_conv_separates_distributions():
    """Flat grey patches and noise patches differ in FD by far more than two draws of the same noise."""
    network = load_feature_network("random-conv")
    noise = [torch.randint(0, 256, (200, 3, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    flat = torch.randint(100, 156, (200, 3, 1, 1), dtype=torch.uint8).expand(200, 3, 16, 16)
    same = frechet_distance_of_features(network(noise[0]), network(noise[1]))
    assert frechet_distance_of_features(network(noise[0]), network(flat)) > 10 * same


def test_default_feature_fits_the_teacher():
    assert default_feature(1) == "digits-classifier" and default_feature(3) == "random-conv"
    assert default_feature(3, "glyphs") == "glyphs-classifier" and default_feature(1, "glyphs") == "digits-classifier"
    assert default_feature(3, "photos", latent=True) == "latent-random-conv"
    assert default_feature(3, "glyphs", latent=True) == "glyphs-classifier"  # the evaluation's classifier first


def test_latent_random_conv_is_the_image_network_on_latents_of_any_channel_count():
    """Three latent channels read as the image network reads [-1, 1] pixels, without the uint8 scaling; four get
    their own seeded first layer, He-scaled for its fan-in."""
    x = torch.randn(5, 3, 8, 8)
    image_network = RandomConvFeatures()
    torch.testing.assert_close(LatentRandomConvFeatures(3)(x), image_network((x + 1) * 127.5))
    four, latents = LatentRandomConvFeatures(4), torch.randn(5, 4, 8, 8)
    assert four.convs[0].weight.shape == (32, 4, 3, 3)
    assert torch.equal(four(latents), LatentRandomConvFeatures(4)(latents))
    assert abs(four.convs[0].weight.std().item() / (2 / 36) ** 0.5 - 1) < 0.15


def latent_validated(teacher: str, **train) -> dict:
    config = validated(teacher, validate_steps=[1, 2], **train)
    config["data"] = {"source": "digits", "convert": True, "resize": True}
    return config


def test_a_latent_teachers_validation_scores_its_latents_against_the_training_images_encoded(tiny_ldm, tmp_path):
    """auto on a latent teacher: the reference is the training images' latents (as the autoencoder encodes them
    for training) and the student's samples are scored as latents, never decoded; named, random-conv decodes."""
    config = parse_config(latent_validated(tiny_ldm))
    teacher, method, _ = prepare(config)
    validator = make_validator(config, teacher, method, tmp_path / "latent")
    assert validator.feature.name == "latent-random-conv" and validator.feature.latents
    with torch.no_grad():
        latents = teacher.denoiser.encode(load_images("digits", 8, 3, resize=True, convert=True))
    mu, sigma = gaussian_stats(validator.feature(latents))
    torch.testing.assert_close(validator.reference()[0], mu)
    torch.testing.assert_close(validator.reference()[1], sigma)
    student = teacher.denoiser.like(method.student, method.prediction_type)  # v: LDM's betas
    sampled = scheduler_sample(student, type(validator.scheduler).from_config(validator.scheduler.config),
                               validator.noise, 2)
    by_hand = frechet_distance(*gaussian_stats(validator.feature(sampled)), mu, sigma)
    assert validator(method.student)[2] == pytest.approx(by_hand, rel=1e-6)

    decoded = make_validator(parse_config(latent_validated(tiny_ldm, validate_feature="random-conv")), teacher, method,
                             tmp_path / "decoded")
    images = to_uint8(teacher.denoiser.decode(sampled))
    by_hand = frechet_distance(*gaussian_stats(decoded.feature(images)), *decoded.reference())
    assert decoded(method.student)[2] == pytest.approx(by_hand, rel=1e-6)


def test_the_latent_feature_needs_a_latent_teacher(tiny_teacher, tmp_path):
    config = parse_config(validated(tiny_teacher, validate_feature="latent-random-conv"))
    teacher, method, _ = prepare(config)
    with pytest.raises(DiffkdError, match="latent teacher's latents.*use random-conv"):
        make_validator(config, teacher, method, tmp_path)


def test_patience_needs_validation():
    with pytest.raises(DiffkdError, match="train.validate_every"):
        parse_config({"train": {"patience": 2}})


def validated(teacher: str, steps: int = 8, **train) -> dict:
    config = faults.consistency_config(teacher)
    config["method"]["num_steps"] = steps
    config["train"].update(validate_every=2, validate_samples=16, **train)
    return config


def test_the_data_reference_is_the_training_images(tiny_teacher, tmp_path):
    """auto, on a run that trains on the embedded digits: the reference statistics are those of the digits."""
    config = parse_config(validated(tiny_teacher))
    teacher, method, _ = prepare(config)
    validator = make_validator(config, teacher, method, tmp_path)
    features = validator.feature(to_uint8(load_digits(8)))
    mu, sigma = validator.reference()
    assert validator.steps == (4,) and "training images" in validator.reference_name
    assert torch.allclose(mu, gaussian_stats(features)[0]) and torch.allclose(sigma, gaussian_stats(features)[1])


def test_the_teacher_reference_samples_the_students_own_noise(tiny_teacher, tmp_path):
    """Paired: the teacher's DDIM-64 samples of exactly the noise the student is validated on, cached, and read
    back by a validator of the same noise only."""
    config = parse_config(validated(tiny_teacher, validate_reference="teacher", validate_steps=[2, 4]))
    teacher, method, _ = prepare(config)
    validator = make_validator(config, teacher, method, tmp_path)
    images = ddim_sample(teacher.denoiser, validator.noise, REFERENCE_STEPS)
    mu, sigma = gaussian_stats(validator.feature(to_uint8(teacher.denoiser.decode(images))))
    assert validator.steps == (2, 4)
    assert torch.allclose(validator.reference()[0], mu, atol=1e-5)
    assert torch.allclose(validator.reference()[1], sigma, atol=1e-5)
    other = make_validator(parse_config(validated(tiny_teacher, validate_reference="teacher", seed=1)), teacher,
                           method, tmp_path)
    assert not torch.allclose(other.reference()[0], mu, atol=1e-5)  # not the first validator's cache


def test_a_data_reference_needs_an_in_memory_set(tiny_teacher, tmp_path):
    config = parse_config(validated(tiny_teacher, validate_reference="data"))
    teacher, method, _ = prepare(config)
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "metadata.jsonl").write_text("")
    config.data.source = str(tmp_path / "set")
    with pytest.raises(DiffkdError, match="validate_reference=teacher"):
        make_validator(config, teacher, method, tmp_path)
    config.train.validate_reference = "auto"
    assert make_validator(config, teacher, method, tmp_path).data is None


def test_validate_steps_and_reference_are_checked():
    assert parse_config({"train": {"validate_steps": "2,4"}}).train.validate_steps == [2, 4]
    assert parse_config({"train": {"validate_steps": 4}}).train.validate_steps == [4]
    with pytest.raises(DiffkdError, match="train.validate_steps"):
        parse_config({"train": {"validate_steps": [0]}})
    with pytest.raises(DiffkdError, match="train.validate_reference must be one of auto, data, teacher"):
        parse_config({"train": {"validate_reference": "images"}})


def test_validated_run_exports_the_best_weights_and_says_which(tiny_teacher, tmp_path):
    folder = distill(parse_config(validated(tiny_teacher)), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "training_summary.json").read_text())["validation"]
    assert [h["step"] for h in record["history"]] == [2, 4, 6, 8]
    assert record["best_fd"] == min(h["fd"] for h in record["history"])
    assert 0 < record["share_of_wall_time"] < 1
    card = (folder / "README.md").read_text()
    assert f"exported_step: {record['best_step']}" in card and "![validation]" in card
    config = parse_config(validated(tiny_teacher))
    teacher, method, _ = prepare(config)
    exported = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    method.student.load_state_dict(exported)
    validator = make_validator(config, teacher, method, tmp_path / "run")
    best = next(h for h in record["history"] if h["step"] == record["best_step"])
    assert validator(method.student)[4] == pytest.approx(best["fd_per_k"]["4"], rel=1e-9)


class ScriptedValidator:
    """Returns ``fds`` in turn as 4-step FDs by the network ``scale``: the choice of step is then known in advance."""

    def __init__(self, fds: list[float], scale: str = "scripted", latents: bool = False):
        self.values, self.feature_identity, self.feature = iter(fds), scale, SimpleNamespace(latents=latents)

    def __call__(self, _student) -> dict[int, float]:
        return {4: next(self.values)}


def scripted_trainer(teacher: str, output, fds: list[float], scale: str = "scripted", latents: bool = False,
                     **train) -> Trainer:
    """A trainer validated by a ScriptedValidator."""
    config = parse_config(validated(teacher, **train))
    _, method, _ = prepare(config)
    trainer = Trainer(method, config.train, output, make_accelerator(config.train, output))
    trainer.validator = ScriptedValidator(fds, scale, latents)
    return trainer


def test_patience_stops_the_run_and_keeps_the_best_weights(tiny_teacher, tmp_path):
    trainer = scripted_trainer(tiny_teacher, tmp_path / "run", [3.0, 2.0, 4.0, 5.0], patience=2, ema_decay=0.0)
    progress = trainer.fit()
    assert progress.validation["history"][-1]["step"] == 8 and progress.validation["best_step"] == 4
    trainer = scripted_trainer(tiny_teacher, tmp_path / "stopped", [3.0, 2.0, 4.0, 5.0, 1.0], patience=2,
                               steps=12, ema_decay=0.0)
    progress = trainer.fit()
    assert progress.validation["stopped_early"] and [h["step"] for h in progress.validation["history"]] == [2, 4, 6, 8]
    assert progress.round == 1  # the round ended at the stop, its checkpoint written
    assert trainer.best_weights.keys() == {k for k, p in trainer.student.state_dict().items()}


def test_validation_scores_and_keeps_the_ema_weights_that_would_be_exported(tiny_teacher, tmp_path):
    """With an export EMA, the last validation (here the best) keeps exactly the weights the round's end exports."""
    trainer = scripted_trainer(tiny_teacher, tmp_path / "run", [4.0, 3.0, 2.0, 1.0])
    trainer.fit()
    exported = trainer.student.state_dict()
    assert trainer.progress.validation["best_step"] == 8
    assert all(torch.equal(trainer.best_weights[k], exported[k]) for k in exported)


def test_a_resumed_run_restores_the_validation_record_and_best_weights(tiny_teacher, tmp_path):
    trainer = scripted_trainer(tiny_teacher, tmp_path / "run", [3.0, 2.0, 4.0, 5.0])
    trainer.fit()
    from diffkd import checkpoint

    middle = checkpoint.complete(tmp_path / "run" / "checkpoints")[0]  # step 6 of 8 (the last two are kept)
    resumed = scripted_trainer(tiny_teacher, tmp_path / "run", [])
    resumed.restore(middle)
    assert resumed.progress.validation["best_step"] == 4 and len(resumed.progress.validation["history"]) == 3
    assert all(torch.equal(resumed.best_weights[k], v) for k, v in trainer.best_weights.items())


def test_a_record_by_another_feature_network_starts_afresh_on_resume(tiny_teacher, tmp_path, caplog):
    """A checkpoint whose validations another network scored (``auto`` resolving otherwise than when the run
    started) resumes its training with an empty validation record and no best weights, saying so; a record kept
    before the network was recorded goes on under an image feature and starts afresh under a latent one."""
    scripted_trainer(tiny_teacher, tmp_path / "run", [3.0, 2.0, 4.0, 5.0], scale="images").fit()
    from diffkd import checkpoint

    middle = checkpoint.complete(tmp_path / "run" / "checkpoints")[0]  # step 6: validations at 2, 4, 6

    def resumed(scale: str, latents: bool) -> Trainer:
        trainer = scripted_trainer(tiny_teacher, tmp_path / "run", [], scale=scale, latents=latents)
        trainer.restore(middle)
        assert trainer.progress.step == 6  # the training goes on either way
        return trainer

    assert len(resumed("images", False).progress.validation["history"]) == 3
    other = resumed("latents", True)
    assert other.progress.validation == {} and other.best_weights == {}
    assert "scored by images and this run validates with latents" in caplog.text
    state = json.loads((middle / "state.json").read_text())
    del state["progress"]["validation"]["scored_by"]
    (middle / "state.json").write_text(json.dumps(state))
    assert len(resumed("images", False).progress.validation["history"]) == 3
    assert resumed("latents", True).progress.validation == {}
    assert "scored by decoded images" in caplog.text


@pytest.mark.slow
def test_killed_validated_run_resumes_bit_identical(tiny_teacher, tmp_path):
    """SIGKILL after backward at step 5 (the record of steps 2 and 4 and their best weights come from the step-4
    checkpoint): the resumed run exports the same weights and keeps the same record."""
    config = faults.write_yaml(validated(tiny_teacher), tmp_path / "validated.yaml")
    reference = faults.reference_run("consistency", config, tmp_path)
    point = next(p for p in faults.KILL_POINTS if p.method == "consistency" and "after backward" in p.name)
    result = faults.kill_and_resume(point, config, reference, tmp_path / "killed")
    assert result.killed and result.identical, result.detail
    records = [json.loads((folder / "training_summary.json").read_text())["validation"]
               for folder in (tmp_path / "reference-consistency", tmp_path / "killed")]
    assert records[0]["history"] == records[1]["history"]


def text_validated(teacher: str, steps: int = 4, method: dict | None = None, **train) -> dict:
    """A consistency student of the tiny text teacher, guided at w = 3, validated on 16 noises of two prompts."""
    config = validated(teacher, steps, **{"validate_batch_size": 5, **train})  # odd chunks: rows 5-9 start on "a dog"
    config["method"].update({"guidance_scale": 3.0, **(method or {})})
    config["data"] = {"source": "digits", "convert": True, "prompts": ["a cat", "a dog"]}
    return config


@pytest.mark.parametrize("layout", ["tiny_sd", "tiny_sd3"])
def test_a_text_teachers_reference_is_its_guided_samples_of_the_same_noise_and_prompts(layout, request, tmp_path):
    """Paired for text too: the teacher's DDIM-64 samples of the validation's noise, each for its own prompt (cycled)
    and guided at the method's w, as the student is trained, whose samples are one unguided pass a step; another w
    gives another reference. A UNet and a rectified-flow transformer teacher with pooled text inputs alike."""
    source = request.getfixturevalue(layout)
    config = parse_config(text_validated(source, validate_reference="teacher"))
    teacher, method, _ = prepare(config)
    validator = make_validator(config, teacher, method, tmp_path / "w3")
    rows = encode_captions(teacher, ["a cat", "a dog"] * 8)
    images = ddim_sample(teacher.denoiser, validator.noise, REFERENCE_STEPS, batch_conditioning(rows, 3.0))
    assert validator.feature.name == "latent-random-conv"  # auto on a latent teacher: its latents, not decoded
    mu, sigma = gaussian_stats(validator.feature(images))
    assert validator.describe()["prompts"] == "data.prompts / data.prompts_file"
    assert torch.allclose(validator.reference()[0], mu, atol=1e-4)
    assert torch.allclose(validator.reference()[1], sigma, atol=1e-4)
    student = teacher.denoiser.like(method.student)  # one unguided pass: the guidance is distilled into it
    samples = torch.cat([scheduler_sample(  # LCM's fresh noise is seeded by each chunk's noise: chunks of 5
        student, type(validator.scheduler).from_config(validator.scheduler.config), z, 4,
        batch_conditioning({k: v[i:i + 5] for k, v in rows.items()}, 3.0).unguided())
        for i, z in zip(range(0, 16, 5), validator.noise.split(5))])
    by_hand = frechet_distance(*gaussian_stats(validator.feature(samples)), *validator.reference())
    assert validator(method.student)[4] == pytest.approx(by_hand, rel=1e-4)
    unguided = parse_config(text_validated(source, validate_reference="teacher", method={"guidance_scale": 1.0}))
    other = make_validator(unguided, teacher, prepare(unguided)[1], tmp_path / "w3")  # same folder: not its cache
    assert not torch.allclose(other.reference()[0], mu, atol=1e-3)


def test_a_guidance_embedded_student_is_validated_at_the_teachers_w(tiny_sd, tmp_path):
    """With a w range, each validation noise gets one w, the same at every validation: the teacher's reference is
    guided at it and the student is told it through its guidance embedding, in one unguided pass."""
    config = parse_config(text_validated(tiny_sd, method={"guidance_scale": 1.0, "guidance": {
        "w_min": 2.0, "w_max": 8.0, "embedding_dim": 8}}, validate_reference="teacher"))
    teacher, method, _ = prepare(config)
    validator = make_validator(config, teacher, method, tmp_path)
    z = validator.noise[:16]
    teacher_cond, student_cond = validator.conditions(0, z)
    again = validator.conditions(0, z)
    w = teacher_cond.guidance_scale
    assert w.shape == (16,) and torch.all((w >= 2.0) & (w <= 8.0)) and torch.equal(again[0].guidance_scale, w)
    assert teacher_cond.guided and not student_cond.guided
    assert torch.equal(student_cond.timestep_cond, guidance_scale_embedding(w, 8))
    assert torch.equal(student_cond.encoder_hidden_states, encode_captions(teacher, ["a cat", "a dog"] * 8)[
        "encoder_hidden_states"])


def test_a_validated_text_run_exports_the_best_weights(tiny_sd, tmp_path):
    """The unconditional test's check on a text teacher: the exported UNet, validated again, gives the FD the
    record holds for the exported step."""
    raw = text_validated(tiny_sd, validate_reference="teacher")
    folder = distill(parse_config(raw), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "training_summary.json").read_text())["validation"]
    assert [h["step"] for h in record["history"]] == [2, 4]
    config = parse_config(raw)
    teacher, method, _ = prepare(config)
    method.student.load_state_dict(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    best = next(h for h in record["history"] if h["step"] == record["best_step"])
    assert make_validator(config, teacher, method, tmp_path / "run")(method.student)[4] == pytest.approx(
        best["fd_per_k"]["4"], rel=1e-6)
    assert "prompts: data.prompts" in (folder / "README.md").read_text()


def test_validation_prompts_are_the_runs_own(tmp_path):
    """The set's captions in row order (glyphs; a captioned folder, read without decoding), else data.prompts,
    cycled to the sample count."""
    glyph_prompts, source = validation_prompts(parse_config({"data": {"source": "glyphs", "num_glyphs": 3}}).data, 5)
    captions = [item.caption for item in glyphs(3)]
    assert glyph_prompts == captions + captions[:2] and source == "the training set's captions"
    folder = write_metadata_folder(tmp_path / "set", 4, flat_rows())
    assert validation_prompts(parse_config({"data": {"source": str(folder)}}).data, 3)[0] == [
        "image 0", "image 1", "image 2"]
    assert validation_prompts(parse_config({"data": {"prompts": ["a", "b"]}}).data, 3) == (
        ["a", "b", "a"], "data.prompts / data.prompts_file")
    with pytest.raises(DiffkdError, match="data.prompts"):
        validation_prompts(parse_config({"data": {"source": "digits"}}).data, 3)


def test_a_validated_lora_run_exports_the_best_adapters(tiny_sd, tmp_path, monkeypatch):
    """A LoRA student (adapters on the teacher's UNet) exports the validated step's adapters: the fused student
    the run writes beside them scores the FD the record holds for that step. The record's later FDs are scaled up
    (x 1.5, x 2: the validator's real FDs otherwise), so the best is step 2 whatever the few steps' noise does, and
    the last adapters' real FD shows that exporting them would score otherwise."""
    from diffusers import UNet2DConditionModel

    real_call, calls = Validator.__call__, []

    def later_ones_worse(self, student, scheduler=None):
        calls.append(None)
        return {k: fd * (1 + 0.5 * (len(calls) - 1)) for k, fd in real_call(self, student, scheduler).items()}

    monkeypatch.setattr(Validator, "__call__", later_ones_worse)
    raw = text_validated(tiny_sd, steps=6, validate_reference="teacher")
    raw["student"] = {"lora": {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
                               "fuse": True}}
    distill(parse_config(raw), tmp_path / "run")
    monkeypatch.undo()
    record = json.loads((tmp_path / "run" / "training_summary.json").read_text())["validation"]
    assert [h["step"] for h in record["history"]] == [2, 4, 6] and record["best_step"] == 2
    config = parse_config(raw)
    teacher, method, _ = prepare(config)
    fused = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "student-fused", subfolder="unet")
    best, last = record["history"][0]["fd"], record["history"][-1]["fd"] / 2
    assert abs(last - best) > 1e-3 * best  # the last adapters score otherwise (100x the tolerance below)
    assert make_validator(config, teacher, method, tmp_path / "run")(fused)[4] == pytest.approx(best, rel=1e-5)


def test_a_text_run_on_a_streamed_captioned_set_validates_on_its_captions(tiny_sd, tmp_path):
    """A captioned folder streams (no images in memory), so auto takes the teacher's reference, drawn for the
    set's own captions in row order."""
    folder = write_metadata_folder(tmp_path / "set", 24, flat_rows(mode="RGB"))
    raw = text_validated(tiny_sd)
    raw["data"] = {"source": str(folder), "num_workers": 0}
    config = parse_config(raw)
    teacher, method, _ = prepare(config)
    validator = make_validator(config, teacher, method, tmp_path / "run")
    assert validator.data is None and validator.describe()["prompts"] == "the training set's captions"
    expected = encode_captions(teacher, [f"image {i}" for i in range(16)])["encoder_hidden_states"]
    assert torch.equal(validator.text.rows["encoder_hidden_states"], expected)
    distill(config, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "training_summary.json").read_text())["validation"]
    assert [h["step"] for h in record["history"]] == [2, 4]
    assert (tmp_path / "run" / "validation" / REFERENCE_FILE).is_file()  # the teacher's samples, cached
