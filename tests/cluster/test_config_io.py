"""YAML + dotted overrides: unknown keys and wrong types are errors that name the key."""
import dataclasses
from typing import Optional

import pytest

from cluster.config import RunConfig
from cluster.config_io import (
    ConfigError,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
)


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = 1e-5
    steps: int = 3
    name: Optional[str] = None
    betas: tuple[float, float] = (0.9, 0.95)

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Inner = Inner()
    flag: bool = False
    tuned: Inner = Inner(lr=0.5, steps=9)


def test_partial_section_keeps_the_parents_defaults():
    cfg = load_config(Outer, None, ["tuned.steps=2"])
    assert cfg.tuned == Inner(lr=0.5, steps=2)


def test_yaml_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 2.0e-5\n  steps: 5\nflag: true\n")
    cfg = load_config(Outer, path, ["inner.steps=7", "inner.name=run1", "inner.betas=[0.8, 0.9]"])
    assert cfg == Outer(Inner(lr=2e-5, steps=7, name="run1", betas=(0.8, 0.9)), flag=True, tuned=Outer().tuned)
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_exponent_without_dot_is_a_float():
    # PyYAML (YAML 1.1) reads 3e-4 as the string "3e-4"; a float field takes it as 0.0003.
    assert load_config(Outer, None, ["inner.lr=3e-4"]).inner.lr == 3e-4
    with pytest.raises(ConfigError, match=r"inner\.lr: expected float, got 'fast'"):
        load_config(Outer, None, ["inner.lr=fast"])


def test_int_accepted_for_float_and_null_for_optional():
    assert load_config(Outer, None, ["inner.lr=1", "inner.name=null"]).inner == Inner(lr=1.0, name=None)


@pytest.mark.parametrize("overrides, message", [
    (["inner.lrr=1"], r"unknown key\(s\) inner\.lrr at inner; valid keys: betas, lr, name, steps"),
    (["nope=1"], r"unknown key\(s\) nope at top level"),
    (["inner.steps=3.5"], r"inner\.steps: expected int, got 3\.5"),
    (["inner.steps=true"], r"inner\.steps: expected int"),
    (["flag=3"], r"flag: expected bool"),
    (["inner.steps=-1"], r"inner: steps must be >= 0"),
    (["inner=3"], r"inner: expected a mapping"),
    (["inner.betas=0.9"], r"inner\.betas: expected a list"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, overrides)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["inner.lr"])
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["inner..lr=1"])


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("inner: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: bad YAML"):
        load_config(Outer, path)
    path.write_text("inner:\n  oops: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key\(s\) inner\.oops"):
        load_config(Outer, path)


def test_string_overrides_keep_their_text():
    # YAML would read these as a bool, a float and an int; a str key wants the text.
    cfg = load_config(RunConfig, overrides=["name=off", "out_dir=1e3", "rl.warmup_checkpoint=007"])
    assert (cfg.name, cfg.out_dir, cfg.rl.warmup_checkpoint) == ("off", "1e3", "007")
    cfg = load_config(RunConfig, overrides=["rl.warmup_checkpoint=null", "rl.epochs=3", "learner.lr=3e-4"])
    assert (cfg.rl.warmup_checkpoint, cfg.rl.epochs, cfg.learner.lr) == (None, 3, 3e-4)
