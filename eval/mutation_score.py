"""Mutation check: does the fast test suite notice a deliberate bug in each formula?

Each mutation replaces one piece of source text in diffkd/ (the schedule, the methods' losses, the KD losses, the
Fréchet distance, PSNR) with a plausible wrong version. The mutants run one at a time in a temporary copy of the
repository (the working tree is never edited) against the fast tests (not marked slow); a mutation is caught when
they fail. A mutation whose text is not found exactly once is an error naming it, so a refactor of the mutated
code shows up here instead of as a silently vacuous mutant: update the mutation's text, keeping its meaning.

    python eval/mutation_score.py [--only ID ...] [--timeout 600] [--write]

--write replaces the "mutation-score" section of eval/RESULTS.md with the caught/total table.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from results_file import machine, write_section

log = logging.getLogger("mutation_score")
ROOT = Path(__file__).resolve().parent.parent

# The fast tests that pin formulas, cheapest first: pytest -x stops at the first failure, so a caught mutant
# usually costs one interpreter start and a few seconds.
FAST_TESTS = ["tests/test_paths.py", "tests/test_schedule.py", "tests/test_progressive_target.py", "tests/test_denoise.py",
              "tests/test_psnr.py", "tests/test_frechet.py", "tests/test_kd_losses.py", "tests/test_generator.py",
              "tests/test_progressive.py", "tests/test_perceptual.py", "tests/test_consistency.py", "tests/test_dmd.py",
              "tests/test_guidance_embedding.py", "tests/test_glyphs_teacher.py",
              "tests/test_run_validation.py", "tests/test_sampler_choice.py", "tests/test_plan_sharding.py",
              "tests/test_ldm.py", "tests/test_plan.py::test_checkpointing_lowers_the_planned_peak",
              "tests/test_plan.py::test_a_guided_teacher_pass_is_planned_at_twice_the_batch",
              "tests/test_plan.py::test_validation_plan_within_15_percent_of_the_measured_peak",
              "tests/test_plan.py::test_the_largest_batch_is_traced_not_extrapolated"]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    bug: str


MUTATIONS = [
    Mutation("grid-no-minus-one", "diffkd/schedule.py", "num_steps) - 1 for i", "num_steps) for i",
             "trailing grid starts at T instead of T - 1"),
    Mutation("grid-truncated", "diffkd/schedule.py", "[round(num_train_timesteps - i", "[int(num_train_timesteps - i",
             "trailing grid truncates T - i T / k instead of rounding it (as diffusers does)"),
    Mutation("alpha-sigma-no-sqrt", "diffkd/schedule.py", "return abar.sqrt(), (1 - abar).sqrt()",
             "return abar, 1 - abar", "alpha_t = abar_t instead of sqrt(abar_t)"),
    Mutation("clean-end-not-clean", "diffkd/schedule.py", "torch.ones((), dtype=alphas_cumprod.dtype",
             "alphas_cumprod[0] * torch.ones((), dtype=alphas_cumprod.dtype",
             "t = -1 gives abar_0 instead of the clean sample (set_alpha_to_one)"),
    Mutation("snr-not-squared", "diffkd/paths.py", "return alpha**2 / sigma**2", "return alpha / sigma",
             "SNR = alpha / sigma"),
    Mutation("eps-to-x0", "diffkd/schedule.py", "return (z - s * output) / a, output",
             "return (z - a * output) / s, output", "x0 from an eps prediction with alpha and sigma swapped"),
    Mutation("v-to-x0-sign", "diffkd/schedule.py", "return a * z - s * output, a * output + s * z",
             "return a * z + s * output, a * output - s * z", "v-prediction's sign flipped (eq. 31)"),
    Mutation("sample-to-eps", "diffkd/schedule.py", "return output, (z - a * output) / s",
             "return output, (z - s * output) / a", "eps from an x prediction with alpha and sigma swapped"),
    Mutation("v-target", "diffkd/schedule.py", "return a * eps - s * x0", "return s * eps - a * x0",
             "v = sigma eps - alpha x"),
    Mutation("ddim-coefficients", "diffkd/schedule.py",
             "broadcast(alpha_next, x0) * x0 + broadcast(sigma_next, x0) * eps",
             "broadcast(sigma_next, x0) * x0 + broadcast(alpha_next, x0) * eps", "DDIM step with alpha and sigma swapped"),
    Mutation("ddim-no-clip", "diffkd/schedule.py", "x0 = x0.clamp(-clip_sample, clip_sample)", "x0 = x0",
             "DDIM step ignores clip_sample"),
    Mutation("target-ratio", "diffkd/schedule.py", "ratio = broadcast(sigma_s / sigma_t, z_t)",
             "ratio = broadcast(alpha_s / alpha_t, z_t)", "x_tilde with alpha_s / alpha_t for sigma_s / sigma_t"),
    Mutation("target-denominator", "diffkd/schedule.py", "(broadcast(alpha_s, z_t) - ratio * broadcast(alpha_t, z_t))",
             "(broadcast(alpha_s, z_t) + ratio * broadcast(alpha_t, z_t))", "x_tilde's denominator sign"),
    Mutation("snr-trunc-clamp", "diffkd/schedule.py", "return snr_t.clamp(min=1.0)", "return snr_t.clamp(max=1.0)",
             "truncated SNR weight is min(SNR, 1) instead of max(SNR, 1)"),
    Mutation("min-snr-gamma", "diffkd/schedule.py", "return snr_t.clamp(max=5.0)", "return snr_t.clamp(max=1.0)",
             "min-SNR weight with gamma 1 instead of 5"),
    Mutation("progressive-no-weighting", "diffkd/methods/progressive.py",
             "per_sample = weight * (x_pred - x_target)", "per_sample = (x_pred - x_target)",
             "progressive loss drops its weighting (SNR and z-space)"),
    Mutation("progressive-z-not-squared", "diffkd/methods/progressive.py",
             "return (alpha_s - sigma_s * alpha_t / sigma_t) ** 2", "return (alpha_s - sigma_s * alpha_t / sigma_t)",
             "an epsilon teacher's z-space factor c is not squared"),
    Mutation("progressive-z-sign", "diffkd/methods/progressive.py",
             "return (alpha_s - sigma_s * alpha_t / sigma_t) ** 2", "return (alpha_s + sigma_s * alpha_t / sigma_t) ** 2",
             "an epsilon teacher's z-space factor with the wrong sign"),
    Mutation("progressive-weight-at-s", "diffkd/methods/progressive.py",
             "schedule.loss_weight(path.snr(t),", "schedule.loss_weight(path.snr(s),",
             "progressive weight taken at the step's end s instead of t"),
    Mutation("progressive-teacher-order", "diffkd/methods/progressive.py",
             "fine[per_step * i + j], fine[per_step * i + j + 1]",
             "fine[per_step * (i + 1) - j], fine[per_step * (i + 1) - j - 1]",
             "the teacher's two steps in reverse order (t'' -> t' -> t)"),
    Mutation("progressive-target-at-t1", "diffkd/methods/progressive.py",
             "alpha_s, sigma_s = self.round_teacher.alpha_sigma(s)",
             "alpha_s, sigma_s = self.round_teacher.alpha_sigma(fine[per_step * i + 1])",
             "x_tilde solved for t' instead of t'' (t' and t'' swapped in the target)"),
    Mutation("progressive-student-at-s", "diffkd/methods/progressive.py",
             "x_pred, eps_pred = model.x0_eps(z_t, t, student_cond)",
             "x_pred, eps_pred = model.x0_eps(z_t, s.clamp(min=0), student_cond)",
             "the student is asked at the step's end s instead of t"),
    Mutation("progressive-noising", "diffkd/methods/progressive.py",
             "z_t = schedule.broadcast(alpha_t, x) * x + schedule.broadcast(sigma_t, x) * eps",
             "z_t = schedule.broadcast(sigma_t, x) * x + schedule.broadcast(alpha_t, x) * eps",
             "z_t with alpha and sigma swapped"),
    Mutation("denoise-eps-target", "diffkd/methods/denoise.py",
             "target = schedule.from_x0_eps(x, eps, alpha, sigma, model.prediction_type)", "target = eps",
             "denoise regresses every parameterisation onto eps"),
    Mutation("generator-no-clip", "diffkd/methods/generator.py",
             "z = schedule.ddim_step(x0, eps, alpha_s, sigma_s, self.teacher.denoiser.clip_sample)",
             "z = schedule.ddim_step(x0, eps, alpha_s, sigma_s)",
             "generator's intermediate step skips the exported scheduler's clip"),
    Mutation("generator-l1", "diffkd/methods/generator.py", '{"mse": (x0 - target).pow(2).mean()}',
             '{"mse": (x0 - target).abs().mean()}', "generator loss is L1, not MSE"),
    Mutation("output-kd-parameterisation", "diffkd/losses/kd.py",
             "target = schedule.from_x0_eps(*teacher, alpha, sigma, self.prediction_type)",
             'target = schedule.from_x0_eps(*teacher, alpha, sigma, "epsilon")',
             "output KD compares v with the teacher's eps"),
    Mutation("feature-kd-weight-split", "diffkd/losses/kd.py", "self.config.feature_kd / len(per_tap)",
             "self.config.feature_kd", "feature KD weight not split over the taps"),
    Mutation("feature-loss-unnormalised", "diffkd/losses/features.py", "(error / (scale + self.eps)).mean()",
             "error.mean()", "feature MSE not divided by the teacher feature's mean square"),
    Mutation("lpips-range", "diffkd/losses/perceptual.py", "return self.lpips(a, b).reshape(a.shape[0])",
             "return self.lpips(a, b, normalize=True).reshape(a.shape[0])",
             "LPIPS reads [-1, 1] images as [0, 1]"),
    Mutation("covariance-biased", "diffkd/evaluation/frechet.py", "/ (features.shape[0] - 1)",
             "/ features.shape[0]", "covariance divides by N instead of N - 1"),
    Mutation("frechet-trace-factor", "diffkd/evaluation/frechet.py", "- 2 * trace_sqrt", "- trace_sqrt",
             "Fréchet distance drops the 2 in -2 tr(sqrt(...))"),
    Mutation("frechet-mean-term", "diffkd/evaluation/frechet.py", "(mu1 - mu2).square().sum()",
             "(mu1 - mu2).abs().sum()", "Fréchet mean term is the L1 norm of mu1 - mu2, not its square"),
    Mutation("psnr-20log", "diffkd/evaluation/sweep.py", "return -10 * torch.log10(mse)",
             "return -20 * torch.log10(mse)", "PSNR = -20 log10(MSE)"),
    Mutation("psnr-peak", "diffkd/evaluation/sweep.py", "target.double()) / 255)", "target.double()) / 256)",
             "PSNR with a peak of 256"),
    Mutation("few-step-amplification-inverted", "diffkd/paths.py", "float(sigma / alpha) > EPSILON_TOP_AMPLIFICATION",
             "float(alpha / sigma) > EPSILON_TOP_AMPLIFICATION",
             "the top timestep's x0 amplification read as alpha / sigma: no epsilon teacher gets a velocity student"),
    Mutation("reparameterisation-in-x-space", "diffkd/methods/consistency.py",
             "(_, eps_student), (_, eps_teacher) = self.predictions_at(",
             "(eps_student, _), (_, eps_teacher) = self.predictions_at(",
             "the reparameterisation round regresses the student's x0 onto the teacher's epsilon"),
    Mutation("reparameterisation-round-skipped", "diffkd/methods/consistency.py",
             "reparameterises = self.prediction_type != self.teacher.denoiser.prediction_type and",
             "reparameterises = False and",
             "a student of another parameterisation goes straight to the consistency round"),
    Mutation("consistency-c-skip", "diffkd/paths.py",
             "c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)", "c_skip = SIGMA_DATA**2 / (scaled + SIGMA_DATA**2)",
             "LCM's c_skip with the scaled timestep not squared"),
    Mutation("flow-x0-sign", "diffkd/schedule.py", "return (z - s * output) / (a + s), (z + a * output) / (a + s)",
             "return (z + s * output) / (a + s), (z + a * output) / (a + s)",
             "flow velocity read as x - eps: x0 = z + sigma u"),
    Mutation("flow-target-sign", "diffkd/schedule.py", "        return eps - x0\n", "        return x0 - eps\n",
             "the flow teacher is trained on x - eps instead of the velocity eps - x"),
    Mutation("flow-sigma-scale", "diffkd/paths.py", "sigma = (torch.as_tensor(t).float() / self.num_train_timesteps)",
             "sigma = (torch.as_tensor(t).float() / (self.num_train_timesteps - 1))",
             "flow sigma = t / (T - 1): the network's time input and the path's sigma disagree"),
    Mutation("flow-shift-formula", "diffkd/paths.py", "return shift * sigma / (1 + (shift - 1) * sigma)",
             "return shift * sigma / (1 + shift * sigma)", "SD3's shift without the - 1"),
    Mutation("flow-grid-default", "diffkd/paths.py", "shift_terminal=1.0 / k if k > 1 else None",
             "shift_terminal=None", "a flow student's grid ends at sigma = 1/T (a step that does nothing), unnested"),
    Mutation("flow-consistency-grid-default", "diffkd/paths.py",
             "scheduler.register_to_config(sigma_min=CONSISTENCY_LAST_SIGMA, sigma_max=1.0)", "pass",
             "a flow consistency student's k-step grid ends at sigma = 1/T: its 2 steps sample as one"),
    Mutation("dpm-2s-noise-limit", "diffkd/methods/consistency.py", "(lam_s - lam_t) / (lam_u - lam_t), torch.ones_like",
             "(lam_s - lam_t) / (lam_u - lam_t), torch.zeros_like", "DPM-Solver(2S) from pure noise drops the "
             "midpoint (r -> infinity instead of 1)"),
    Mutation("pseudo-huber-c", "diffkd/methods/consistency.py", "c = HUBER_FACTOR * math.sqrt(a[0].numel())",
             "c = HUBER_FACTOR * a[0].numel()", "iCT's pseudo-Huber c = 0.00054 d instead of 0.00054 sqrt(d)"),
    Mutation("consistency-target-ema", "diffkd/methods/consistency.py",
             "follower.lerp_(trained, 1 - self.options.target_ema)", "follower.lerp_(trained, self.options.target_ema)",
             "the target network moves by mu towards the student instead of 1 - mu"),
    Mutation("dmd-gradient-sign", "diffkd/methods/dmd.py", "(fake_x0 - real_x0) / scale",
             "(real_x0 - fake_x0) / scale", "distribution matching pushes along real - fake (towards the fake)"),
    Mutation("dmd-normalised-by-fake", "diffkd/methods/dmd.py", "(x - real_x0).abs().flatten(1).mean(1)",
             "(x - fake_x0).abs().flatten(1).mean(1)", "DMD's weight is the distance to the fake x0, not the real"),
    Mutation("dmd-consistency-step-noise", "diffkd/methods/dmd.py",
             "schedule.broadcast(sigma_s, x) * fresh", "schedule.broadcast(sigma_s, x) * z",
             "DMD's consistency step re-noises with the step's input, not fresh noise"),
    Mutation("dmd-grid-off-its-scheduler", "diffkd/methods/dmd.py",
             "self.generator.path.sampled_grid(self.export_scheduler(), o.student_steps)",
             "teacher.denoiser.path.grid(o.student_steps)",
             "DMD2's generator trains on the Euler grid where its FlowMatchLCM export samples 0.5^(j / (k - 1))"),
    Mutation("shard-plan-keeps-whole-state", "diffkd/plan.py", "saved = sum(split.values()) - sum(size // processes",
             "saved = 0 * sum(split.values()) - sum(0 * size // processes",
             "a sharded plan keeps each process's trained weights and moments whole"),
    Mutation("shard-plan-whole-gradients", "diffkd/plan.py", "        param.grad = None\n", "",
             "a sharded trace keeps every whole gradient beside its reduce-scattered shard"),
    Mutation("shard-plan-gathers-one-block", "diffkd/plan.py", "return root + sum(blocks[:2])",
             "return root + sum(blocks[:1])", "a sharded plan forgets the block FSDP prefetches while one runs"),
    Mutation("guidance-embedding-offset", "diffkd/guidance_embedding.py", "1000.0 * (w.float() - 1.0)",
             "1000.0 * w.float()", "w embedded as the pipeline does not: of w, not w - 1"),
    Mutation("noise-offset-per-pixel", "diffkd/methods/text_denoise.py", "torch.randn(*x.shape[:2], 1, 1,",
             "torch.randn(*x.shape,", "offset noise drawn per pixel, not once per image and channel"),
    Mutation("noise-offset-scale", "diffkd/methods/text_denoise.py", "eps + self.options.noise_offset * offset",
             "eps + self.options.noise_offset ** 2 * offset", "offset noise scaled by its variance, not its std"),
    Mutation("vae-narrow-means", "diffkd/text_pipeline.py", "vae.quant_conv.bias[latent_channels:] = ",
             "vae.quant_conv.bias[:latent_channels] = ", "the narrow start is put on the posterior means, not its "
             "log-variances"),
    Mutation("selection-ties-move", "diffkd/selection.py", "if self.best_fd is None or fd < self.best_fd:",
             "if self.best_fd is None or fd <= self.best_fd:",
             "a validation that ties the best becomes the best: the longer-trained checkpoint is exported"),
    Mutation("patience-one-late", "diffkd/selection.py", "self.since_best >= patience",
             "self.since_best > patience", "early stopping waits one validation more than train.patience"),
    Mutation("validation-legacy-record-any-scale", "diffkd/selection.py",
             "if self.scored_by is not None else reads_images", "if self.scored_by is not None else True",
             "a record kept before its feature network was recorded resumes under a latent feature: one record, two "
             "FD scales"),
    Mutation("validation-plan-no-sampling-pass", "diffkd/plan.py",
             "passes = [Pass(STUDENT, False), *([Pass(TEACHER", "passes = [*([Pass(TEACHER",
             "the validation plan leaves out the student's sampling pass: a run validated on the training images is "
             "planned at its weights alone"),
    Mutation("validation-reference-other-noise", "diffkd/run_validation.py",
             "ddim_sample(self.teacher.denoiser, z, REFERENCE_STEPS, conds[0])",
             "ddim_sample(self.teacher.denoiser, torch.randn_like(z), REFERENCE_STEPS, conds[0])",
             "the teacher reference samples other noise than the student's (unpaired: ranks a 2.3x checkpoint best)"),
    Mutation("text-validation-reference-unguided", "diffkd/run_validation.py", "REFERENCE_STEPS, conds[0])",
             "REFERENCE_STEPS, conds[1])", "a text teacher's validation reference is sampled without the guidance the "
             "student is distilled from"),
    Mutation("text-validation-student-guided", "diffkd/run_validation.py", "z, k, conds[1])", "z, k, conds[0])",
             "the student is validated with classifier-free guidance on top of the guidance distilled into it"),
    Mutation("text-validation-w-redrawn", "diffkd/run_validation.py",
             "generator = torch.Generator().manual_seed(NOISE_STREAM + self.seed + index)",
             "generator = torch.Generator().manual_seed(torch.seed())",
             "a w range's w per validation noise is drawn afresh at each validation: checkpoints scored at other w"),
    Mutation("text-validation-rows-misaligned", "diffkd/run_validation.py", "v[start:start + len(noise)]",
             "v[:len(noise)]", "every validation chunk takes the first rows' prompts: noise and prompt no longer pair "
             "as the teacher reference drew them"),
    Mutation("latent-validation-decodes", "diffkd/run_validation.py",
             "features.append(self.feature(latents if self.feature.latents else",
             "features.append(self.feature(to_uint8(self.teacher.denoiser.decode(latents)) if self.feature.latents else",
             "a latent feature is fed the decoded images: latent validation scores pixels against latents"),
    Mutation("latent-reference-not-encoded", "diffkd/run_validation.py",
             "self.feature(teacher.denoiser.encode(chunk.to(device)))", "self.feature(chunk.to(device))",
             "the latent reference is the training images' pixels, not their latents"),
    Mutation("latent-random-conv-pixel-scaling", "diffkd/evaluation/random_features.py",
             "return self.embed(latents.float())", "return super().forward(latents)",
             "latents go through the image network's uint8 scaling (x / 127.5 - 1): every latent reads as about -1"),
    Mutation("validation-noise-is-evaluation-noise", "diffkd/run_validation.py", "NOISE_STREAM = 10**12",
             "NOISE_STREAM = 0", "the validation noise is the evaluation's seed-0 noise: the checkpoint is chosen on "
             "the noise that judges it"),
    Mutation("validation-arithmetic-mean", "diffkd/selection.py", "return math.prod(fds) ** (1 / len(fds))",
             "return sum(fds) / len(fds)", "per-k FDs combined by their arithmetic mean: the 2-step FD outweighs the "
             "4-step one"),
    Mutation("validation-auto-ignores-data", "diffkd/run_validation.py",
             '(reference == "auto" and captioned.kind_of(config.data.source) is not None)',
             '(reference == "auto" and captioned.kind_of(config.data.source) is None)',
             "validate_reference auto scores against the teacher's samples though the run holds its training images"),
    Mutation("validation-raw-not-ema", "diffkd/trainer.py", "            ema.copy_to(trainable(student))\n",
             "", "validation scores the raw weights while the EMA weights are exported"),
    Mutation("sampler-margin-ignored", "diffkd/sampler_choice.py",
             "return best if fds[best] < MARGIN * fds[own] else own", "return best",
             "the export's sampler switches on any lower validation FD, a near-tie included"),
    Mutation("sampler-swaps-unmeasured", "diffkd/sampler_choice.py",
             "if name != chosen and fds[name] <= ALSO_WORKS * fds[chosen]", "if name != chosen",
             "the model card lists every scored sampler as a swap that works, however badly it scored"),
    Mutation("ldm-scale-one-level-too-many", "diffkd/layouts/base.py",
             "2 ** (len(autoencoder.config.block_out_channels) - 1)",
             "2 ** len(autoencoder.config.block_out_channels)",
             "an LDMPipeline's pixels per latent counted from every level of its VQModel, the last one included"),
    Mutation("vq-encode-quantised", "diffkd/models.py",
             'return (encoded.latents if hasattr(encoded, "latents")',
             'return (autoencoder.quantize(encoded.latents)[0] if hasattr(encoded, "latents")',
             "a VQ teacher's training images encoded to their codebook entries, not the latents LDM trains on"),
    Mutation("latent-scale-inverted", "diffkd/methods/vae.py", "scale = float(1 / latents.float().std())",
             "scale = float(latents.float().std())",
             "an autoencoder stage's latents (VQ or KL) scaled by their std instead of to unit variance"),
    Mutation("sampler-alternatives-leading", "diffkd/paths.py",
             'DDIMScheduler.from_config(config, timestep_spacing="trailing")', "DDIMScheduler.from_config(config)",
             "the DDIM alternative samples the teacher's grid (SD: from t = 751), not from pure noise at T - 1"),
    Mutation("random-conv-unscaled", "diffkd/evaluation/random_features.py", "* math.sqrt(2 / (fan_in * 9))",
             "* math.sqrt(2 / fan_in)", "random conv weights not He-scaled by the kernel's fan-in"),
    Mutation("pooled-caption-dropped", "diffkd/text_pipeline.py",
             'addition_embed_type="text" if text_time_embedding else None', "addition_embed_type=None",
             "text_time_embedding: true leaves the pooled caption out of the timestep embedding"),
    Mutation("plan-tracker-never-frees", "diffkd/memory_tracker.py", "            self.current -= entry[1]",
             "            pass", "the memory tracker never takes a freed storage off: the plan is every allocation"),
    Mutation("plan-largest-batch-extrapolated", "diffkd/plan.py", "        peak(guess)\n",
             "        return guess\n", "the largest batch is the line's first guess, never traced: 68 in 80 GB for "
             "SD3 consistency, whose trace is 92.9 GB"),
    Mutation("plan-no-cfg-batch", "diffkd/plan_step.py", "return 2 if scale != 1.0 else 1", "return 1",
             "a classifier-free guided teacher pass planned at the plain batch, not twice it"),
    Mutation("plan-no-checkpointing", "diffkd/plan.py", "            module.enable_gradient_checkpointing()",
             "            pass", "the plan ignores train.gradient_checkpointing"),
]


def check_mutations(mutations: list[Mutation]) -> None:
    """Every mutation's text must occur exactly once in its file; otherwise stop, naming each stale one."""
    problems = []
    for m in mutations:
        path = ROOT / m.path
        count = path.read_text().count(m.old) if path.exists() else -1
        if count != 1:
            where = "file not found" if count < 0 else f"found {count} times, need exactly once"
            problems.append(f"mutation {m.name!r}: {m.old!r} in {m.path} ({where})")
    if problems:
        raise SystemExit("stale mutations (update their text in eval/mutation_score.py):\n" + "\n".join(problems))


def copy_repository(target: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info")
    shutil.copytree(ROOT, target, ignore=ignore)
    return target


def preload() -> None:
    """Import the heavy dependencies once; every mutant's test run is a fork of this process, so it pays only for
    importing (the mutated) diffkd and the tests, not torch and diffusers again (~35 s a run on the shared CPU)."""
    import diffusers  # noqa: F401
    import lpips  # noqa: F401
    import pytest  # noqa: F401
    import torchmetrics  # noqa: F401
    import transformers  # noqa: F401

    assert "diffkd" not in sys.modules, "the parent must not import diffkd: each mutant imports its own"


def _pytest_in_copy(copy: Path, tests: list[str], output: Path) -> None:
    """Child process: run the fast tests of ``copy`` with its diffkd, output to a file, exit with pytest's code."""
    descriptor = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.chdir(copy)
    os.environ["OMP_NUM_THREADS"] = "1"
    sys.path.insert(0, str(copy))
    import pytest

    import diffkd

    if not Path(diffkd.__file__).is_relative_to(copy):
        print(f"ERROR diffkd imported from {diffkd.__file__}, not the mutant copy", flush=True)
        os._exit(3)
    code = pytest.main(["-q", "-x", "-rfE", "-m", "not slow", "-p", "no:cacheprovider", *tests])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[str, str, float]:
    """('passed' | 'failed' | 'timeout', first failing test, seconds) of the fast tests in ``copy``."""
    output = copy.parent / "pytest.log"
    started = time.perf_counter()
    child = multiprocessing.get_context("fork").Process(target=_pytest_in_copy, args=(copy, tests, output))
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        return "timeout", "", time.perf_counter() - started
    seconds = time.perf_counter() - started
    if child.exitcode == 0:
        return "passed", "", seconds
    text = output.read_text(errors="replace")
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", text, re.MULTILINE)
    return "failed", match.group(1) if match else f"exit {child.exitcode}", seconds


def score(mutations: list[Mutation], timeout: float) -> list[dict]:
    preload()
    with tempfile.TemporaryDirectory(prefix="diffkd-mutants-") as tmp:
        copy = copy_repository(Path(tmp) / "repo")
        baseline, failing, seconds = run_tests(copy, FAST_TESTS, timeout)
        if baseline != "passed":
            raise SystemExit(f"the unmutated fast tests do not pass ({baseline}: {failing}); fix them first")
        log.info("baseline: fast tests pass in %.0f s", seconds)
        rows = []
        for m in mutations:
            source = copy / m.path
            original = source.read_text()
            source.write_text(original.replace(m.old, m.new, 1))
            try:
                outcome, test, seconds = run_tests(copy, FAST_TESTS, timeout)
            finally:
                source.write_text(original)
            rows.append({"mutation": m, "caught": outcome != "passed", "outcome": outcome, "test": test,
                         "seconds": seconds})
            log.info("%-28s %-8s %5.0f s  %s", m.name, "caught" if outcome != "passed" else "MISSED", seconds, test)
    return rows


def report(rows: list[dict], seconds: float, command: str) -> str:
    caught = sum(r["caught"] for r in rows)
    lines = ["## Mutation score (issue 15)", "",
             f"- machine: {machine('cpu')}, 2 cores shared with other developers' jobs; mutants one at a time",
             f"- command: `{command}` ({seconds / 60:.1f} min)",
             f"- tests: `pytest -x -m \"not slow\"` over {', '.join(Path(t).name for t in FAST_TESTS)}",
             f"- **{caught}/{len(rows)} caught**", "",
             "| mutation | file | deliberate bug | caught | first failing test |", "|---|---|---|---|---|"]
    for r in rows:
        m = r["mutation"]
        verdict = "yes" if r["caught"] else "**NO**"
        if r["outcome"] == "timeout":
            verdict += " (timed out)"
        lines.append(f"| {m.name} | {m.path} | {m.bug} | {verdict} | {r['test'] or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="mutation names to run (default: all)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant's test run")
    parser.add_argument("--write", action="store_true", help="write the table into eval/RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = {m.name for m in MUTATIONS}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        raise SystemExit(f"unknown mutation(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    if args.write and args.only is not None:
        raise SystemExit("--write records the full list only; run without --only")
    mutations = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    check_mutations(mutations)
    started = time.perf_counter()
    rows = score(mutations, args.timeout)
    body = report(rows, time.perf_counter() - started, "python eval/mutation_score.py" + (" --write" if args.write
                                                                                          else ""))
    log.info("%s", body)
    if args.write:
        write_section("mutation-score", body)


if __name__ == "__main__":
    main()
