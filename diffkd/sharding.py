"""Sharded data parallelism of the trained networks (``train.shard``): FSDP2, torch's ``fully_shard``.

With N processes each keeps 1/N of every trained network's weights, gradients, Adam moments and export EMA, and of
its followers (consistency's target network): a forward all-gathers one block's weights just before the block runs
and frees them after, the backward reduce-scatters the gradients averaged over the processes (so the trainer's own
all-reduce skips them). The frozen teacher is not sharded: it also runs outside the training loop, on one process
(teacher-sample caches, the evaluation).

accelerate's FSDP plugin wraps the same ``fully_shard``, but one model and optimiser per ``prepare`` call and only on
accelerators (a CPU run falls back to DDP); diffkd's methods train several networks with one optimiser per phase,
and sharding each of them with ``fully_shard`` directly runs the same way on NCCL and on CPU (gloo), which is how the
tests hold a sharded run against one process.

Every process must take part in each gather (``full_state``, ``plain_copy``) in the same order: the trainer
gathers checkpoints, validation weights and the export on every process and writes on the first. torch's FSDP,
DTensor and device-mesh modules are imported where used: 0.6 s here that an unsharded run need not pay.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_mesh(device: torch.device, processes: int):
    """A one-dimensional mesh over all processes, on the device type training runs on."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (processes,))


def shard_network(module: nn.Module, mesh) -> nn.Module:
    """Shard ``module`` in place: each entry of its block lists (down/up blocks, transformer blocks) and its mid
    block as a unit of its own (its weights gathered only while it runs), then the rest as the root unit
    (gathered until ``reshard``)."""
    from torch.distributed.fsdp import fully_shard

    for unit in units(module):
        fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def units(module: nn.Module) -> list[nn.Module]:
    """The sub-modules ``shard_network`` shards as units of their own: the entries of the network's block lists
    and its mid block, those with weights."""
    found = []
    for name, child in module.named_children():
        found += list(child) if isinstance(child, nn.ModuleList) else [child] if name == "mid_block" else []
    return [unit for unit in found if next(unit.parameters(), None) is not None]


def reshard(modules) -> None:
    """Free the gathered weights of sharded ``modules``' root units. FSDP2 keeps a root gathered from its forward
    to its backward, which may never come (a target network's no-grad pass) or come through a side output (the
    GAN head reads the fake score's mid-block features, so the root's own output gets no gradient and its
    pre-backward hook never fires): resharding the root after its forward instead breaks that backward, so the
    trainer reshards after every update."""
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_sharded_network(module: nn.Module) -> bool:
    return any(is_sharded(p) for p in module.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every process when sharded)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each sharded tensor gathered whole into host memory, one at a time (a whole network would
    not fit the device that holds its shard): what a checkpoint stores, whatever the process count."""
    return {name: tensor.full_tensor().cpu() if is_sharded(tensor) else tensor for name, tensor in state.items()}


def like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as ``reference`` is: this process's shard when ``reference`` is sharded. Every
    process holds the same whole tensor (read from one checkpoint), so each takes its shard locally."""
    if not is_sharded(reference):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(reference.device, reference.dtype), reference.device_mesh, reference.placements,
                             src_data_rank=None)


def state_like(full: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's whole tensors laid out as the module's own state (``module.state_dict()``) is."""
    return {name: like(tensor, reference[name]) if name in reference else tensor for name, tensor in full.items()}


def optimizer_state_like(state_dict: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An optimiser state dict of whole tensors with each moment laid out as its parameter is (the state's keys
    are the parameters' positions across the param groups, torch's own numbering)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {index: {key: like(value, params[int(index)]) if torch.is_tensor(value) and value.dim() > 0 else value
                     for key, value in slots.items()}
             for index, slots in state_dict["state"].items()}
    return {**state_dict, "state": state}


def plain_copy(module: nn.Module) -> nn.Module:
    """An unsharded copy of ``module`` (a diffusers model), made from its config and its gathered weights; a plain
    module is deep-copied. Every process must call it; each gets the whole copy."""
    if not is_sharded_network(module):
        return copy.deepcopy(module)
    from torch.distributed.fsdp import FSDPModule

    original = next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))
    plain = original.from_config(module.config)
    plain.load_state_dict(full_state(module.state_dict()))
    return plain.to(next(module.parameters()).device).train(module.training)
