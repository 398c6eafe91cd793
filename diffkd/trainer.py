"""The one training loop, on accelerate: rounds of optimiser steps with EMA, checkpoints, logs and resume.

Everything random in a step (which rows, which noise, which timesteps) is drawn from a generator seeded by
(seed, round, step, shard), the global RNGs (python, numpy, torch, CUDA: dropout, say) are re-seeded from the same
numbers, and the LR is a pure function of the step, so a run resumed from a checkpoint continues bit-identically:
a checkpoint only needs weights, EMA, optimiser moments, the fp16 loss scale and counters. That is also why we do
not use accelerate's ``save_state``: it pickles the optimiser and RNG states, and checkpoints here are
pickle-free.

``train.batch_size`` is the global batch of one optimiser step. It is cut into ``processes x accumulation``
shards; shard j takes rows [j*b, (j+1)*b) of the step's batch and draws its noise from generator (step, j), so a
run on 2 processes equals a single process with ``gradient_accumulation_steps`` doubled, up to float summation
order.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from diffkd import checkpoint, round_health
from diffkd.config import TrainConfig
from diffkd.data import batch_indices
from diffkd.errors import DiffkdError, TrainingDiverged
from diffkd.methods.base import LossTerms, Method

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint's state.json."""

    round: int = 0
    step: int = 0
    skipped_steps: int = 0
    round_seconds: dict[str, float] = field(default_factory=dict)
    round_losses: list[float] = field(default_factory=list)  # this round's, for the round-health check
    round_health: list[dict] = field(default_factory=list)


def make_accelerator(train: TrainConfig, output: Path) -> Accelerator:
    """Gradient accumulation is done by the loop itself (no_sync + loss / n), so a skipped non-finite step can
    never knock accelerate's internal micro-step counter out of line with the optimiser steps."""
    if train.device.startswith("cuda") and not torch.cuda.is_available():
        raise DiffkdError(f"train.device={train.device!r} but CUDA is not available on this machine: "
                          "use --set train.device=cpu (or auto)")
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


def step_seed(seed: int, round_index: int, step: int, shard: int) -> int:
    """The seed of one shard of one step (shards past 64 are hashed so they never collide with the next step)."""
    if shard < 64:
        return ((seed * 1_000 + round_index) * 10_000_000 + step) * 64 + shard
    digest = hashlib.blake2b(f"{seed},{round_index},{step},{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Trainer:
    """Runs ``method`` to completion, checkpointing into ``output/checkpoints``."""

    def __init__(self, method: Method, train: TrainConfig, output: Path, accelerator: Accelerator):
        self.method, self.train, self.output, self.acc = method, train, output, accelerator
        self.checkpoints = output / "checkpoints"
        self.shards = accelerator.num_processes * train.gradient_accumulation_steps
        if train.batch_size % self.shards:
            raise DiffkdError(f"train.batch_size={train.batch_size} is the global batch of one optimiser step and must "
                              f"divide into {accelerator.num_processes} process(es) x "
                              f"train.gradient_accumulation_steps={train.gradient_accumulation_steps}: use a multiple "
                              f"of {self.shards}")
        self.data: dict[str, torch.Tensor] = {}
        self.num_rows = 0
        self.extras = method.extra_modules()
        params = list(method.student.parameters()) + list(self.extras.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=train.learning_rate, betas=train.adam_betas,
                                           weight_decay=train.weight_decay)
        self.student, self.optimizer = self.acc.prepare(method.student, self.optimizer)
        self.extras.to(self.acc.device)
        self.ema: EMAModel | None = None
        self.progress = Progress()

    # ---- the loop ------------------------------------------------------------------------------------------
    def load_data(self) -> None:
        """The method's training rows (images, encoded prompts, a teacher-sample cache). Separate from __init__ so
        that cheap checks (a checkpoint to resume) fail before an expensive dataset is built."""
        if not self.data:
            self.data = self.method.dataset()
            self.num_rows = len(next(iter(self.data.values())))

    def fit(self, resume_from: Path | None = None) -> Progress:
        if resume_from is not None:
            self.restore(resume_from)
        self.load_data()
        rounds = self.method.rounds()
        self.acc.init_trackers("diffkd")
        for index in range(self.progress.round, len(rounds)):
            current = rounds[index]
            if self.progress.step == 0:
                self._begin_round(index)
            started = time.perf_counter() - self.progress.round_seconds.get(current.name, 0.0)
            bar = tqdm(total=current.num_steps, initial=self.progress.step, desc=f"round {index + 1}/{len(rounds)} "
                       f"{current.name}", disable=not self.acc.is_main_process, dynamic_ncols=True)
            while self.progress.step < current.num_steps:
                logs = self._optimizer_step(index, current.num_steps)
                self.progress.step += 1
                self.progress.round_seconds[current.name] = time.perf_counter() - started
                bar.update(1)
                if logs is not None:
                    self.progress.round_losses.append(logs["loss/total"])
                    bar.set_postfix(loss=f"{logs['loss/total']:.4g}")
                    if self.progress.step % self.train.log_every == 0 or self.progress.step == current.num_steps:
                        self._log(index, logs)
                if self.progress.step % self.train.checkpoint_every == 0 and self.progress.step < current.num_steps:
                    self._save()
            bar.close()
            self.progress.round_health.append(round_health.judge(current.name, self.progress.round_losses))
            self.progress.round_losses = []
            self._end_round()
        return self.progress

    def _optimizer_step(self, round_index: int, num_steps: int) -> dict[str, float] | None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.train.learning_rate * lr_factor(self.train, self.progress.step, num_steps)
        accumulation = self.train.gradient_accumulation_steps
        world, rank = self.acc.num_processes, self.acc.process_index
        rows = batch_indices(self.num_rows, self.train.batch_size, self.progress.step,
                             self.train.seed + 7919 * round_index)
        size = self.train.batch_size // self.shards
        logs: dict[str, float] = {}
        try:
            for micro in range(accumulation):
                shard = micro * world + rank
                batch = {k: v[rows[shard * size:(shard + 1) * size]].to(self.acc.device) for k, v in self.data.items()}
                seed = step_seed(self.train.seed, round_index, self.progress.step, shard)
                set_seed(seed % 2**32)
                generator = torch.Generator().manual_seed(seed)
                sync = self.acc.no_sync(self.student) if micro < accumulation - 1 else contextlib.nullcontext()
                with sync, self.acc.autocast():
                    terms = self.method.loss(batch, self.student, generator)
                    self._check_finite(terms)
                    self.acc.backward(terms.total / accumulation)
                for key, value in terms.logs().items():
                    logs[key] = logs.get(key, 0.0) + value / accumulation
        except _SkipStep:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self._sync_extras()
        norm = self.acc.clip_grad_norm_(self._params(), self.train.grad_clip or float("inf"))
        finite = norm is None or bool(torch.isfinite(torch.as_tensor(norm)))
        if not finite and self.acc.scaler is None:
            self._nonfinite(f"gradient (norm {float(norm)})")
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()  # with fp16 the accelerate GradScaler skips an overflowed step and lowers its scale
        self.optimizer.zero_grad(set_to_none=True)
        if self.optimizer.step_was_skipped:
            log.debug("fp16 gradient overflow at step %d: the loss scaler skipped it", self.progress.step + 1)
            return None
        if self.ema is not None:
            self.ema.step(self.acc.unwrap_model(self.student).parameters())
        logs["lr"] = self.optimizer.param_groups[0]["lr"]
        logs["grad_norm"] = float(norm) if norm is not None else float("nan")
        return logs

    def _params(self) -> list[nn.Parameter]:
        return list(self.student.parameters()) + list(self.extras.parameters())

    def _sync_extras(self) -> None:
        """Modules outside the DDP wrapper (feature projections) get their gradients averaged by hand."""
        if self.acc.num_processes == 1:
            return
        for p in self.extras.parameters():
            if p.grad is not None:
                p.grad = self.acc.reduce(p.grad, reduction="mean")

    # ---- numerical faults ----------------------------------------------------------------------------------
    def _check_finite(self, terms: LossTerms) -> None:
        bad = [name for name, value in terms.terms.items() if not torch.isfinite(value.detach()).all()]
        if bad:
            self._nonfinite(f"loss term(s) {', '.join(bad)}")
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
        self.optimizer.optimizer.state.clear()
        self.ema = self._new_ema()

    def _new_ema(self) -> EMAModel | None:
        if self.train.ema_decay <= 0:
            return None
        return EMAModel(self.acc.unwrap_model(self.student).parameters(), decay=self.train.ema_decay)

    def _end_round(self) -> None:
        """The student leaves each round with its EMA weights (the next round's teacher and starting point)."""
        if self.ema is not None:
            self.ema.copy_to(self.acc.unwrap_model(self.student).parameters())
        self.progress.round += 1
        self.progress.step = 0
        self._save()

    def _save(self) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            optimizer_tensors, optimizer_json = checkpoint.split_optimizer_state(self.optimizer.state_dict())
            tensors = {"student": self.acc.unwrap_model(self.student).state_dict(),
                       "extras": self.extras.state_dict(), "optimizer": optimizer_tensors}
            if self.progress.step > 0:
                tensors["method"] = self.method.state_tensors()
                if self.ema is not None:
                    tensors["ema"] = {str(i): p for i, p in enumerate(self.ema.shadow_params)}
            state = {"progress": self.progress.__dict__, "optimizer": optimizer_json,
                     "ema_steps": self.ema.optimization_step if self.ema is not None else 0,
                     "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None}
            checkpoint.save(self.checkpoints, self.progress.round, self.progress.step,
                            {k: v for k, v in tensors.items() if v}, state, self.train.keep_checkpoints)
        self.acc.wait_for_everyone()

    def restore(self, folder: Path) -> None:
        """Load a checkpoint into this trainer (before anything is written: a bad checkpoint is a DiffkdError)."""
        tensors, state = checkpoint.load(folder)
        try:
            progress = Progress(**state["progress"])
            self.acc.unwrap_model(self.student).load_state_dict(tensors["student"])
            if "extras" in tensors or len(self.extras.state_dict()):
                self.extras.load_state_dict(tensors["extras"])
            self.optimizer.load_state_dict(checkpoint.join_optimizer_state(tensors.get("optimizer", {}),
                                                                           state["optimizer"]))
            if progress.round > len(self.method.rounds()):
                raise ValueError(f"it is at round {progress.round + 1} of a {len(self.method.rounds())}-round run")
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise DiffkdError(f"checkpoint {str(folder)!r} does not fit this config ({str(error).splitlines()[0]}); "
                              "resume with the config the run was started with (OUTPUT/config.yaml)") from None
        self.progress = progress
        if self.acc.scaler is not None and state.get("scaler"):
            self.acc.scaler.load_state_dict(state["scaler"])
        if self.progress.step > 0:
            self.method.load_state_tensors(self.progress.round, tensors.get("method", {}))
            self.ema = self._new_ema()
            if self.ema is not None:
                for shadow, (_, value) in zip(self.ema.shadow_params, sorted(tensors["ema"].items(),
                                                                             key=lambda kv: int(kv[0]))):
                    shadow.data.copy_(value)
                self.ema.optimization_step = state["ema_steps"]
        log.info("resuming from %s (round %d, step %d)", folder, self.progress.round + 1, self.progress.step)

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
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _global_step(self) -> int:
        done = sum(r.num_steps for r in self.method.rounds()[:self.progress.round])
        return done + self.progress.step

    def write_summary(self) -> None:
        if self.acc.is_main_process:
            (self.output / "training_summary.json").write_text(json.dumps(self.progress.__dict__, indent=1))


class _SkipStep(Exception):
    """Internal: a non-finite loss under nan_policy=skip abandons the current optimiser step."""
