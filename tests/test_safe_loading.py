"""Safe loading: weights only through safetensors or torch.load(weights_only=True); a crafted pickle is refused and
never runs; custom pipeline code needs teacher.trust_remote_code."""

import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from diffkd import checkpoint
from diffkd.errors import DiffkdError
from diffkd.io import load_pipeline

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def a_checkpoint(tmp_path: Path) -> Path:
    return checkpoint.save(tmp_path / "checkpoints", 0, 1, {"student": {"w": torch.ones(2)}},
                           {"progress": {}, "optimizer": {}}, 1)


@pytest.mark.parametrize("name", ["rng_state.pkl", "optimizer.bin", "scaler.pt", "random_states_0.safetensors"])
def test_crafted_pickle_in_a_checkpoint_folder_is_refused_and_not_run(tmp_path, name):
    folder = a_checkpoint(tmp_path)
    marker = tmp_path / "PWNED"
    (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(DiffkdError, match="refusing .*pickle"):
        checkpoint.load(folder)
    assert not marker.exists()


def test_torch_save_zip_under_a_safetensors_name_is_refused(tmp_path):
    folder = a_checkpoint(tmp_path)
    torch.save({"w": torch.ones(2)}, folder / "student.safetensors")
    with pytest.raises(DiffkdError, match="refusing"):
        checkpoint.load(folder)


def test_crafted_pickle_teacher_weights_are_refused_and_not_run(tiny_teacher, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    (teacher / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    (teacher / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload(marker)}))
    with pytest.raises(DiffkdError, match="weights_only"):
        load_pipeline(str(teacher))
    assert not marker.exists()


def test_plain_bin_teacher_weights_still_load_weights_only(tiny_teacher, tmp_path):
    """Old hub pipelines ship .bin files: tensors-only pickles load (through weights_only=True), as in diffusers."""
    from safetensors.torch import load_file

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    weights = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save({k: v.clone() for k, v in load_file(weights).items()}, weights.with_suffix(".bin"))
    weights.unlink()
    assert load_pipeline(str(teacher)).unet.config.sample_size == 8


def test_custom_pipeline_code_does_not_run_without_trust_remote_code(tiny_teacher, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    marker = tmp_path / "PWNED"
    index = (teacher / "model_index.json").read_text()
    (teacher / "model_index.json").write_text(re.sub(r'"_class_name": "\w+"', '"_class_name": ["pipeline", "Evil"]',
                                                     index))
    (teacher / "pipeline.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                         "from diffusers import DDIMPipeline\nclass Evil(DDIMPipeline):\n    pass\n")
    with pytest.raises(DiffkdError, match="trust_remote_code"):
        load_pipeline(str(teacher))
    assert not marker.exists()


def test_the_code_never_unpickles_except_weights_only():
    """Every torch.load in diffkd passes weights_only=True; no pickle.load; trust_remote_code only from the config."""
    for file in (ROOT / "diffkd").rglob("*.py"):
        text = file.read_text()
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), f"{file}: {call.group(0)}"
        assert "pickle.load(" not in text and "pickle.loads(" not in text, file
        assert "trust_remote_code=True" not in text, file
