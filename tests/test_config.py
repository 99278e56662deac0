"""Strict configs: recipe + overrides, types coerced, unknown keys named."""
from dataclasses import dataclass, field

import pytest

from lmforge.config import parse_args
from lmforge.errors import LmforgeError


@dataclass
class Train:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class Cfg:
    model: str | None = None
    tags: list[str] = field(default_factory=list)
    flag: bool = False
    train: Train = field(default_factory=Train)


def test_recipe_plus_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: a\ntrain:\n  lr: 0.1\n  steps: 5\n")
    cfg = parse_args(Cfg, ["--config", str(recipe), "--train.lr", "3e-4", "--flag", "--tags", "x,y"])
    assert cfg.model == "a" and cfg.train.lr == 3e-4 and cfg.train.steps == 5 and cfg.flag and cfg.tags == ["x", "y"]


def test_unknown_keys_are_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(LmforgeError, match="unknown config key 'train.lrr'"):
        parse_args(Cfg, ["--config", str(recipe)])
    with pytest.raises(LmforgeError, match="unknown option '--modle'"):
        parse_args(Cfg, ["--modle", "x"])
    with pytest.raises(LmforgeError, match="'train.steps' expects int"):
        parse_args(Cfg, ["--train.steps", "many"])
