"""The one training loop, on accelerate: rounds of optimiser steps with EMA, checkpoints, logs and resume.

A method names its trainable networks and the phases of one optimiser step (``Method.networks``, ``Method.phases``;
one phase for a plain distillation, "critic x3, then student x1" for a two-time-scale method). Each phase has one
AdamW with a parameter group per network (its own LR, betas and weight decay); each update of a phase draws its own
batch, accumulates, averages gradients over processes, clips and checks for non-finite values on its own.

Everything random in an update (which rows, which noise, which timesteps) is drawn from a generator seeded by
(seed, round, step, shard, update), the global RNGs (python, numpy, torch, CUDA: dropout, say) are re-seeded from
the same numbers, and the LR is a pure function of the step, so a run resumed from a checkpoint continues
bit-identically: a checkpoint only needs weights, EMA, optimiser moments, followers, the fp16 loss scale and
counters. That is also why we do not use accelerate's ``save_state``: it pickles the optimiser and RNG states, and
checkpoints here are pickle-free.

``train.batch_size`` is the global batch of one update. It is cut into ``processes x accumulation`` shards; shard j
takes rows [j*b, (j+1)*b) of the update's batch and draws its noise from generator (step, j), and the gradients are
averaged over processes by hand (one all-reduce per update, no DDP wrapper), so a run on 2 processes equals a
single process with ``gradient_accumulation_steps`` doubled, up to float summation order.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from accelerate.utils.memory import should_reduce_batch_size
from diffusers.training_utils import EMAModel
from torch import nn

from diffkd import checkpoint, round_health, sharding
from diffkd.config import TrainConfig
from diffkd.data import batch_indices
from diffkd.errors import DiffkdError, RunDoesNotFit, TrainingDiverged
from diffkd.io import check_device
from diffkd.losses.terms import LossTerms
from diffkd.methods.base import Method, Network, Phase
from diffkd.progress import Progress as RunProgress
from diffkd.run_folder import CONFIG_FILE
from diffkd.selection import Selection
from diffkd.streaming import StreamedRows

if TYPE_CHECKING:
    from diffkd.run_validation import Validator

log = logging.getLogger(__name__)

# What a run that ran out of accelerator memory can do: first what --resume takes (diffkd.run_folder.RESUMABLE_CHANGES).
STEP_FIX = ("turn on train.gradient_checkpointing (--resume takes it), or start again with a smaller train.batch_size, "
            "train.frozen_dtype=bf16 or train.mixed_precision=bf16")
VALIDATION_FIX = "--resume with a smaller train.validate_batch_size"


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint's state.json."""

    round: int = 0
    step: int = 0
    skipped_steps: int = 0
    round_seconds: dict[str, float] = field(default_factory=dict)
    round_losses: list[float] = field(default_factory=list)  # this round's, for the round-health check
    round_health: list[dict] = field(default_factory=list)
    validation: dict = field(default_factory=dict)  # a diffkd.selection.Selection's fields


def make_accelerator(train: TrainConfig, output: Path) -> Accelerator:
    """Gradient accumulation is done by the loop itself (no_sync + loss / n), so a skipped non-finite step can
    never knock accelerate's internal micro-step counter out of line with the optimiser steps."""
    check_device(train.device, "train.device")
    if train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise DiffkdError("train.mixed_precision=fp16 needs a CUDA GPU: use bf16 or no on this machine")
    return Accelerator(mixed_precision=train.mixed_precision, cpu=train.device == "cpu",
                       log_with="tensorboard", project_dir=str(output / "logs"))


def lr_factor(train: TrainConfig, step: int, num_steps: int) -> float:
    """Warm-up then linear-to-zero (the reference recipe), cosine, or constant; restarts every round."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, num_steps - train.warmup_steps)
    if train.lr_schedule == "linear":
        return 1.0 - progress
    if train.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def step_seed(seed: int, round_index: int, step: int, shard: int, update: int = 0) -> int:
    """The seed of one shard of one update of one step. Shards past 64 and updates past a step's first are hashed,
    so they never collide with the next step (and the first update keeps the seeds of a one-update step)."""
    if shard < 64 and update == 0:
        return ((seed * 1_000 + round_index) * 10_000_000 + step) * 64 + shard
    key = f"{seed},{round_index},{step},{shard}" + (f",{update}" if update else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimiser, clipping and the EMA see: a LoRA student's frozen base weights are none of them."""
    return [p for p in module.parameters() if p.requires_grad]


def export_ema(parameters: list[nn.Parameter], train: TrainConfig) -> EMAModel:
    """The exported weights' EMA as ``train`` sets it: fixed decay, or diffusers' power warm-up when ema_warmup;
    with offload_ema its copy lives in host memory (``ema_inputs``)."""
    ema = EMAModel(parameters, decay=train.ema_decay, use_ema_warmup=train.ema_warmup,
                   inv_gamma=train.ema_inv_gamma, power=train.ema_power)
    if train.offload_ema:
        ema.to("cpu")
    return ema


def ema_inputs(parameters: list[nn.Parameter], offload: bool) -> list[torch.Tensor]:
    """What EMAModel.step averages in: the parameters, or with an offloaded EMA their host copies, so the average
    is taken in host memory and the accelerator never holds the EMA (diffusers' offload_ema moves the whole EMA
    onto the accelerator for its step instead). The copies keep requires_grad: EMAModel copies, not averages, a
    parameter without it."""
    if not offload:
        return parameters
    return [p.detach().to("cpu").requires_grad_(True) for p in parameters]


def adam_class(name: str) -> type[torch.optim.Optimizer]:
    """AdamW, or bitsandbytes' AdamW8bit (moments in 8 bits: 2 bytes a parameter instead of 8) where it runs."""
    if name == "adamw":
        return torch.optim.AdamW
    try:
        import bitsandbytes
    except ImportError:
        raise DiffkdError("train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU: "
                          "use train.optimizer=adamw") from None
    if not torch.cuda.is_available():
        raise DiffkdError("train.optimizer=adamw8bit runs on CUDA only (bitsandbytes has no CPU 8-bit Adam): use "
                          "train.optimizer=adamw on this machine")
    return bitsandbytes.optim.AdamW8bit


def check_layout(method: str, networks: dict[str, Network], phases: list[Phase],
                 followers: dict[str, nn.Module]) -> None:
    """A method's networks, phases and followers fit together: one exported network, each network updated by
    exactly one phase, names that can be checkpoint file names."""
    problems = []
    names = [*networks, *followers]
    bad = [name for name in names if not name.isidentifier() or name == "method"]
    if bad:
        problems.append(f"names {bad} are not identifiers (or are 'method')")
    if len(set(names)) != len(names):
        problems.append("a follower has a network's name")
    exported = sum(network.exported for network in networks.values())
    if exported != 1:
        problems.append(f"{exported} networks are exported, not one")
    if sorted(name for phase in phases for name in phase.networks) != sorted(networks):
        problems.append(f"phases {[p.name for p in phases]} do not update each of {list(networks)} exactly once")
    if len({phase.name for phase in phases}) != len(phases) or any(phase.repeats < 1 for phase in phases):
        problems.append("phase names repeat, or a phase has repeats < 1")
    if problems:
        raise DiffkdError(f"method {method} declares its networks wrongly: {'; '.join(problems)}")


class Trainer:
    """Runs ``method`` to completion, checkpointing into ``output/checkpoints``."""

    def __init__(self, method: Method, train: TrainConfig, output: Path, accelerator: Accelerator,
                 identity: dict | None = None):
        """``identity``: the run every checkpoint records as its maker (``run_folder.run_identity``), so a resume can
        tell this run's checkpoints from another's."""
        self.method, self.train, self.output, self.acc = method, train, output, accelerator
        self.identity = identity
        self.checkpoints = output / "checkpoints"
        self.shards = accelerator.num_processes * train.gradient_accumulation_steps
        if train.batch_size % self.shards:
            raise DiffkdError(f"train.batch_size={train.batch_size} is the global batch of one optimiser step and must "
                              f"divide into {accelerator.num_processes} process(es) x "
                              f"train.gradient_accumulation_steps={train.gradient_accumulation_steps}: use a multiple "
                              f"of {self.shards}")
        self.data: dict[str, torch.Tensor] | StreamedRows = {}
        self.num_rows = 0
        self._stream: Iterator[tuple[tuple[int, ...], dict[str, torch.Tensor]]] | None = None
        self.networks, self.phases = method.networks(), method.phases()
        check_layout(type(method).__name__, self.networks, self.phases, method.followers())
        for network in self.networks.values():
            self.acc.prepare_model(network.module.to(self.acc.device), evaluation_mode=True)  # no DDP: see above
            if train.gradient_checkpointing and hasattr(network.module, "enable_gradient_checkpointing"):
                network.module.enable_gradient_checkpointing()
        self.sharded: list[nn.Module] = []
        if train.shard and accelerator.num_processes > 1:  # before the optimisers: they take the shards
            mesh = sharding.make_mesh(self.acc.device, accelerator.num_processes)
            self.sharded = [sharding.shard_network(module.to(self.acc.device), mesh) for module in
                            [*(n.module for n in self.networks.values()), *method.followers().values()]]
            log.info("sharded %d network(s) over %d processes", len(self.sharded), accelerator.num_processes)
        self.student = next(n.module for n in self.networks.values() if n.exported)
        adam = adam_class(train.optimizer)
        self.optimizers = {phase.name: self.acc.prepare_optimizer(adam(
            [self._param_group(name) for name in phase.networks])) for phase in self.phases}
        self.emas: dict[str, EMAModel] = {}
        self.progress = Progress()
        self.validator: Validator | None = None  # see diffkd.run_validation
        self.best_weights: dict[str, torch.Tensor] = {}

    def _param_group(self, name: str) -> dict:
        network = self.networks[name]
        return {"params": trainable(network.module), "name": name, "lr": self._base_lr(name),
                "betas": network.adam_betas or self.train.adam_betas,
                "weight_decay": self.train.weight_decay if network.weight_decay is None else network.weight_decay}

    def _base_lr(self, name: str) -> float:
        return self.networks[name].learning_rate or self.train.learning_rate

    # ---- the loop ------------------------------------------------------------------------------------------
    def load_data(self) -> None:
        """The method's training rows (images, encoded prompts, a teacher-sample cache). Separate from __init__ so
        that cheap checks (a checkpoint to resume) fail before an expensive dataset is built."""
        if not self.data:
            self.data = self.method.dataset()
            self.num_rows = len(next(iter(self.data.values()))) if isinstance(self.data, dict) else len(self.data)

    def fit(self, resume_from: Path | None = None) -> Progress:
        if resume_from is not None:
            self.restore(resume_from)
        self.load_data()
        rounds = self.method.rounds()
        self.acc.init_trackers("diffkd")
        shown = RunProgress(sum(r.num_steps for r in rounds), "training", initial=self._global_step(),
                            enabled=self.acc.is_main_process)
        for index in range(self.progress.round, len(rounds)):
            current = rounds[index]
            if self.progress.step == 0:
                self._begin_round(index)
            started = time.perf_counter() - self.progress.round_seconds.get(current.name, 0.0)
            if isinstance(self.data, StreamedRows):
                self._stream = self.data.batches(self._plan(index, current.num_steps))
            while self.progress.step < current.num_steps:
                with self.fits(f"training step {self.progress.step + 1} of round {index + 1}", STEP_FIX):
                    logs = self._optimizer_step(index, current.num_steps)
                self.progress.step += 1
                self.progress.round_seconds[current.name] = time.perf_counter() - started
                if logs is not None:
                    self.progress.round_losses.append(logs[self._headline])
                shown.update(1, f"round {index + 1}/{len(rounds)} {current.name}"
                             + (f", loss {logs[self._headline]:.4g}" if logs is not None else ""))
                if logs is not None and (self.progress.step % self.train.log_every == 0
                                         or self.progress.step == current.num_steps):
                    self._log(index, logs)
                with self.fits(f"the validation after step {self.progress.step} of round {index + 1} "
                                f"({self.train.validate_batch_size} noises at once)", VALIDATION_FIX):
                    stop = self._validates(index, len(rounds), current.num_steps) and self._validate()
                if stop:
                    break
                if self.progress.step % self.train.checkpoint_every == 0 and self.progress.step < current.num_steps:
                    self._save()
            self.progress.round_health.append(round_health.judge(current.name, self.progress.round_losses,
                                                                     current.loss_falls))
            self.progress.round_losses = []
            self._end_round()
        shown.close()
        return self.progress

    def _validates(self, index: int, num_rounds: int, num_steps: int) -> bool:
        """Validation runs in the last round only (earlier rounds of progressive train other step counts), every
        ``validate_every`` steps and at the round's end."""
        every = self.train.validate_every
        return (self.validator is not None and every > 0 and index == num_rounds - 1
                and (self.progress.step % every == 0 or self.progress.step == num_steps))

    def _validate(self) -> bool:
        """Score the student, keep its weights if best; True when early stopping ends the run here."""
        selection = Selection(**self.progress.validation)
        started = time.perf_counter()
        student = self.acc.unwrap_model(self.student)
        ema = next((self.emas[name] for name, n in self.networks.items() if n.exported and name in self.emas), None)
        if ema is not None:  # what the round's end would export: the EMA weights
            ema.store(trainable(student))
            ema.copy_to(trainable(student))
        try:
            best = selection.record(self._global_step(), self.validator(student), self.validator.feature_identity)
            if best:
                self.best_weights = {k: v.detach().cpu().clone()
                                     for k, v in sharding.full_state(checkpoint.network_state(student)).items()}
        finally:
            sharding.reshard(self.sharded)
            if ema is not None:
                ema.restore(trainable(student))
        selection.seconds += time.perf_counter() - started
        step = self._global_step()
        latest = selection.history[-1]
        log.info("validation at step %d: FD %s (geometric mean %.4g; best %.4g at step %d)", step,
                 ", ".join(f"{fd:.4g} at {k} steps" for k, fd in latest["fd_per_k"].items()), latest["fd"],
                 selection.best_fd, selection.best_step)
        selection.stopped_early = selection.should_stop(self.train.patience)
        self.progress.validation = asdict(selection)
        if self.acc.is_main_process:
            self.acc.log({"validation/fd": latest["fd"],
                          **{f"validation/fd_{k}_steps": fd for k, fd in latest["fd_per_k"].items()}}, step=step)
        return selection.stopped_early

    def _continued_record(self, folder: Path, record: dict, best: dict) -> tuple[dict, dict]:
        """The validation record and best weights a resumed run goes on with: its own, unless this run's validator
        scores in another feature network (``Selection.extends``; ``auto`` may resolve otherwise than when the run
        started: a latent teacher's, since latent-random-conv). FDs of two networks do not compare, so the record
        starts afresh there and the training goes on."""
        validator = self.validator
        if validator is None or Selection(**record).extends(validator.feature_identity, not validator.feature.latents):
            return record, best
        log.warning("checkpoint %s holds validations scored by %s and this run validates with %s: their FDs do not "
                    "compare, so the validation record starts afresh at step %d (the export is chosen among the "
                    "validations from here on)", folder, record.get("scored_by") or "decoded images",
                    validator.feature_identity, self._global_step())
        return {}, {}

    def trained_networks(self) -> tuple[nn.Module, ...]:
        return tuple(network.module for network in self.networks.values())

    def exported_network(self) -> nn.Module:
        """The network the run exports, whole: when sharded, a plain copy gathered on every process (each must
        call this), else the network itself."""
        return sharding.plain_copy(self.student) if sharding.is_sharded_network(self.student) else \
            self.acc.unwrap_model(self.student)

    @property
    def _headline(self) -> str:
        """The logged value the progress bar shows: the last phase's total loss."""
        return self._log_key(self.phases[-1], "loss/total")

    def _log_key(self, phase: Phase, key: str) -> str:
        """A single-phase method logs plain keys (loss/total); several phases prefix theirs (critic/loss/total)."""
        return key if len(self.phases) == 1 else f"{phase.name}/{key}"

    def _optimizer_step(self, round_index: int, num_steps: int) -> dict[str, float] | None:
        """Every phase's updates in order, then the export EMA and the method's ``after_step``; None if skipped."""
        factor = lr_factor(self.train, self.progress.step, num_steps)
        logs: dict[str, float] = {}
        update = 0
        for phase in self.phases:
            for group in self.optimizers[phase.name].param_groups:
                group["lr"] = self._base_lr(group["name"]) * factor
            for _ in range(phase.repeats):
                update_logs = self._update(phase, round_index, update)
                if update_logs is None:
                    return None
                for key, value in update_logs.items():
                    key = self._log_key(phase, key)
                    logs[key] = logs.get(key, 0.0) + value / phase.repeats
                update += 1
        for name, ema in self.emas.items():
            ema.step(ema_inputs(trainable(self.networks[name].module), self.train.offload_ema))
        self.method.after_step()
        return logs

    def _update(self, phase: Phase, round_index: int, update: int) -> dict[str, float] | None:
        """One update of ``phase``: accumulate its loss over the shards of its own batch, average over processes,
        clip, check, step its optimiser. Update 0 of a step draws what a one-update step always drew."""
        accumulation = self.train.gradient_accumulation_steps
        world, rank = self.acc.num_processes, self.acc.process_index
        rows = self._rows(round_index, self.progress.step, update)
        logs: dict[str, float] = {}
        try:
            for micro in range(accumulation):
                shard = micro * world + rank
                batch = self._batch(rows[self._shard_slice(shard)], (self.progress.step, update, micro))
                seed = step_seed(self.train.seed, round_index, self.progress.step, shard, update)
                set_seed(seed % 2**32)
                generator = torch.Generator().manual_seed(seed)
                with self.acc.autocast():
                    terms = self.method.loss(phase.name, batch, generator)
                    self._check_finite(terms, phase)
                    self.acc.backward(terms.total / accumulation)
                for key, value in terms.logs().items():
                    logs[key] = logs.get(key, 0.0) + value / accumulation
        except _SkipStep:
            self._zero_grad()
            return None
        finally:
            sharding.reshard(self.sharded)
        params = [p for name in phase.networks for p in trainable(self.networks[name].module)]
        self._reduce_gradients(params)
        clip = self.train.grad_clip if phase.grad_clip is None else phase.grad_clip
        norm = self.acc.clip_grad_norm_(params, clip or float("inf"))
        norm = None if norm is None else sharding.full_tensor(torch.as_tensor(norm))
        finite = norm is None or bool(torch.isfinite(norm))
        if not finite and self.acc.scaler is None:
            self._nonfinite(f"gradient (norm {float(norm)}) in phase {phase.name}")
            self._zero_grad()
            return None
        optimizer = self.optimizers[phase.name]
        optimizer.step()  # with fp16 the accelerate GradScaler skips an overflowed step and lowers its scale
        self._zero_grad()
        if optimizer.step_was_skipped:
            log.debug("fp16 gradient overflow at step %d: the loss scaler skipped it", self.progress.step + 1)
            return None
        logs["lr"] = optimizer.param_groups[0]["lr"]
        logs["grad_norm"] = float(norm) if norm is not None else float("nan")
        return logs

    def _rows(self, round_index: int, step: int, update: int) -> torch.Tensor:
        """The rows of one update's global batch: a pure function of (seed, round, step, update)."""
        return batch_indices(self.num_rows, self.train.batch_size, step,
                             self.train.seed + 7919 * round_index + 104_729 * update)

    def _shard_slice(self, shard: int) -> slice:
        size = self.train.batch_size // self.shards
        return slice(shard * size, (shard + 1) * size)

    def _plan(self, round_index: int, num_steps: int) -> Iterator[tuple[tuple[int, int, int], list[int]]]:
        """This process's shards of every update from the current step to the round's end, in the order ``_update``
        asks for them: what a streamed set's workers decode ahead of the loop. Each rank's are its own rows."""
        updates = sum(phase.repeats for phase in self.phases)
        world, rank = self.acc.num_processes, self.acc.process_index
        for step in range(self.progress.step, num_steps):
            for update in range(updates):
                rows = self._rows(round_index, step, update)
                for micro in range(self.train.gradient_accumulation_steps):
                    yield (step, update, micro), rows[self._shard_slice(micro * world + rank)].tolist()

    def _batch(self, rows: torch.Tensor, key: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        """The rows' tensors: indexed in memory, or the streamed batch planned for ``key`` (batches planned for a
        skipped step's remaining updates are passed over)."""
        if isinstance(self.data, dict):
            return {k: v[rows].to(self.acc.device) for k, v in self.data.items()}
        for planned, batch in self._stream:
            if planned == key:
                return {k: v.to(self.acc.device) for k, v in batch.items()}
            if planned > key:
                break
        raise RuntimeError(f"streamed batch {key} was not in the plan")  # a bug in _plan, not a user error

    def _zero_grad(self) -> None:
        """Every network's gradients, not only the phase's: a student loss through the critic reaches the critic."""
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    def _reduce_gradients(self, params: list[nn.Parameter]) -> None:
        """Average the gradients over processes, in one flat all-reduce (what DDP's buckets do, for any network);
        a sharded network's backward has averaged its own."""
        grads = [p.grad for p in params if p.grad is not None and not sharding.is_sharded(p.grad)]
        if self.acc.num_processes == 1 or not grads:  # a sharded network's were averaged by its backward
            return
        flat = self.acc.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
        for grad, averaged in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(averaged.view_as(grad))

    @contextlib.contextmanager
    def fits(self, what: str, fix: str):
        """An accelerator out-of-memory error in ``what`` becomes one line naming where, the last checkpoint (left as
        it was: nothing of the failed step is saved) and ``fix``, which the run's plan sizes."""
        try:
            yield
        except Exception as error:
            if not should_reduce_batch_size(error):  # accelerate's test: CUDA, MPS, XPU or host allocator
                raise
            last = checkpoint.latest(self.checkpoints)
            raise RunDoesNotFit(
                f"out of accelerator memory in {what}; the last checkpoint is {str(last) if last else 'none yet'}: {fix} "
                f"(`diffkd plan {self.output / CONFIG_FILE}` gives the peak and the largest batch per device)"
            ) from None

    # ---- numerical faults ----------------------------------------------------------------------------------
    def _check_finite(self, terms: LossTerms, phase: Phase) -> None:
        bad = [name for name, value in terms.terms.items() if not torch.isfinite(value.detach()).all()]
        if bad:
            self._nonfinite(f"loss term(s) {', '.join(bad)} in phase {phase.name}")
            raise _SkipStep

    def _nonfinite(self, what: str) -> None:
        where = f"round {self.progress.round + 1}, step {self.progress.step + 1}"
        if self.train.nan_policy == "skip" and self.progress.skipped_steps < self.train.max_skipped_steps:
            self.progress.skipped_steps += 1
            log.warning("non-finite %s at %s: step skipped (%d so far)", what, where, self.progress.skipped_steps)
            return
        last = checkpoint.latest(self.checkpoints)
        raise TrainingDiverged(f"non-finite {what} at {where}; the last good checkpoint is "
                               f"{str(last) if last else 'none yet'}: lower train.learning_rate, or set "
                               "train.nan_policy=skip, then --resume")

    # ---- rounds, EMA, checkpoints ------------------------------------------------------------------------
    def _begin_round(self, index: int) -> None:
        self.progress.round, self.progress.step = index, 0
        self.method.begin_round(index)
        for optimizer in self.optimizers.values():
            optimizer.optimizer.state.clear()
        self.emas = self._new_emas()

    def _new_emas(self) -> dict[str, EMAModel]:
        if self.train.ema_decay <= 0:
            return {}
        return {name: export_ema(trainable(network.module), self.train)
                for name, network in self.networks.items() if network.export_ema}

    def _end_round(self) -> None:
        """Each network leaves the round with its EMA weights (for progressive: the next round's teacher and
        starting point)."""
        for name, ema in self.emas.items():
            ema.copy_to(trainable(self.networks[name].module))
        self.progress.round += 1
        self.progress.step = 0
        self._save()

    def _save(self) -> None:
        """One checkpoint of every network, every phase's optimiser, the followers and (mid-round) the EMAs; whole
        tensors, gathered on every process when sharded, written by the first."""
        self.acc.wait_for_everyone()
        tensors = {name: checkpoint.network_state(network.module) for name, network in self.networks.items()}
        skeletons = {}
        for phase, optimizer in self.optimizers.items():
            tensors[f"optimizer.{phase}"], skeletons[phase] = checkpoint.split_optimizer_state(optimizer.state_dict())
        if self.progress.step > 0:
            tensors["method"] = self.method.state_tensors()
            for name, ema in self.emas.items():
                tensors[f"ema.{name}"] = {str(i): p for i, p in enumerate(ema.shadow_params)}
        for name, follower in self.method.followers().items():
            tensors[f"follower.{name}"] = follower.state_dict()
        tensors = {group: sharding.full_state(state) for group, state in tensors.items()}
        tensors["validation_best"] = self.best_weights
        if self.acc.is_main_process:
            state = {"run": self.identity, "progress": self.progress.__dict__, "optimizers": skeletons,
                     "ema_steps": {name: ema.optimization_step for name, ema in self.emas.items()},
                     "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None}
            checkpoint.save(self.checkpoints, self.progress.round, self.progress.step,
                            {k: v for k, v in tensors.items() if v}, state, self.train.keep_checkpoints)
        self.acc.wait_for_everyone()

    def restore(self, folder: Path) -> None:
        """Load a checkpoint into this trainer (before anything is written: a bad checkpoint is a DiffkdError)."""
        tensors, state = checkpoint.load(folder)
        try:
            progress = Progress(**state["progress"])
            if progress.round > len(self.method.rounds()):
                raise ValueError(f"it is at round {progress.round + 1} of a {len(self.method.rounds())}-round run")
            for name, network in self.networks.items():
                checkpoint.load_network_state(network.module, sharding.state_like(
                    tensors.get(name, {}), network.module.state_dict()))
            for phase, optimizer in self.optimizers.items():
                optimizer.load_state_dict(sharding.optimizer_state_like(checkpoint.join_optimizer_state(
                    tensors.get(f"optimizer.{phase}", {}), state["optimizers"][phase]), optimizer))
            for name, follower in self.method.followers().items():
                follower.load_state_dict(sharding.state_like(tensors[f"follower.{name}"], follower.state_dict()))
            best = tensors.get("validation_best", {})
            if progress.validation.get("best_step") is not None and not best:
                raise ValueError("its validation record names a best step but it holds no best weights")
            if progress.step > 0:
                self.method.load_state_tensors(progress.round, tensors.get("method", {}))
                self.emas = self._new_emas()
                for name, ema in self.emas.items():
                    for index, shadow in enumerate(ema.shadow_params):
                        shadow.copy_(sharding.like(tensors[f"ema.{name}"][str(index)], shadow))
                    ema.optimization_step = state["ema_steps"][name]
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise DiffkdError(f"checkpoint {str(folder)!r} does not fit this config ({str(error).splitlines()[0]}); "
                              "resume with the config the run was started with (OUTPUT/config.yaml)") from None
        self.progress = progress
        progress.validation, self.best_weights = self._continued_record(folder, progress.validation, best)
        if self.acc.scaler is not None and state.get("scaler"):
            self.acc.scaler.load_state_dict(state["scaler"])
        rounds = len(self.method.rounds())
        if self.progress.round >= rounds:
            log.info("resuming from %s (after the last of %d round(s): nothing left to train)", folder, rounds)
        else:
            log.info("resuming from %s (round %d of %d, step %d)", folder, self.progress.round + 1, rounds,
                     self.progress.step)

    def trim_logs(self) -> None:
        """Drop metrics rows logged after the checkpoint being resumed (they will be logged again)."""
        path = self.output / "logs" / "metrics.csv"
        if not self.acc.is_main_process or not path.is_file():
            return
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        if not rows:
            return
        header, done = rows[0], (self.progress.round, self.progress.step)
        kept = [r for r in rows[1:] if len(r) == len(header) and r[0].isdigit() and r[1].isdigit()
                and (int(r[0]) - 1, int(r[1])) <= done]
        with path.open("w", newline="") as handle:
            csv.writer(handle).writerows([header, *kept])

    def _log(self, round_index: int, logs: dict[str, float]) -> None:
        if not self.acc.is_main_process:
            return
        row = {"round": round_index + 1, "step": self.progress.step, **logs}
        self.acc.log({k: v for k, v in logs.items()}, step=self._global_step())
        path = self.output / "logs" / "metrics.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        header = list(row)
        if not new:
            with path.open(newline="") as handle:
                header = next(csv.reader(handle), [])
        if any(key not in header for key in row):  # a round that logs other terms (dmd's warm start): widen the file
            with path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            header += [key for key in row if key not in header]
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=header, restval="")
                writer.writeheader()
                writer.writerows(rows)
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header, restval="")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _global_step(self) -> int:
        done = sum(r.num_steps for r in self.method.rounds()[:self.progress.round])
        return done + self.progress.step

    def write_summary(self, extra: dict | None = None) -> None:
        """Progress, for a streamed set the rows skipped and the time spent waiting for the data workers, and
        ``extra`` (the export's sampler choice)."""
        if self.acc.is_main_process:
            summary = {**self.progress.__dict__, **(extra or {})}
            wall = sum(self.progress.round_seconds.values())
            for key in ("validation", "sampler_choice"):
                if summary.get(key):
                    share = summary[key]["seconds"] / wall if wall else None
                    summary[key] = {**summary[key], "share_of_wall_time": share}
            if isinstance(self.data, StreamedRows):
                summary["data"] = {"rows": len(self.data), "rows_skipped": self.data.skipped,
                                   "wait_seconds": round(self.data.wait_seconds, 3)}
            (self.output / "training_summary.json").write_text(json.dumps(summary, indent=1))


class _SkipStep(Exception):
    """Internal: a non-finite loss under nan_policy=skip abandons the current optimiser step."""
