"""The evaluation sweep on tiny pipelines: same noise everywhere, a report that shows results.json's numbers."""

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torchvision
from diffusers import DDIMPipeline

from diffkd.errors import DiffkdError
from diffkd.evaluation import EvalConfig, evaluate
from diffkd.evaluation.report import fmt
from diffkd.evaluation.sweep import Model, Setting, display_name, sample
from diffkd.io import load_pipeline, save_pipeline
from diffkd.models import Denoiser
from tests.conftest import make_scheduler, make_tiny_unet


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """A tiny clipped v-prediction teacher, and a 'student' that is its exact copy with a diffkd card (k = 2)."""
    root = tmp_path_factory.mktemp("pipes")
    DDIMPipeline(unet=make_tiny_unet(), scheduler=make_scheduler(clip_sample=True)).save_pretrained(root / "teacher")
    teacher = load_pipeline(str(root / "teacher"))
    student = root / "student" / "student"  # diffkd's DIR/student layout: labelled by DIR's name
    save_pipeline(student, teacher, teacher.unet, teacher.denoiser.path.multistep_scheduler(teacher.scheduler, 1, "v_prediction", 1.0),
                  card={"method": "progressive", "num_inference_steps": 2, "teacher": str(root / "teacher")})
    squeezenet = root / "squeezenet.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), squeezenet)
    return str(root / "teacher"), str(student), str(squeezenet)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One statistics cache for the module: the real set's features are computed once."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def swept(pipelines, cache, tmp_path_factory):
    teacher, student, squeezenet = pipelines
    out = tmp_path_factory.mktemp("eval")
    config = EvalConfig(pipelines=[student, teacher], steps=[1, 2], reference_steps=4, num_samples=24, batch_size=10,
                        lpips=True, lpips_net="squeeze", lpips_backbone_weights=squeezenet, grid_size=4,
                        cache_dir=cache, output=str(out / "report"), kid_subsets=5)
    return config, evaluate(config), out / "report"


def rows_by_setting(results: dict) -> dict:
    return {(r["model"], r["sampler"], r["steps"]): r for r in results["rows"]}


def test_settings_teacher_swept_student_own_reference_first(swept):
    _, results, _ = swept
    keys = [(r["model"], r["sampler"], r["steps"], r["is_reference"]) for r in results.rows]
    assert keys[0] == ("teacher", "ddim", 4, True)
    assert set(keys[1:]) == {("student", "own", 1, False), ("student", "own", 2, False)} | {
        ("teacher", s, k, False) for s in ("ddim", "heun", "dpmsolver++", "unipc") for k in (1, 2)}
    assert results.protocol["teacher"] == "teacher"
    assert results.protocol["samplers"]["teacher"]["dpmsolver++"]["thresholding"] is True  # clipped teacher
    assert results.protocol["samplers"]["teacher"]["ddim"]["clip_sample"] is True


def test_same_noise_through_every_setting(swept):
    # The student is the teacher's UNet on the same trailing DDIM grid: from the same noise it must give the
    # very same images, hence the very same numbers.
    _, results, _ = swept
    rows = rows_by_setting(results.to_dict())
    for k in (1, 2):
        student, teacher = rows[("student", "own", k)], rows[("teacher", "ddim", k)]
        for key in ("fd", "kid", "psnr", "lpips"):
            assert student[key] == teacher[key], key
    assert rows[("teacher", "ddim", 4)]["psnr"] is None and rows[("teacher", "ddim", 4)]["speedup"] == 1.0
    assert all(r["num_samples"] == 24 and r["fd"] > 0 and r["lpips"] is not None for r in results.rows[1:])


def test_report_shows_the_numbers_of_results_json(swept):
    _, results, out = swept
    data = json.loads((out / "results.json").read_text())
    assert data == json.loads(json.dumps(results.to_dict()))
    markdown = (out / "report.md").read_text()
    table = markdown.split("## Every setting")[1].split("![")[0]
    lines = [line for line in table.strip().splitlines()[2:]]
    assert len(lines) == len(data["rows"])
    columns = ["model", "sampler", "steps", "fd", "kid", "psnr", "lpips", "clip_score", "ms_per_image",
               "images_per_second", "speedup", "parameters", "peak_memory_mb"]
    for line, row in zip(lines, data["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1].removesuffix(" (reference)") == row["sampler"]
        assert cells[:1] + cells[2:] == [fmt(row[c]) for c in columns if c != "sampler"]
    steps = markdown.split("## Quality vs steps")[1].split("![")[0]
    assert f"| teacher | unipc | {fmt(rows_by_setting(data)[('teacher', 'unipc', 1)]['fd'])} |" in steps
    assert f"| real vs real | noise floor | {fmt(data['noise_floor']['fd'])} |" in steps
    for key in ("libraries", "feature_network", "reference_set", "seeds", "machine", "num_samples"):
        assert key in data["protocol"] and f"{key}:" in markdown
    assert data["protocol"]["feature_network"]["label"] == "FD (digits classifier)" and "FID" not in markdown


def test_html_is_self_contained_and_files_are_written(swept):
    _, results, out = swept
    page = (out / "report.html").read_text()
    assert re.findall(r'src="([^"]{0,22})', page) and all(
        s.startswith("data:image/png;base64,") for s in re.findall(r'src="([^"]{0,22})', page))
    for row in results.rows:
        assert fmt(row["fd"]) in page and (out / row["grid"]).is_file()
    for name in ("quality_vs_steps.png", "quality_vs_latency.png", "samples.png"):
        assert (out / name).stat().st_size > 1000


def test_real_statistics_are_cached_and_reused(swept, pipelines):
    config, results, _ = swept
    cached = list((Path(config.cache_dir) / "stats").glob("*.safetensors"))
    assert len(cached) == 1 and results.protocol["reference_set"]["statistics"] == str(cached[0])
    # the cache file is itself a valid reference, and gives the same distances
    again = evaluate(EvalConfig(pipelines=[pipelines[0]], samplers=["ddim"], steps=[1], reference_steps=4,
                                num_samples=24, batch_size=10, reference=str(cached[0]), lpips=False,
                                cache_dir=config.cache_dir, kid_subsets=5))
    assert rows_by_setting(again.to_dict())[("teacher", "ddim", 1)]["fd"] == \
        rows_by_setting(results.to_dict())[("teacher", "ddim", 1)]["fd"]


def test_config_errors_name_the_field_and_choices():
    with pytest.raises(DiffkdError, match="eval.samplers: 'euler' is not one of ddim, heun, dpmsolver\\+\\+, unipc"):
        EvalConfig(samplers=["euler"])
    with pytest.raises(DiffkdError, match="eval.num_samples"):
        EvalConfig(num_samples=1)


def diffkd(*args, env=None):
    return subprocess.run([sys.executable, "-m", "diffkd", *args], capture_output=True, text=True, timeout=300,
                          env=env, check=False)


@pytest.mark.slow
def test_cli_eval_writes_report_and_prints_table(pipelines, cache, tmp_path):
    result = diffkd("eval", "--pipeline", pipelines[0], "--steps", "1,2", "--samplers", "ddim",
                    "--reference-steps", "2", "--num-samples", "8", "--batch-size", "8", "--no-lpips",
                    "--output", str(tmp_path / "out"), "--cache-dir", cache)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| teacher | ddim |" in result.stdout and "FD (digits classifier)" in result.stdout
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["sampler"], r["steps"]) for r in data["rows"]] == [("ddim", 2), ("ddim", 1)]


def test_missing_inception_weights_is_one_line_exit_2_without_network(pipelines, tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1"}
    result = diffkd("eval", "--pipeline", pipelines[0], "--feature", "inception", "--num-samples", "4",
                    "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), env=env)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "weights-inception-2015-12-05-6726825d.pth" in result.stderr
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in result.stderr


def test_models_are_labelled_by_run_not_by_the_student_subfolder():
    assert display_name("runs/digits-progressive-k2/student/") == "digits-progressive-k2"
    assert display_name("teachers/digits-16") == "digits-16"
    assert display_name("google/ddpm-cifar10-32") == "ddpm-cifar10-32"


class CleanImageOracle(torch.nn.Module):
    """A 'UNet' whose epsilon prediction is exact for one known clean image: every sampler should end on it."""

    def __init__(self, image: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.image, self.alphas_cumprod = image, alphas_cumprod

    def forward(self, z, t):
        acp = self.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        return types.SimpleNamespace(sample=(z - acp.sqrt() * self.image) / (1 - acp).sqrt())


@pytest.mark.parametrize("steps", [3, 64])
def test_teacher_ddim_row_ends_on_the_clean_sample_at_any_step_count(steps):
    """64 does not divide 1000: diffusers' DDIMScheduler would end that run on t = 0, noise left in the sample."""
    scheduler = make_scheduler("epsilon")
    image = torch.rand(1, 1, 8, 8) * 2 - 1
    oracle = CleanImageOracle(image, scheduler.alphas_cumprod)
    pipe = types.SimpleNamespace(denoiser=Denoiser(oracle, scheduler.alphas_cumprod, "epsilon"),
                                 scheduler=scheduler, latent=False)
    setting = Setting(Model("oracle", "", pipe, {}, student=False), "ddim", steps)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample(setting, noise, None), image.expand(4, -1, -1, -1), atol=1e-4, rtol=0)


def test_report_warns_of_a_failed_training_round_of_the_run_beside_it(swept, tmp_path):
    from diffkd import round_health
    from diffkd.evaluation.report import markdown_report

    _, results, _ = swept
    summary = tmp_path / "training_summary.json"
    summary.write_text(json.dumps({"round_health": [
        {"round": "64->32", "steps": 400, "first_loss": 0.74, "last_loss": 0.86, "fell": False}]}))
    intro = markdown_report(results.to_dict(), round_health.report_lines(summary)).split("## Quality vs steps")[0]
    assert "round 64->32 did not converge" in intro and "0.86" in intro
    assert "did not converge" not in markdown_report(results.to_dict(), round_health.report_lines(tmp_path / "none"))
