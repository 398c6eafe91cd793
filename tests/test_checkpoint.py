"""Checkpoints: pickle-free round trip, atomic replacement, keep-last-K, and damaged folders never picked up."""

import json

import pytest
import torch

from diffkd import checkpoint
from diffkd.errors import DiffkdError


def adam_state() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(4, 3)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def save(root, step, model, optimizer, keep=2):
    tensors, skeleton = checkpoint.split_optimizer_state(optimizer.state_dict())
    return checkpoint.save(root, 0, step, {"student": model.state_dict(), "optimizer": tensors},
                           {"optimizer": skeleton}, keep)


def test_optimizer_state_round_trips_exactly_without_pickle(tmp_path):
    model, optimizer = adam_state()
    folder = save(tmp_path, 3, model, optimizer)
    assert sorted(p.name for p in folder.iterdir()) == ["optimizer.safetensors", "state.json",
                                                        "student.safetensors"]
    tensors, state = checkpoint.load(folder)
    restored = checkpoint.join_optimizer_state(tensors["optimizer"], state["optimizer"])
    original = optimizer.state_dict()
    for index, slots in original["state"].items():
        for slot, value in slots.items():
            assert torch.equal(restored["state"][index][slot], value), slot  # includes Adam's step counter
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-2)
    fresh.load_state_dict(restored)
    assert fresh.state_dict()["state"][0]["step"].item() == 3


def test_keeps_the_last_k_and_replaces_a_same_named_one(tmp_path):
    model, optimizer = adam_state()
    for step in (2, 4, 6, 8):
        save(tmp_path, step, model, optimizer, keep=3)
    assert [p.name for p in checkpoint.complete(tmp_path)] == [checkpoint.name_for(0, s) for s in (4, 6, 8)]
    save(tmp_path, 8, model, optimizer, keep=3)
    assert len(checkpoint.complete(tmp_path)) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_half_written_and_damaged_checkpoints_are_never_picked(tmp_path):
    model, optimizer = adam_state()
    good = save(tmp_path, 2, model, optimizer, keep=5)
    newer = save(tmp_path, 4, model, optimizer, keep=5)
    # a write killed before its rename: a temporary folder with everything in it, even state.json
    interrupted = tmp_path / f".tmp-{checkpoint.name_for(0, 6)}-999"
    interrupted.mkdir()
    (interrupted / "state.json").write_text("{}")
    # the newest renamed one damaged afterwards (a file cut short)
    student = newer / "student.safetensors"
    student.write_bytes(student.read_bytes()[:50])
    assert checkpoint.latest(tmp_path) == good
    with pytest.raises(DiffkdError, match="incomplete"):
        checkpoint.load(newer)
    save(tmp_path, 8, model, optimizer, keep=5)
    assert not interrupted.exists()  # leftovers of interrupted writes are cleaned by the next save


def test_state_json_lists_every_file_with_its_size(tmp_path):
    model, optimizer = adam_state()
    folder = save(tmp_path, 2, model, optimizer)
    files = json.loads((folder / "state.json").read_text())["files"]
    assert files == {p.name: p.stat().st_size for p in folder.glob("*.safetensors")}
