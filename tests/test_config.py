from dataclasses import dataclass, field

import pytest
import yaml

from robust.config import load_config, save_config, split_cli


@dataclass
class Attack:
    steps: int = 1
    eps: float = 0.1
    norm: str = "l2"


@dataclass
class Run:
    attack: Attack = field(default_factory=Attack)
    name: str = "run"


def test_layers_merge_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("attack:\n  eps: 0.5\n  steps: 2\nname: from_yaml\n")
    cfg = load_config(Run, presets=[{"attack": {"eps": 9.0, "norm": "linf"}}], yaml_path=path,
                      overrides=["attack.steps=3"])
    assert cfg == Run(Attack(steps=3, eps=0.5, norm="linf"), name="from_yaml")
    assert isinstance(cfg, Run) and isinstance(cfg.attack, Attack)


@pytest.mark.parametrize("override, key", [("attack.stepz=3", "attack.stepz"), ("nam=x", "nam"),
                                           ("attack.steps=three", "attack.steps")])
def test_typos_and_wrong_types_name_the_key(override, key):
    with pytest.raises(ValueError, match=f"key '{key}'"):
        load_config(Run, overrides=[override])


def test_missing_yaml_and_bad_cli_argument(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(Run, yaml_path=tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="key=value"):
        split_cli(["attack.steps"])
    assert split_cli(["preset=local", "config=a.yaml", "x.y=1"]) == ("local", "a.yaml", ["x.y=1"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(Run, overrides=["attack.eps=0.25"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert yaml.safe_load(path.read_text())["attack"]["eps"] == 0.25
    assert load_config(Run, yaml_path=path) == cfg
