"""Consistency distillation: the boundary condition, LCM's scalings, the teacher's ODE step against closed-form flows,
a short training run on a 2-D mixture, pseudo-Huber, the guided teacher step, and the LCMScheduler export."""

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, LCMScheduler
from torch import nn

from diffkd import round_health
from diffkd.api import distill
from diffkd.config import parse_config
from diffkd.errors import DiffkdError
from diffkd.io import load_pipeline
from diffkd.methods.consistency import ConsistencyDistillation, consistency_function, pseudo_huber
from diffkd.models import Conditioning, Denoiser
from diffkd.paths import VPPath
from diffkd.sampling import scheduler_sample
from tests import faults
from tests.conftest import make_tiny_unet

ALPHAS_CUMPROD = DDIMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
boundary_scalings = VPPath(ALPHAS_CUMPROD).consistency_scalings


def test_scalings_are_lcm_schedulers_own():
    scheduler = LCMScheduler(beta_schedule="squaredcos_cap_v2", timestep_scaling=10.0)
    t = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = boundary_scalings(t, 10.0)
    for i, step in enumerate(t.tolist()):
        skip, out = scheduler.get_scalings_for_boundary_condition_discrete(step)
        assert c_skip[i].item() == pytest.approx(skip, rel=1e-6) and c_out[i].item() == pytest.approx(out, rel=1e-6)
    # by hand at t = 1, scaling 10: s = 10, c_skip = 0.25 / 100.25, c_out = 10 / sqrt(100.25)
    assert c_skip[1].item() == pytest.approx(0.25 / 100.25) and c_out[1].item() == pytest.approx(10 / 100.25**0.5)
    assert (c_skip[0].item(), c_out[0].item()) == (1.0, 0.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_boundary_condition_is_exact(prediction_type):
    model = Denoiser(make_tiny_unet(), ALPHAS_CUMPROD, prediction_type, clip_sample=1.0)
    z = torch.randn(3, 1, 8, 8) * 2
    with torch.no_grad():
        assert torch.equal(consistency_function(model, z, torch.zeros(3, dtype=torch.long), None, 10.0), z)
        away = consistency_function(model, z, torch.full((3,), 500), None, 10.0)
    assert not torch.allclose(away, z)


def test_grid_is_lcm_schedulers_training_grid():
    grid = VPPath(ALPHAS_CUMPROD).consistency_grid(50)
    assert grid[:3] == [0, 19, 39] and grid[-1] == 999 and len(grid) == 51
    scheduler = LCMScheduler(original_inference_steps=50)
    for k in (1, 2, 4, 8):
        scheduler.set_timesteps(k)
        assert set(scheduler.timesteps.tolist()) <= set(grid)


def test_pseudo_huber_by_hand():
    a, b = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    a[0, 0, 0, 0], a[0, 0, 1, 1] = 3.0, 4.0  # ||a - b|| = 5 for the first sample, 0 for the second
    c = 0.00054 * 2  # sqrt(d) = sqrt(4)
    torch.testing.assert_close(pseudo_huber(a, b), torch.tensor([math.sqrt(25 + c * c) - c, 0.0]))


class Output(SimpleNamespace):
    pass


class GaussianTeacher(nn.Module):
    """The exact v-prediction for 1-D data x ~ N(0, s^2): x0_hat = alpha s^2 z / (alpha^2 s^2 + sigma^2)."""

    def __init__(self, std: float):
        super().__init__()
        self.std = std

    def forward(self, z, t):
        alpha, sigma = ALPHAS_CUMPROD[t].sqrt().view(-1, 1), (1 - ALPHAS_CUMPROD[t]).sqrt().view(-1, 1)
        x0 = alpha * self.std**2 * z / (alpha**2 * self.std**2 + sigma**2)
        eps = (z - alpha * x0) / sigma
        return Output(sample=alpha * eps - sigma * x0)


def flow_ratio(t: torch.Tensor, std: float) -> torch.Tensor:
    """The probability-flow ODE of Gaussian data scales z: z_0 / z_t = std_0 / std_t, std_t^2 = a^2 s^2 + sigma^2."""
    abar, abar0 = ALPHAS_CUMPROD[t], ALPHAS_CUMPROD[0]
    return ((abar0 * std**2 + 1 - abar0) / (abar * std**2 + 1 - abar)).sqrt()


class ExactFlowMap(nn.Module):
    """A v-prediction network whose consistency function is the exact flow map to t = 0: f(z, t) = ratio(t) z."""

    def __init__(self, std: float, scaling: float):
        super().__init__()
        self.std, self.scaling = std, scaling
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, z, t):
        c_skip, c_out = boundary_scalings(t, self.scaling)
        c_skip, c_out = c_skip.view(-1, 1), c_out.view(-1, 1)
        wanted = flow_ratio(t, self.std).view(-1, 1) * z
        x0 = torch.where(c_out > 0, (wanted - c_skip * z) / c_out.clamp(min=1e-30), torch.zeros_like(z))
        alpha, sigma = ALPHAS_CUMPROD[t].sqrt().view(-1, 1), (1 - ALPHAS_CUMPROD[t]).sqrt().view(-1, 1)
        return Output(sample=(alpha * z - x0) / sigma)


def method_for(teacher_net: nn.Module, student: nn.Module, **options) -> ConsistencyDistillation:
    config = parse_config({"method": {"name": "consistency", **options}, "teacher": {"source": "unused"}})
    teacher = SimpleNamespace(denoiser=Denoiser(teacher_net, ALPHAS_CUMPROD, "v_prediction"))
    return ConsistencyDistillation(config, teacher, student)


def test_consistency_target_with_an_exact_teacher_is_the_closed_form_ode_solution():
    std = 0.5
    z = torch.linspace(-3, 3, 7).view(-1, 1)
    errors = []
    for points in (10, 100, 500):  # finer grids: one DDIM step of the exact score converges to the exact flow
        method = method_for(GaussianTeacher(std), ExactFlowMap(std, 10.0), teacher_grid=points)
        grid = method.grid
        t = torch.full((7,), grid[len(grid) // 2])
        s = torch.full((7,), grid[len(grid) // 2 - 1])
        target = method.target_at(z, t, s, Conditioning(), Conditioning())
        errors.append((target - flow_ratio(t, std).view(-1, 1) * z).abs().max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4, errors
    # at the boundary the target is the teacher's step itself (f(x, 0) = x), which lands on the exact flow too
    method = method_for(GaussianTeacher(std), ExactFlowMap(std, 10.0), teacher_grid=500)
    t, s = torch.full((7,), method.grid[1]), torch.zeros(7, dtype=torch.long)
    target = method.target_at(z, t, s, Conditioning(), Conditioning())
    torch.testing.assert_close(target, method.teacher.denoiser.ddim_step(z, t, s))
    torch.testing.assert_close(target, flow_ratio(t, std).view(-1, 1) * z, atol=1e-4, rtol=1e-4)


def test_target_network_follows_the_student_by_its_ema():
    """theta^- <- mu theta^- + (1 - mu) theta after each step (LCM's target EMA); mu = 0 would be the student."""
    student = nn.Linear(2, 2)
    method = method_for(GaussianTeacher(0.5), student, target_ema=0.9)
    before = [p.detach().clone() for p in method.target.parameters()]
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    method.after_step()
    for old, new, trained in zip(before, method.target.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * trained)


def test_a_rising_consistency_loss_is_not_reported_as_a_failed_round():
    """The loss chases the target network, so round health must not call a working run failed for it."""
    (round_,) = method_for(GaussianTeacher(0.5), nn.Linear(2, 2)).rounds()
    verdict = round_health.judge(round_.name, [0.86] * 10 + [0.91] * 10, round_.loss_falls)
    assert verdict["fell"] is None and verdict["last_loss"] > verdict["first_loss"]


def test_the_dpm_solver_step_is_second_order_on_the_exact_gaussian_flow():
    std, z = 0.5, torch.linspace(-3, 3, 7).view(-1, 1)
    errors = {}
    for solver in ("ddim", "dpmsolver++"):
        for points in (10, 20):
            method = method_for(GaussianTeacher(std), ExactFlowMap(std, 10.0), teacher_grid=points, solver=solver)
            t, s = torch.full((7,), 599), torch.full((7,), 599 - 1000 // points)
            exact = flow_ratio(t, std).view(-1, 1) * z / flow_ratio(s, std).view(-1, 1)
            errors[solver, points] = (method.teacher_step(z, t, s, Conditioning()) - exact).abs().max().item()
    # a local error of order h^2 (DDIM) shrinks ~4x when h halves, of order h^3 (2S) ~8x, and 2S is far closer
    assert errors["dpmsolver++", 10] < 0.2 * errors["ddim", 10], errors
    assert errors["ddim", 10] / errors["ddim", 20] < 5 < errors["dpmsolver++", 10] / errors["dpmsolver++", 20], errors


class MixtureTeacher(nn.Module):
    """The exact v-prediction for 2-D data from two Gaussians N(+-(1, 1), 0.5^2 I) of equal weight: the posterior
    mean E[x | z] = sum_i w_i (mu_i + a s^2 / (a^2 s^2 + sigma^2) (z - a mu_i)), w_i the components' posteriors."""

    centres = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    std = 0.5

    def forward(self, z, t):
        alpha, sigma = ALPHAS_CUMPROD[t].sqrt().view(-1, 1), (1 - ALPHAS_CUMPROD[t]).sqrt().view(-1, 1)
        var = alpha**2 * self.std**2 + sigma**2
        weights = (-((z[:, None] - alpha[:, None] * self.centres) ** 2).sum(-1) / (2 * var)).softmax(-1)
        mean = weights @ self.centres
        x0 = mean + alpha * self.std**2 / var * (z - alpha * mean)
        eps = (z - alpha * x0) / sigma
        return Output(sample=alpha * eps - sigma * x0)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))

    def forward(self, z, t):
        return Output(sample=self.net(torch.cat([z, t.float().view(-1, 1) / 1000], 1)))


def test_150_steps_on_a_2d_mixture_learn_the_one_step_flow_map():
    torch.manual_seed(0)
    teacher, student = MixtureTeacher(), MLP()
    method = method_for(teacher, student, teacher_grid=10, skip=1, target_ema=0.5, distance="l2")
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    exact = noise.clone()  # the exact flow map from t = 999: DDIM on 1,000 steps of the exact denoiser
    with torch.no_grad():
        for t, s in zip(range(999, 0, -1), range(998, -1, -1)):
            exact = method.teacher.denoiser.ddim_step(exact, torch.tensor(t), torch.tensor(s))

    def one_step_error() -> float:
        with torch.no_grad():
            out = consistency_function(method.model, noise, torch.full((256,), 999), None, 10.0)
        return (out - exact).pow(2).sum(1).mean().item()

    before = one_step_error()
    optimiser = torch.optim.Adam(student.parameters(), lr=1e-2)
    draw = torch.Generator().manual_seed(2)
    data = (MixtureTeacher.centres[torch.randint(0, 2, (4096,), generator=draw)]
            + MixtureTeacher.std * torch.randn(4096, 2, generator=draw))
    for step in range(150):
        generator = torch.Generator().manual_seed(step)
        batch = {"x0": data[torch.randint(0, len(data), (128,), generator=generator)]}
        loss = method.loss("student", batch, generator).total
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        method.after_step()
    after = one_step_error()
    assert after < 0.05 * before, (before, after)  # measured: 2.56 -> 0.085


def test_the_teacher_step_is_the_guided_ddim_step_of_a_text_teacher(tiny_sd):
    teacher = load_pipeline(tiny_sd)
    config = parse_config({"method": {"name": "consistency", "guidance_scale": 3.0, "teacher_grid": 10},
                           "teacher": {"source": tiny_sd}, "data": {"prompts": ["a cat"]}})
    method = ConsistencyDistillation(config, teacher, copy.deepcopy(teacher.unet))
    hidden = torch.randn(2, 8, 16)
    uncond = torch.randn(2, 8, 16)
    cond = Conditioning(encoder_hidden_states=hidden, uncond_encoder_hidden_states=uncond, guidance_scale=3.0)
    z, t, s = torch.randn(2, 4, 4, 4), torch.tensor([899, 499]), torch.tensor([799, 399])
    with torch.no_grad():
        e_c = teacher.unet(z, t, encoder_hidden_states=hidden).sample
        e_u = teacher.unet(z, t, encoder_hidden_states=uncond).sample
    eps = e_u + 3.0 * (e_c - e_u)  # SD's epsilon teacher, guided
    abar = teacher.scheduler.alphas_cumprod
    a_t, s_t = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
    a_s, s_s = abar[s].sqrt().view(-1, 1, 1, 1), (1 - abar[s]).sqrt().view(-1, 1, 1, 1)
    by_hand = a_s * (z - s_t * eps) / a_t + s_s * eps
    torch.testing.assert_close(method.teacher_step(z, t, s, cond), by_hand, atol=1e-5, rtol=1e-4)


def test_bad_grid_for_the_teacher_is_refused(tiny_teacher, tmp_path):
    config = parse_config({"method": {"name": "consistency", "teacher_grid": 30}, "teacher": {"source": tiny_teacher},
                           "train": {"device": "cpu"}, "run_eval": False})
    with pytest.raises(DiffkdError, match="method.teacher_grid=30 must divide the teacher's 1000"):
        distill(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_exported_student_samples_with_lcm_scheduler_at_every_k(tiny_teacher, tmp_path):
    config = parse_config({"method": {"name": "consistency", "num_steps": 2, "teacher_grid": 20,
                                      "sampler": "LCMScheduler"},
                           "teacher": {"source": tiny_teacher}, "data": {"source": "digits"},
                           "train": {"batch_size": 8, "device": "cpu"}, "run_eval": False})
    folder = distill(config, tmp_path / "run")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.original_inference_steps == 20
    for k in range(1, 9):
        images = pipe(num_inference_steps=k, batch_size=2, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (2, 8, 8, 1) and images.min() >= 0 and images.max() <= 1
    card = (folder / "README.md").read_text()
    assert "trained_timesteps" in card and "sampling_timesteps" in card
    assert "also_works:\n  - TCDScheduler\n  - DDPMScheduler" in card and "other schedulers are not supported" in card
    # the exported UNet is the plain F: at k = 1 the pipeline returns the training-time f(noise, 999), and the
    # evaluation's "own" sampler gives the same from the same noise
    student = load_pipeline(str(folder))
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    pipeline_images = torch.from_numpy(pipe(num_inference_steps=1, batch_size=2, output_type="np",
                                            generator=torch.Generator().manual_seed(0)).images).permute(0, 3, 1, 2)
    with torch.no_grad():
        f = consistency_function(student.denoiser, noise, torch.full((2,), 999), None, 10.0)
    own = scheduler_sample(student.denoiser, LCMScheduler.from_config(pipe.scheduler.config), noise, 1)
    torch.testing.assert_close(own, f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pipeline_images, (f / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)
    # multistep sampling injects fresh noise, drawn from the starting noise: the same noise, the same sample
    four = [scheduler_sample(student.denoiser, LCMScheduler.from_config(pipe.scheduler.config), noise, 4)
            for _ in range(2)]
    assert torch.equal(*four)


@pytest.mark.parametrize("name", VPPath.consistency_swaps)
def test_the_schedulers_the_card_allows_run_the_exported_student_at_every_k(name):
    """The swaps README and the model card allow (their quality: eval/scheduler_swaps.py, eval/RESULTS.md) build from
    the exported LCMScheduler's config and run in the unconditional student's DDPMPipeline at k = 1..8 (UniPC and
    Heun, for one, do not: DDPMPipeline hands their step a generator they refuse)."""
    import diffusers
    from diffusers import DDPMPipeline

    lcm = VPPath(ALPHAS_CUMPROD).consistency_scheduler(
        DDIMScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2"), 50, "v_prediction", None, 10.0)
    pipe = DDPMPipeline(unet=make_tiny_unet(), scheduler=lcm)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, name).from_config(lcm.config)
    for k in range(1, 9):
        images = pipe(batch_size=2, num_inference_steps=k, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
        assert images.shape == (2, 8, 8, 1) and 0 <= images.min() and images.max() <= 1


@pytest.mark.slow
def test_killed_consistency_run_resumes_bit_identical(tiny_teacher, tmp_path):
    config = faults.write_yaml(faults.consistency_config(tiny_teacher), tmp_path / "consistency.yaml")
    reference = faults.reference_run("consistency", config, tmp_path)
    point = next(p for p in faults.KILL_POINTS if p.method == "consistency" and "target-network file" in p.name)
    result = faults.kill_and_resume(point, config, reference, tmp_path / "killed")
    assert result.killed and result.identical, result.detail


def default_recipe_on(tmp_path, beta_schedule: str, beta_start: float, beta_end: float):
    """configs/digits-consistency.yaml (the embedded default) on an epsilon teacher with these betas and no clipping."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from diffkd.api import prepare
    from diffkd.config import load_config

    scheduler = DDPMScheduler(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
                              prediction_type="epsilon", clip_sample=False)
    DDPMPipeline(unet=make_tiny_unet(), scheduler=scheduler).save_pretrained(tmp_path / "eps-teacher")
    recipe = Path(__file__).resolve().parents[1] / "configs" / "digits-consistency.yaml"
    config = load_config(recipe, [f"teacher.source={tmp_path / 'eps-teacher'}"])
    teacher, method, _ = prepare(config)
    return scheduler, config, teacher, method


def test_the_default_recipe_keeps_an_sd_like_epsilon_teachers_function(tmp_path):
    """On SD 1.x's betas (sigma / alpha = 14.6 at t = 999) the default's student stays epsilon: before training
    its f at every grid timestep is c_skip z + c_out x0 of the teacher's own epsilon prediction, no round comes
    before the consistency round, and the export predicts epsilon."""
    scheduler, config, teacher, method = default_recipe_on(tmp_path, "scaled_linear", 0.00085, 0.012)
    assert method.export_spec().scheduler.config.prediction_type == "epsilon"
    assert method.round_kinds == ["consistency"]
    grid = torch.tensor(method.grid[1:])
    z = torch.randn(len(grid), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    alphas = scheduler.alphas_cumprod[grid].view(-1, 1, 1, 1)
    with torch.no_grad():
        eps = teacher.unet(z, grid).sample
        student = consistency_function(method.model, z, grid, None, config.method.timestep_scaling)
    x0 = (z - (1 - alphas).sqrt() * eps) / alphas.sqrt()
    c_skip, c_out = boundary_scalings(grid, config.method.timestep_scaling)
    torch.testing.assert_close(student, c_skip.view(-1, 1, 1, 1) * z + c_out.view(-1, 1, 1, 1) * x0,
                               rtol=1e-4, atol=1e-4)


def test_the_default_recipe_gives_a_ddpm_like_epsilon_teacher_a_velocity_student_reparameterised_first(tmp_path):
    """On DDPM's linear betas (sigma / alpha = 157 at t = 999, where an epsilon student's x0 multiplies its error
    157 times) the default's student is v_prediction, exported so, after a reparameterisation round of
    method.reparameterisation_steps."""
    _, config, _, method = default_recipe_on(tmp_path, "linear", 1e-4, 0.02)
    assert method.prediction_type == "v_prediction"
    assert method.export_spec().scheduler.config.prediction_type == "v_prediction"
    assert method.round_kinds == ["reparameterisation", "consistency"]
    assert [r.num_steps for r in method.rounds()] == [config.method.reparameterisation_steps, 700]


def test_a_lora_student_keeps_the_teachers_parameterisation(tiny_sd, tmp_path):
    """auto on a pipeline that loads LoRA weights, with DDPM's linear betas: the adapters are loaded onto the teacher's
    own pipeline, whose scheduler reads epsilon, so the LoRA student stays epsilon; a full student of it goes v."""
    import json
    import shutil

    from diffkd.api import prepare

    teacher = tmp_path / "linear-sd"
    shutil.copytree(tiny_sd, teacher)
    config_file = teacher / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**scheduler, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}))

    def method(student: dict):
        return prepare(parse_config({"method": {"name": "consistency", "teacher_grid": 20},
                                     "teacher": {"source": str(teacher)}, "data": {"prompts": ["a"]},
                                     "student": student, "train": {"device": "cpu"}, "run_eval": False}))[1]

    assert method({"lora": {"rank": 4}}).prediction_type == "epsilon"
    assert method({}).prediction_type == "v_prediction"


def test_few_step_prediction_type_by_the_top_timesteps_amplification():
    """sigma / alpha at t = T - 1 by hand from the betas: linear 1e-4..0.02 (DDPM) 157.4 and LDM's scaled_linear
    0.0015..0.0195 83.8 take a velocity student; SD 1.x's scaled_linear 0.00085..0.012 (14.6) keeps epsilon; a v or
    sample teacher keeps its own, as does a flow teacher."""
    from diffkd.paths import FlowPath

    def amplification(betas):
        abar = torch.cumprod(1 - betas.double(), 0)[-1]
        return ((1 - abar) / abar).sqrt().item()

    linear = torch.linspace(1e-4, 0.02, 1000)
    ldm = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000) ** 2
    sd = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    assert amplification(linear) == pytest.approx(157.4, abs=0.1) and amplification(ldm) == pytest.approx(83.8, abs=0.1)
    assert amplification(sd) == pytest.approx(14.6, abs=0.1)
    for betas, expected in [(linear, "v_prediction"), (ldm, "v_prediction"), (sd, "epsilon")]:
        path = VPPath(torch.cumprod(1 - betas, 0))
        assert path.few_step_prediction_type("epsilon") == expected
        assert path.few_step_prediction_type("v_prediction") == "v_prediction"
        assert path.few_step_prediction_type("sample") == "sample"
    assert FlowPath(1000).few_step_prediction_type("flow") == "flow"


def reparameterising_method(teacher: str, steps: int = 30):
    """A v student (the default's choice) of an epsilon teacher on linear betas, reparameterised for ``steps``."""
    from diffkd.api import prepare

    config = parse_config({"method": {"name": "consistency", "num_steps": 2, "teacher_grid": 20,
                                      "reparameterisation_steps": steps, "sampler": "LCMScheduler"},
                           "teacher": {"source": teacher}, "data": {"source": "digits"},
                           "train": {"batch_size": 16, "learning_rate": 1e-3, "ema_decay": 0.0, "device": "cpu"},
                           "run_eval": False})
    return config, *prepare(config)


def test_reparameterisation_loss_by_hand(trained_eps_teacher):
    """The round's loss is |eps_student - eps_teacher|^2 at z_t = alpha x + sigma eps, t uniform over the training
    timesteps, the student's eps read through v: sigma z + alpha v (the draws replayed from the same generator)."""
    _, teacher, method, _ = reparameterising_method(trained_eps_teacher)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    loss = method.loss("student", {"x0": x}, torch.Generator().manual_seed(3)).terms["reparameterisation"]
    generator = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (4,), generator=generator)
    eps = torch.randn(x.shape, generator=generator)
    abar = teacher.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    z = abar.sqrt() * x + (1 - abar).sqrt() * eps
    with torch.no_grad():
        eps_teacher = teacher.unet(z, t).sample
        v = method.student(z, t).sample
    eps_student = (1 - abar).sqrt() * z + abar.sqrt() * v
    torch.testing.assert_close(loss.detach(), (eps_student - eps_teacher).pow(2).mean(), rtol=1e-4, atol=1e-7)


def test_the_reparameterisation_round_brings_the_students_epsilon_to_the_teachers(trained_eps_teacher, tmp_path):
    """30 steps of the round take the velocity student's epsilon (the teacher's weights read as v) more than half
    the way to the teacher's, measured on digits in draws of their own."""
    from diffkd.data import load_digits
    from diffkd.trainer import Trainer, make_accelerator

    config, _, method, _ = reparameterising_method(trained_eps_teacher)
    batch = {"x0": load_digits(8)[:256]}

    def loss() -> float:
        method.round_index = 0
        with torch.no_grad():
            return method.loss("student", batch, torch.Generator().manual_seed(0)).terms["reparameterisation"].item()

    before = loss()
    Trainer(method, config.train, tmp_path / "run", make_accelerator(config.train, tmp_path / "run")).fit()
    assert loss() < 0.5 * before  # 0.086 -> 0.032 here


def test_a_velocity_student_of_an_epsilon_teacher_exports_and_samples_its_own_parameterisation(tmp_path):
    """method.student_prediction_type: v_prediction on an epsilon teacher: the student's clean prediction at the
    top of the grid is alpha z - sigma v (no 1 / alpha, which is 150 at t = 999 on linear betas), the teacher's
    step stays epsilon, and the exported LCMScheduler reads v, so the pipeline's one step is the student's f."""
    from diffusers import DDPMPipeline, DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="linear", prediction_type="epsilon", clip_sample=False)
    DDPMPipeline(unet=make_tiny_unet(), scheduler=scheduler).save_pretrained(tmp_path / "eps-teacher")
    config = parse_config({"method": {"name": "consistency", "num_steps": 2, "teacher_grid": 20,
                                      "sampler": "LCMScheduler", "student_prediction_type": "v_prediction"},
                           "teacher": {"source": str(tmp_path / "eps-teacher")}, "data": {"source": "digits"},
                           "train": {"batch_size": 8, "device": "cpu"}, "run_eval": False})
    folder = distill(config, tmp_path / "run")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    student = load_pipeline(str(folder))
    assert student.denoiser.prediction_type == "v_prediction"
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    alpha, sigma = scheduler.alphas_cumprod[999].sqrt(), (1 - scheduler.alphas_cumprod[999]).sqrt()
    with torch.no_grad():
        v = student.unet(noise, torch.full((2,), 999)).sample
        f = consistency_function(student.denoiser, noise, torch.full((2,), 999), None, 10.0)
    c_skip, c_out = boundary_scalings(torch.tensor([999]), 10.0)
    torch.testing.assert_close(f, c_skip * noise + c_out * (alpha * noise - sigma * v), atol=1e-5, rtol=1e-5)
    images = pipe(num_inference_steps=1, batch_size=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(torch.from_numpy(images).permute(0, 3, 1, 2), (f / 2 + 0.5).clamp(0, 1),
                               atol=1e-5, rtol=1e-5)
