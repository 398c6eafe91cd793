"""The shipped recipes for real teachers: they resolve (--print-config) and run end to end on tiny random pipelines of
the same layout (a 32 px RGB pixel UNet for CIFAR-10, a Stable-Diffusion-shaped latent text pipeline for SD 1.5)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from diffkd.api import distill
from diffkd.config import dump_config, load_config
from tests.bad_inputs import rgb_teacher

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["method.start_steps=8", "method.final_steps=4", "method.steps_per_round=2", "train.batch_size=4",
         "train.device=cpu", "train.warmup_steps=0", "run_eval=false"]  # at the recipe's own precision (bf16)


@pytest.mark.parametrize("name, teacher", [("cifar10-progressive", "google/ddpm-cifar10-32"),
                                           ("sd15-progressive", "teachers/stable-diffusion-v1-5")])
def test_recipe_resolves_with_print_config(name, teacher, tmp_path):
    """--print-config, not --dry-run: a dry run loads the teacher, which these recipes download."""
    result = subprocess.run([sys.executable, "-m", "diffkd", "distill", f"configs/{name}.yaml", "--output",
                             str(tmp_path / "run"), "--print-config"], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["teacher"]["source"] == teacher and resolved["eval"]["feature"] == "inception"
    assert resolved["train"]["mixed_precision"] == "bf16" and not (tmp_path / "run").exists()


def _images(folder: Path, size: int, count: int = 8) -> str:
    folder.mkdir()
    for index in range(count):
        Image.new("RGB", (size, size), color=(30 * index, 100, 255 - 30 * index)).save(folder / f"{index}.png")
    return str(folder)


@pytest.fixture
def own_precision():
    """accelerate keeps one mixed precision per process (AcceleratorState): forgotten before and after a test
    that runs at another than the suite's "no"."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.slow
def test_cifar10_recipe_on_a_tiny_pixel_teacher_of_its_layout(tmp_path, own_precision):
    teacher = rgb_teacher(tmp_path)
    config = load_config(ROOT / "configs/cifar10-progressive.yaml",
                         [f"teacher.source={teacher}", f"data.source={_images(tmp_path / 'cifar', 32)}", *SMALL])
    folder = distill(config, tmp_path / "run")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_sd15_recipe_on_a_tiny_pipeline_of_its_layout(tiny_sd, tmp_path, own_precision):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    config = load_config(ROOT / "configs/sd15-progressive.yaml",
                         [f"teacher.source={tiny_sd}", f"data.source={_images(tmp_path / 'sd', 8)}",
                          f"data.prompts_file={prompts}", "method.imitation_steps=2", *SMALL])
    folder = distill(config, tmp_path / "run")
    assert yaml.safe_load((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    # VAE and text encoder are exported once, in the student folder, unchanged; checkpoints hold the UNet only
    for part in ("vae", "text_encoder", "unet"):
        assert (folder / part).is_dir()
    checkpoint_files = {p.name for p in (tmp_path / "run" / "checkpoints").rglob("*.safetensors")}
    assert not any("vae" in name or "text" in name for name in checkpoint_files)
    front = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    assert front["guidance_scale"] == 7.5 and front["num_inference_steps"] == 4


LAYOUT_RECIPES = [("sdxl-lcm-lora", "teachers/sdxl-base", "tiny_sdxl"),
                  ("sd3-consistency", "teachers/sd3.5-medium", "tiny_sd3"),
                  ("flux-dmd", "teachers/flux1-dev", "tiny_flux"),
                  ("sana-lcm-lora", "teachers/sana-1600m", "tiny_sana")]


@pytest.mark.parametrize("name, teacher, tiny", LAYOUT_RECIPES)
def test_layout_recipe_resolves_as_dry_run_prints_it(name, teacher, tiny):
    """What ``diffkd distill --dry-run`` prints (load_config, then dump_config), in process: a subprocess per recipe
    costs ~25 s on the shared CI cores, and the CLI path itself is covered by the recipes above."""
    resolved = yaml.safe_load(dump_config(load_config(ROOT / "configs" / f"{name}.yaml")))
    assert resolved["teacher"]["source"] == teacher and resolved["teacher"]["image_size"] == 1024
    assert "hf download" in (ROOT / "configs" / f"{name}.yaml").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name, teacher, tiny", LAYOUT_RECIPES)
def test_layout_recipe_on_a_tiny_pipeline_of_its_layout(name, teacher, tiny, request, tmp_path, own_precision):
    """Each recipe as shipped but for its size (1 step, 8 px (SANA: 32), batch 2, CPU) on a tiny random pipeline of
    its layout: the export is the layout's (a LoRA folder of transformer or UNet adapters, or a transformer student).
    At the recipe's own precision (bf16 autocast, frozen weights stored at bf16; CPU autocast's kernels) and
    validated against the teacher's samples, so every frozen bf16 network also samples inside validation."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    side = 32 if tiny == "tiny_sana" else 8  # 4x4 latents through each tiny autoencoder
    config = load_config(ROOT / f"configs/{name}.yaml",
                         [f"teacher.source={request.getfixturevalue(tiny)}", f"teacher.image_size={side}",
                          f"data.source={_images(tmp_path / 'images', side)}", f"data.prompts_file={prompts}",
                          "method.num_steps=1", "train.batch_size=2", "train.device=cpu", "train.warmup_steps=0",
                          "train.validate_every=1", "train.validate_samples=2", "train.validate_steps=[1]",
                          "train.validate_reference=teacher",
                          *(["method.fake_updates=1"] if name == "flux-dmd" else [])])
    folder = distill(config, tmp_path / "run")
    if config.student.lora is not None:
        weights = (folder / "pytorch_lora_weights.safetensors").read_bytes()
        assert (b"transformer." if tiny != "tiny_sdxl" else b"unet.") in weights[:4096]
    else:
        assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
