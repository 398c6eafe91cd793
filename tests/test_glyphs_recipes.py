"""The glyphs recipes for guidance-embedded and LoRA students resolve with the settings their benchmark needs."""

from pathlib import Path

import pytest

from diffkd.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_guidance_progressive_recipe_resolves():
    config = load_config(CONFIGS / "glyphs-guidance-progressive.yaml")
    assert config.method.guidance.w_min <= 2 and config.method.guidance.w_max >= 6  # the benchmark's w in {2, 4, 6}
    assert config.method.guidance_scale == 1.0 and config.method.final_steps == 4
    assert config.teacher.source == "teachers/glyphs-32" and config.data.source == "glyphs"


@pytest.mark.parametrize("name", ["glyphs-lora-consistency", "glyphs-guidance-consistency"])
def test_consistency_recipes_resolve(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.method.name == "consistency" and config.method.num_inference_steps == 4
    assert config.teacher.source == "teachers/glyphs-32" and config.data.source == "glyphs"
    if name == "glyphs-lora-consistency":
        assert config.student.lora.rank == 16 and config.student.lora.fuse
    else:
        assert config.method.guidance.w_min <= 2 and config.method.guidance.w_max >= 6
        assert config.method.guidance_steps == 1000  # the guidance round that made the student follow w
