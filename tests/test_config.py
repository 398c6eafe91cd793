from pathlib import Path

import pytest

from diffkd.config import dump_config, load_config, parse_config
from diffkd.errors import DiffkdError

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    config = load_config(path)
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config))
    assert load_config(again) == config


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"digits-teacher.yaml", "digits-progressive.yaml"} <= names


def test_overrides_are_typed():
    config = load_config(None, ["train.learning_rate=3e-4", "method.final_steps=2", "train.adam_betas=[0.8, 0.9]"])
    assert config.train.learning_rate == pytest.approx(3e-4)
    assert config.method.final_steps == 2
    assert config.train.adam_betas == (0.8, 0.9)


@pytest.mark.parametrize("data, message", [
    ({"train": {"lerning_rate": 1}}, "unknown config key 'train.lerning_rate'; did you mean 'train.learning_rate'"),
    ({"trian": {}}, "unknown config key 'trian'; did you mean 'train'"),
    ({"train": {"batch_size": "many"}}, "'train.batch_size' must be an integer"),
    ({"train": {"batch_size": 0}}, "train.batch_size must be > 0"),
    ({"train": {"learning_rate": -1}}, "train.learning_rate must be > 0"),
    ({"train": {"batch_size": 2.5}}, "'train.batch_size' must be an integer"),
    ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision must be one of no, fp16, bf16"),
    ({"method": {"name": "magic"}}, "method.name must be one of"),
    ({"method": {"start_steps": 48, "final_steps": 4}}, "power-of-two multiple"),
    ({"method": {"start_steps": 4, "final_steps": 4}}, "must be larger than"),
    ({"method": {"final_steps": 0}}, "method.final_steps must be >= 1"),
    ({"method": {"loss_weighting": "snr_trunk"}}, "method.loss_weighting must be one of"),
    ({"method": {"steps_per_round": 100, "halvings": 2}}, "unknown config key 'method.halvings'"),
    ({"train": {"ema_warmup": True, "ema_power": 0}}, "train.ema_inv_gamma and train.ema_power must be > 0"),
    ({"student": {"architecture": "compact", "init_from": "runs/x/student"}}, "student.init_from starts a full copy"),
    ({"train": "fast"}, "config section 'train' must be a mapping"),
])
def test_bad_config_is_one_clear_error(data, message):
    with pytest.raises(DiffkdError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_config(data)


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(DiffkdError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(DiffkdError, match="not valid YAML"):
        load_config(bad)
