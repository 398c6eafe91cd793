"""``diffkd plan``: the peak accelerator memory of one optimiser step, before any work and without the weights.

The step's networks are built from their diffusers configs under torch's FakeTensorMode (tensors with shapes,
dtypes and devices but no storage), and the step is replayed as the method runs it (``diffkd.plan_step``): each
phase's passes in order, the backward, AdamW's step, zero_grad, with Adam's moments made beforehand, as in every step after the first.
a dispatch mode (``diffkd.memory_tracker``) counts every live storage while it runs; its peak is the plan. Replaying the step on the real
networks, rather than summing a hand formula, is what makes checkpointing, LoRA, autocast and the attention kernels
count as they really do; what is not replayed is the loss arithmetic between passes (a few latent-sized tensors).

Roles: weights (per network, at its dtype), gradients and Adam moments of the trained ones, the export EMA and
target copies, and activations: the peak less everything persistent. The VAE and text encoders stay on the device
but never run in a step (the conditioning is encoded once before training): they are counted, not traced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from diffkd.evaluation.random_features import LatentRandomConvFeatures
from diffkd.lora import adapter_targets, add_adapters
from diffkd.memory_tracker import PeakTracker
from diffkd.plan_layouts import Layout
from diffkd.plan_step import STUDENT, TARGET, TEACHER, Pass, StepSpec
from diffkd.precision import DTYPES, autocast
from diffkd.sharding import units

GB = 1e9
DEVICES_GB = (24, 40, 80)


@dataclass
class Levers:
    """What the run sets that moves memory: autocast precision, the frozen networks' dtype, gradient checkpointing
    of the trained networks, the export EMA on the accelerator (not when offloaded to host memory), the processes
    the trained networks are sharded over (``train.shard``; 1 = not sharded)."""

    mixed_precision: str = "bf16"
    frozen_dtype: str = "no"
    gradient_checkpointing: bool = False
    export_ema: bool = False
    shard_processes: int = 1


@dataclass
class Plan:
    batch_size: int
    peak_bytes: int
    roles: dict[str, int] = field(default_factory=dict)  # "student weights", "student grads", ... -> bytes

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GB


def build_network(layout: Layout, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``layout``'s network with its parameters made at ``dtype`` (``.to(dtype)`` cannot swap fake parameters)."""
    from diffusers import (
        FluxTransformer2DModel,
        SanaTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
        UNet2DModel,
    )

    classes = {"unet": UNet2DConditionModel, "unet2d": UNet2DModel, "sd3": SD3Transformer2DModel,
               "flux": FluxTransformer2DModel, "sana": SanaTransformer2DModel}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return classes[layout.family].from_config(layout.config)
    finally:
        torch.set_default_dtype(previous)


def network_inputs(layout: Layout, batch: int) -> dict:
    """One pass's inputs at ``batch``: latents, timesteps and the conditioning the layout's network takes."""
    c = layout.config
    t = torch.full((batch,), 500.0)
    if layout.family in ("unet", "unet2d"):
        size = c.get("sample_size", 64)
        inputs = {"sample": torch.randn(batch, c.get("in_channels", 4), size, size), "timestep": t}
        if layout.family == "unet":
            inputs["encoder_hidden_states"] = torch.randn(batch, layout.tokens, c["cross_attention_dim"])
            if c.get("addition_embed_type") == "text_time":
                pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
                inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled),
                                               "time_ids": torch.randn(batch, 6)}
        return inputs
    if layout.family == "sana":
        size = c["sample_size"]
        return {"hidden_states": torch.randn(batch, c["in_channels"], size, size), "timestep": t,
                "encoder_hidden_states": torch.randn(batch, layout.tokens, c["caption_channels"]),
                "encoder_attention_mask": torch.ones(batch, layout.tokens)}
    if layout.family == "sd3":
        size = c["sample_size"]
        return {"hidden_states": torch.randn(batch, c["in_channels"], size, size), "timestep": t,
                "encoder_hidden_states": torch.randn(batch, layout.tokens, c["joint_attention_dim"]),
                "pooled_projections": torch.randn(batch, c["pooled_projection_dim"])}
    pixels = 4096  # 1024 px: 128 x 128 latents packed 2 x 2
    return {"hidden_states": torch.randn(batch, pixels, c["in_channels"]), "timestep": t / 1000,
            "encoder_hidden_states": torch.randn(batch, layout.tokens, c["joint_attention_dim"]),
            "pooled_projections": torch.randn(batch, c["pooled_projection_dim"]), "guidance": torch.full((batch,), 3.5),
            "img_ids": torch.zeros(pixels, 3), "txt_ids": torch.zeros(layout.tokens, 3)}


def _samples(layout: Layout, batch: int) -> torch.Tensor:
    """A sampling chunk's latents as images are laid out, (batch, channels, height, width): Flux's packed 2 x 2
    patches unpacked."""
    inputs = network_inputs(layout, batch)
    sample = inputs.get("sample", inputs.get("hidden_states"))
    if sample.dim() == 4:
        return sample
    side = 2 * round(sample.shape[1] ** 0.5)
    return sample.new_empty(batch, sample.shape[2] // 4, side, side)


def add_lora(module: nn.Module, layout: Layout, rank: int) -> nn.Module:
    module.requires_grad_(False)
    targets = adapter_targets(module, None, layout.lora_targets)
    # peft moves each adapter to its base layer's device and dtype with Module.to, which cannot swap fake
    # parameters; everything here is made on the CPU in fp32 already, so those moves are skipped
    move, nn.Module.to = nn.Module.to, lambda self, *args, **kwargs: self
    try:
        return add_adapters(module, rank, targets)
    finally:
        nn.Module.to = move


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def trace_step(spec: StepSpec, layout: Layout, batch: int, levers: Levers) -> Plan:
    """The traced peak of one steady-state optimiser step of ``spec`` on ``layout``'s networks at ``batch``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False):
        networks, trained, emas, optimizers = _steady_state(spec, layout, levers)
        shards: list[torch.Tensor] = []
        if levers.shard_processes > 1:
            _reduce_scatter_gradients([p for params in trained.values() for p in params], levers.shard_processes,
                                      shards)
        with PeakTracker() as tracker:
            track(tracker, [*networks.values(), *optimizers, *emas])
            for phase, optimizer in zip(spec.phases, optimizers):  # a phase's repeats are alike: one of each
                _update(phase.passes, networks, layout, batch, levers.mixed_precision)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                shards.clear()
            peak = tracker.peak
        roles = _roles(spec, networks, trained, emas, layout, levers)
        gathered = (max(_gathered_bytes(networks[name]) for name in [*spec.trained, *spec.followers])
                    if levers.shard_processes > 1 else 0)
    untracked = sum(v for k, v in roles.items() if k.startswith("frozen parts"))
    roles["activations and temporaries"] = max(0, peak + untracked - sum(roles.values()))
    plan = Plan(batch, peak + untracked, roles)
    return shard(plan, spec, levers.shard_processes, gathered) if levers.shard_processes > 1 else plan


def trace_validation(spec: StepSpec, layout: Layout, batch: int, levers: Levers, reference_factor: int) -> Plan:
    """The traced peak of in-run validation between two steps (``diffkd.run_validation``): everything the step
    keeps but its gradients (zero_grad frees them), the live student weights the export EMA stores while its own
    weights are scored, the largest pass of one sampling chunk without gradients (the student's at ``batch`` and,
    where the reference is the teacher's samples, ``reference_factor`` > 0, 2 where guided, the teacher's), then
    the feature network on the chunk's samples, traced as the random-conv network (the shipped classifiers are of
    its size), all under the run's autocast, as validation samples."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False):
        networks, trained, emas, optimizers = _steady_state(spec, layout, levers)
        passes = [Pass(STUDENT, False), *([Pass(TEACHER, False, reference_factor)] if reference_factor else [])]
        with PeakTracker() as tracker:
            track(tracker, [*networks.values(), *optimizers, *emas])
            stored = [p.detach().clone() for p in trained[STUDENT]] if emas else []  # EMAModel.store
            for one in passes:
                _update([one], networks, layout, batch, levers.mixed_precision)
            samples = _samples(layout, batch)
            LatentRandomConvFeatures(samples.shape[1])(samples)
            del stored, samples
            peak = tracker.peak
    frozen_bytes = torch.tensor([], dtype=DTYPES[levers.frozen_dtype]).element_size()
    return Plan(batch, peak + sum(count * frozen_bytes for count in layout.frozen_parameters.values()))


def _steady_state(spec: StepSpec, layout: Layout, levers: Levers) -> tuple[dict, dict, list, list]:
    """The networks, their trained parameters, the export EMA's copies and the optimisers with Adam's moments made
    (as after a first step, without a pass): what exists on the device between two steps."""
    networks = _networks(spec, layout, levers)
    trained = {name: [p for p in networks[name].parameters() if p.requires_grad] for name in spec.trained}
    emas = [p.detach().clone() for name in spec.trained if levers.export_ema and name == STUDENT
            for p in trained[name]]
    optimizers = [torch.optim.AdamW([p for name in phase.trained for p in trained[name]]) for phase in spec.phases]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return networks, trained, emas, optimizers


def _reduce_scatter_gradients(params: list[torch.Tensor], processes: int, shards: list[torch.Tensor]) -> None:
    """In a sharded trace each whole gradient gives way, once complete, to its 1/N shard (kept in ``shards`` until
    the update ends), as FSDP's reduce-scatter does after each unit's backward; the optimiser then steps nothing."""
    def reduce_scatter(param: torch.Tensor) -> None:
        shards.append(torch.empty(param.numel() // processes, dtype=param.dtype))
        param.grad = None

    for param in params:
        param.register_post_accumulate_grad_hook(reduce_scatter)


def shard(plan: Plan, spec: StepSpec, processes: int, gathered: int) -> Plan:
    """The plan of one of ``processes`` sharded processes (``diffkd.sharding``): the gradients were traced as
    reduce-scattered (``_reduce_scatter_gradients``); the trained networks' and followers' weights, Adam moments
    and EMA live through the whole step, so (N - 1)/N of them comes off the traced peak exactly; the weights FSDP
    gathers whole while they run (the root unit for the whole update, the running block and the prefetched one)
    go on. Not measured against a sharded run: FSDP frees gathered weights by resizing storages, which the
    tracker does not see."""
    persistent = {*(f"{name} weights" for name in (*spec.trained, *spec.followers)),
                  *(f"{name} Adam moments" for name in spec.trained), "student export EMA"}
    split = {role: size for role, size in plan.roles.items() if role in persistent}
    roles = {role: size // processes if role in persistent or role.endswith(" grads") else size
             for role, size in plan.roles.items()}
    roles["weights gathered whole (sharding)"] = gathered
    saved = sum(split.values()) - sum(size // processes for size in split.values())
    peak = plan.peak_bytes - saved + gathered
    roles["activations and temporaries"] = max(0, peak - sum(v for k, v in roles.items()
                                                             if k != "activations and temporaries"))
    return Plan(plan.batch_size, peak, roles)


def _gathered_bytes(module: nn.Module) -> int:
    """What a sharded ``module`` holds whole at once at most: its root unit's weights and two blocks' (the one
    running and the one prefetched)."""
    blocks = sorted((_bytes(unit.parameters()) for unit in units(module)), reverse=True)
    root = _bytes(module.parameters()) - sum(blocks)
    return root + sum(blocks[:2])


def track(tracker: PeakTracker, objects: list) -> None:
    """Count what exists before the step: modules' parameters and buffers, optimisers' moments, loose tensors."""
    for thing in objects:
        if isinstance(thing, nn.Module):
            tracker.track(*thing.parameters(), *thing.buffers())
        elif isinstance(thing, torch.optim.Optimizer):
            tracker.track(*[v for state in thing.state.values() for v in state.values() if torch.is_tensor(v)])
        else:
            tracker.track(thing)


def _networks(spec: StepSpec, layout: Layout, levers: Levers) -> dict[str, nn.Module]:
    """Trained networks in fp32 (master weights), LoRA ones as fp32 adapters on a frozen base at ``frozen_dtype``;
    frozen ones at ``frozen_dtype``; a follower as a copy of the network it follows (a LoRA student's target is a whole copy)."""
    networks = {}
    for name, rank in spec.trained.items():  # a LoRA network's frozen base at the frozen dtype, as frozen_precision
        module = build_network(layout, DTYPES[levers.frozen_dtype] if rank else torch.float32).train()
        if rank:
            add_lora(module, layout, rank)
        if levers.gradient_checkpointing:
            module.enable_gradient_checkpointing()
        networks[name] = module
    for name in spec.frozen:
        networks[name] = build_network(layout, DTYPES[levers.frozen_dtype]).requires_grad_(False).eval()
    for name, source in spec.followers.items():
        module = build_network(layout)
        if spec.trained[source]:
            add_lora(module, layout, spec.trained[source])
        networks[name] = module.requires_grad_(False).eval()
    return networks


def _update(passes: list[Pass], networks: dict[str, nn.Module], layout: Layout, batch: int, precision: str) -> None:
    """One update's passes in the method's order; the grad passes' outputs make the loss, then the backward."""
    loss = None
    with autocast("cpu", precision):
        for one in passes:
            inputs = network_inputs(layout, batch * one.batch_factor)
            with torch.set_grad_enabled(one.grad):
                output = networks[one.network](**inputs, return_dict=False)[0].float()
            if one.grad:
                term = output.pow(2).mean()
                loss = term if loss is None else loss + term
            del output, inputs
    if loss is not None:
        loss.backward()


def _roles(spec: StepSpec, networks: dict[str, nn.Module], trained: dict, emas: list, layout: Layout,
           levers: Levers) -> dict[str, int]:
    roles = {}
    for name, module in networks.items():
        roles[f"{name} weights"] = _bytes(module.parameters()) + _bytes(module.buffers())
    for name, params in trained.items():
        roles[f"{name} grads"] = _bytes(params)
        roles[f"{name} Adam moments"] = 2 * _bytes(params)
    if emas:
        roles["student export EMA"] = _bytes(emas)
    frozen_bytes = torch.tensor([], dtype=DTYPES[levers.frozen_dtype]).element_size()
    for part, count in layout.frozen_parameters.items():
        roles[f"frozen parts: {part}"] = count * frozen_bytes
    return roles


def largest_batch(trace: Callable[[int], Plan], limit_gb: float, low: int = 8, high: int = 16) -> int | None:
    """A batch whose traced peak fits ``limit_gb``, within 1/16 of the largest that does: guesses are linear through
    the traces that bracket the limit (first ``low`` and ``high``), each checked by tracing it, every other one the
    bracket's middle. A line through 8 and 16 alone overshoots where a batch-independent part (autocast's copies of
    the weights) sets the small batches' peak: on SD3 consistency it said 68 in 80 GB, whose trace is 92.9 GB. None
    when the peak does not grow from ``low`` to ``high`` (the optimiser step sets it: above ``high``)."""
    peaks: dict[int, float] = {}

    def peak(batch: int) -> float:
        if batch not in peaks:
            peaks[batch] = trace(batch).peak_gb
        return peaks[batch]

    if peak(high) <= peak(low):
        return None
    if peak(1) > limit_gb:
        return 0
    for turn in range(64):  # each turn traces a batch inside the bracket, every other one its middle
        fits = max((b for b, gb in peaks.items() if gb <= limit_gb), default=0)
        over = min((b for b, gb in peaks.items() if gb > limit_gb), default=None)
        if over is None:  # every traced batch fits: extrapolate from the two largest
            a, b = sorted(peaks)[-2:]
            slope = (peaks[b] - peaks[a]) / (b - a)
            guess = max(b + 1, b + int((limit_gb - peaks[b]) // slope) if slope > 0 else 2 * b)
        elif over - fits <= max(1, fits // 16):  # a traced fit within 1/16 of the largest: each trace costs seconds
            return fits
        elif fits and turn % 2 == 0:
            slope = (peaks[over] - peaks[fits]) / (over - fits)
            guess = min(max(fits + 1, fits + int((limit_gb - peaks[fits]) // slope)), over - 1)
        else:
            guess = (fits + over) // 2
        peak(guess)
    raise RuntimeError("no batch size converged")  # pragma: no cover - 64 halvings span any batch


__all__ = ["DEVICES_GB", "TARGET", "TEACHER", "Levers", "Plan", "largest_batch", "trace_step", "trace_validation"]
