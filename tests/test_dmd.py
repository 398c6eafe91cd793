"""DMD2 (diffkd/methods/dmd.py): the distribution-matching gradient against closed-form Gaussian scores, its
normalisation and the GAN terms by hand, a short run that moves a generator's mean and covariance to the data's,
and on the tiny teacher: the two time-scale phases, and an export that samples what the generator was trained on."""

import csv
import math

import pytest
import torch
from diffusers import DiffusionPipeline

from diffkd import checkpoint, schedule
from diffkd.api import distill, prepare
from diffkd.config import parse_config
from diffkd.errors import DiffkdError
from diffkd.evaluation.sweep import read_card
from diffkd.lora import lora_copy
from diffkd.methods.dmd import (
    DistributionMatching,
    distribution_matching_gradient,
    distribution_matching_loss,
    gan_classifier_loss,
    gan_generator_loss,
)
from diffkd.models import Conditioning
from tests import faults

ALPHAS_CUMPROD = torch.cos((torch.arange(1, 1001) / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2


def gaussian_x0(z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, mean: torch.Tensor,
                cov: torch.Tensor) -> torch.Tensor:
    """E[x | z] for x ~ N(mean, cov), z = alpha x + sigma eps: the exact x0 prediction of that distribution."""
    a, s = alpha[:, None], sigma[:, None]
    eye = torch.eye(len(mean), dtype=z.dtype)
    marginal = a[:, :, None] ** 2 * cov + s[:, :, None] ** 2 * eye  # (B, D, D)
    gain = a[:, :, None] * cov @ torch.linalg.inv(marginal)
    return mean + (gain @ (z - a * mean)[:, :, None])[:, :, 0]


def test_gradient_is_the_kl_gradient_direction_on_gaussians():
    """With exact real and fake scores, DMD's gradient is d/dx [log p_fake,t(z) - log p_real,t(z)] (DMD eq. 7) times
    sigma^2 / (alpha^2 * mean|x - real x0|), computed here from the log densities by autograd."""
    torch.manual_seed(0)
    dims = 3
    real_mean, real_cov = torch.tensor([1.0, -0.5, 0.2]), torch.diag(torch.tensor([0.3, 1.5, 0.8]))
    fake_mean, fake_cov = torch.tensor([0.0, 0.4, -0.3]), torch.diag(torch.tensor([1.0, 0.5, 0.9]))
    x = torch.randn(8, dims)
    t = torch.randint(20, 980, (8,))
    alpha, sigma = schedule.alpha_sigma(ALPHAS_CUMPROD, t)
    z = alpha[:, None] * x + sigma[:, None] * torch.randn(8, dims)

    real_x0 = gaussian_x0(z, alpha, sigma, real_mean, real_cov)
    fake_x0 = gaussian_x0(z, alpha, sigma, fake_mean, fake_cov)
    gradient = distribution_matching_gradient(x[:, :, None, None], real_x0[:, :, None, None],
                                              fake_x0[:, :, None, None])[:, :, 0, 0]

    xs = x.clone().requires_grad_(True)
    zs = alpha[:, None] * xs + sigma[:, None] * (z - alpha[:, None] * x) / sigma[:, None]
    eye = torch.eye(dims)

    def log_density(mean, cov):
        marginal = alpha[:, None, None] ** 2 * cov + sigma[:, None, None] ** 2 * eye
        return torch.distributions.MultivariateNormal(alpha[:, None] * mean, marginal).log_prob(zs)

    (log_density(fake_mean, fake_cov) - log_density(real_mean, real_cov)).sum().backward()
    scale = (x - real_x0).abs().mean(1)
    expected = xs.grad * (sigma**2 / (alpha**2 * scale))[:, None]
    torch.testing.assert_close(gradient, expected, rtol=1e-4, atol=1e-6)


def test_normalisation_and_loss_by_hand():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    real_x0 = torch.zeros_like(x)
    real_x0[1] = 0.5  # the second sample sits on the real prediction: scale 0, gradient 0 (not NaN)
    fake_x0 = torch.ones_like(x)
    gradient = distribution_matching_gradient(x, real_x0, fake_x0)
    torch.testing.assert_close(gradient[0], torch.full((1, 2, 2), 1 / 2.5))  # mean |x - 0| = 2.5
    torch.testing.assert_close(gradient[1], torch.zeros(1, 2, 2))

    leaf = x.clone().requires_grad_(True)
    loss = distribution_matching_loss(leaf, gradient)
    loss.backward()
    torch.testing.assert_close(loss, 0.5 * gradient.pow(2).mean())
    torch.testing.assert_close(leaf.grad, gradient / x.numel())


def test_gan_terms_by_hand_and_their_signs():
    assert gan_generator_loss(torch.zeros(4)).item() == pytest.approx(math.log(2))
    fake, real = torch.tensor([1.0], requires_grad=True), torch.tensor([2.0], requires_grad=True)
    loss = gan_classifier_loss(fake, real)
    assert loss.item() == pytest.approx(math.log1p(math.exp(1.0)) + math.log1p(math.exp(-2.0)))
    loss.backward()
    assert fake.grad.item() > 0 > real.grad.item()  # the classifier lowers D(fake), raises D(real)
    logits = torch.tensor([0.5], requires_grad=True)
    gan_generator_loss(logits).backward()
    assert logits.grad.item() < 0  # the generator raises D(its samples)


def test_short_run_moves_the_generators_mean_and_covariance_to_the_datas():
    """A linear generator x = A eps + b, the exact Gaussian scores of the data and of the generator's own samples
    (the fake score's optimum), DMD's loss and Adam: 150 steps close 98% of the gap in mean and covariance."""
    torch.manual_seed(0)
    data_mean = torch.tensor([1.0, -0.5])
    data_cov = torch.tensor([[0.5, 0.3], [0.3, 0.8]])
    weight = torch.nn.Parameter(0.3 * torch.eye(2))
    bias = torch.nn.Parameter(torch.zeros(2))
    optimiser = torch.optim.Adam([weight, bias], lr=0.02, betas=(0.0, 0.999))

    def gaps():
        cov = (weight @ weight.T).detach()
        return (bias.detach() - data_mean).norm().item(), (cov - data_cov).norm().item()

    before = gaps()
    for _ in range(150):
        x = torch.randn(256, 2) @ weight.T + bias
        t = torch.randint(20, 980, (256,))
        alpha, sigma = schedule.alpha_sigma(ALPHAS_CUMPROD, t)
        with torch.no_grad():
            z = alpha[:, None] * x + sigma[:, None] * torch.randn(256, 2)
            real_x0 = gaussian_x0(z, alpha, sigma, data_mean, data_cov)
            fake_x0 = gaussian_x0(z, alpha, sigma, bias.detach(), (weight @ weight.T).detach())
        gradient = distribution_matching_gradient(x.detach()[:, :, None, None], real_x0[:, :, None, None],
                                                  fake_x0[:, :, None, None])
        optimiser.zero_grad()
        distribution_matching_loss(x[:, :, None, None], gradient).backward()
        optimiser.step()
    after = gaps()
    assert after[0] < 0.02 * before[0] and after[1] < 0.02 * before[1], (before, after)


def dmd_config(teacher: str, **method) -> dict:
    data = faults.dmd_config(teacher)
    data["method"].update(method)
    return data


@pytest.mark.parametrize("multistep", ["ddim", "consistency"])
def test_two_time_scale_phases_and_an_export_that_samples_the_trained_grid(tiny_teacher, tmp_path, monkeypatch,
                                                                           multistep):
    calls = []
    original = DistributionMatching.loss

    def loss(self, phase, batch, generator):
        calls.append(phase)
        return original(self, phase, batch, generator)

    monkeypatch.setattr(DistributionMatching, "loss", loss)
    config = parse_config(dmd_config(tiny_teacher, num_steps=2, cache=str(tmp_path / "cache"), multistep=multistep))
    folder = distill(config, tmp_path / "run")
    assert calls == (["fake_score"] * 2 + ["generator"]) * 2

    card = read_card(str(folder))
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe.scheduler).__name__ == {"ddim": "DDIMScheduler", "consistency": "LCMScheduler"}[multistep]
    pipe.scheduler.set_timesteps(card["num_inference_steps"])
    assert pipe.scheduler.timesteps.tolist() == card["timesteps"] == [999, 499]

    # the pipeline's own sampling from its noise (and, for consistency steps, its fresh noise between steps) = the
    # generator's k-step rollout used in training, clipped
    _, method, _ = prepare(config)
    method.student.load_state_dict(pipe.unet.state_dict())
    images = pipe(batch_size=3, num_inference_steps=2, generator=torch.Generator().manual_seed(5),
                  output_type="np").images
    draws = torch.Generator().manual_seed(5)
    noise = torch.randn((3, 1, 8, 8), generator=draws)
    with torch.no_grad():
        x0 = method.rollout(noise, 1, Conditioning(), draws)
    expected = (x0.clamp(-1, 1) / 2 + 0.5).permute(0, 2, 3, 1).numpy()
    assert abs(images - expected).max() < 1e-5
    if multistep == "consistency":  # the step re-noises: other fresh noise, another image from the same start
        with torch.no_grad():
            other = method.rollout(noise, 1, Conditioning(), torch.Generator().manual_seed(6))
        assert (other - x0).abs().max() > 1e-2


@pytest.mark.parametrize("backward_simulation", ["random_step", "unrolled"])
def test_backward_simulation_trains_a_random_steps_output_or_the_whole_unrolled_sample(tiny_teacher, tmp_path,
                                                                                        monkeypatch,
                                                                                        backward_simulation):
    """random_step (DMD2) trains each grid step's output, reached without gradient; unrolled always trains the final
    4-step sample, for the fake score too, with the gradient through every step back to the noise."""
    config = parse_config(dmd_config(tiny_teacher, num_steps=6, student_steps=4, gan=0.0, regression=0.0,
                                     backward_simulation=backward_simulation, cache=str(tmp_path / "cache")))
    _, method, _ = prepare(config)
    stops = []
    original = DistributionMatching.rollout

    def rollout(self, noise, stop, cond, generator, through=False):
        stops.append((stop, through))
        return original(self, noise, stop, cond, generator, through)

    monkeypatch.setattr(DistributionMatching, "rollout", rollout)
    real = torch.zeros(4, 1, 8, 8)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        for phase in ("fake_score", "generator"):
            method.loss(phase, {"x0": real}, generator)
    if backward_simulation == "unrolled":
        assert stops == [(3, False), (3, True)] * 20
    else:
        assert {stop for stop, _ in stops} == {0, 1, 2, 3} and not any(through for _, through in stops)

    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with torch.no_grad():
        plain = original(method, noise, 3, Conditioning(), torch.Generator())
    through = original(method, noise, 3, Conditioning(), torch.Generator(), through=True)
    assert torch.allclose(through, plain)
    through.sum().backward()
    assert noise.grad is not None and noise.grad.abs().sum() > 0  # the gradient crossed all four steps


def test_warm_start_round_regresses_before_distribution_matching(tiny_teacher, tmp_path):
    config = parse_config(dmd_config(tiny_teacher, num_steps=1, warm_start_steps=1, regression=0.0, gan=0.0,
                                     student_steps=1, cache=str(tmp_path / "cache")))
    distill(config, tmp_path / "run")
    with (tmp_path / "run" / "logs" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["round"] for r in rows] == ["1", "2"]
    assert float(rows[0]["generator/loss/regression"]) > 0 and not rows[0].get("generator/loss/dm")
    assert float(rows[1]["generator/loss/dm"]) >= 0 and not rows[1].get("generator/loss/regression")
    assert float(rows[0]["fake_score/loss/denoise"]) > 0  # the fake score follows the generator from the start

@pytest.mark.slow
def test_killed_between_phases_resumes_bit_identical(tiny_teacher, tmp_path):
    """Killed after step 3's fake-score updates, before its generator update: the generator, the fake score, the
    classifier head, both optimisers and the EMA come back from the step-2 checkpoint and the run ends identical."""
    config = faults.write_yaml(faults.dmd_config(tiny_teacher), tmp_path / "dmd.yaml")
    reference = faults.reference_run("dmd", config, tmp_path)
    point = next(p for p in faults.KILL_POINTS if p.method == "dmd")
    result = faults.kill_and_resume(point, config, reference, tmp_path / "killed")
    assert result.killed and result.identical, result.detail
    assert result.resumed_from == [checkpoint.name_for(0, 2)]


def test_lora_fake_score_trains_only_its_adapters_and_starts_as_the_teacher(tiny_teacher, tmp_path):
    """method.fake_score_lora_rank: the fake score is adapters on a frozen copy of the teacher (B = 0, so it starts
    as the teacher's own score); training moves the adapters only, the GAN head still reads its mid block, and a
    checkpoint keeps the adapters, not a UNet copy."""
    config = parse_config(dmd_config(tiny_teacher, fake_score_lora_rank=4, cache=str(tmp_path / "cache")))
    _, method, _ = prepare(config)
    trained = [name for name, p in method.fake_unet.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    z, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500, 990])
    with torch.no_grad():
        assert torch.equal(method.fake.output(z, t, Conditioning()),
                           method.teacher.denoiser.output(z, t, Conditioning()))

    distill(config, tmp_path / "run")
    tensors, _ = checkpoint.load(checkpoint.latest(tmp_path / "run" / "checkpoints"))
    assert set(tensors["fake_score"]) == set(trained)
    assert any(v.abs().max() > 0 for k, v in tensors["fake_score"].items() if ".lora_B." in k)  # the adapters learnt
    checkpoint.load_network_state(method.fake_unet, tensors["fake_score"])
    with torch.no_grad():  # the learnt adapters on the teacher's frozen weights give another score
        assert not torch.allclose(method.fake.output(z, t, Conditioning()),
                                  method.teacher.denoiser.output(z, t, Conditioning()))


def test_lora_fake_score_is_refused_on_a_network_without_lora_layers():
    with pytest.raises(DiffkdError, match="fake_score_lora_rank=0"):
        lora_copy(torch.nn.Sequential(torch.nn.Linear(2, 2)), 4, ("to_q", "to_k"))
