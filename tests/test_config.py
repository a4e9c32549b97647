"""Typed config: coercion from YAML and flags, errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from cura.config import from_dict, leaf_fields, load_yaml, set_path, to_dict
from cura.errors import CuraError


@dataclass
class Inner:
    r: int = 8
    names: list[str] = field(default_factory=lambda: ["q_proj"])


@dataclass
class Outer:
    lr: float = 1e-3
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    path: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_strings_from_flags_are_coerced():
    cfg = from_dict(
        Outer,
        {"lr": "3e-4", "mode": "b", "flag": "true", "path": "none", "inner": {"r": "16", "names": "a,b"}},
    )
    assert cfg == Outer(lr=3e-4, mode="b", flag=True, path=None, inner=Inner(r=16, names=["a", "b"]))


def test_round_trip_and_leaves():
    cfg = Outer(inner=Inner(r=2))
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert [k for k, _, _ in leaf_fields(Outer)] == ["lr", "mode", "flag", "path", "inner.r", "inner.names"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"lrr": 1}, "unknown config key 'lrr'; did you mean 'lr'?"),
        ({"inner": {"rank": 1}}, "unknown config key 'inner.rank'"),
        ({"inner": {"r": "x"}}, "config key 'inner.r' must be an integer, got 'x'"),
        ({"mode": "c"}, "config key 'mode' must be one of 'a', 'b', got 'c'"),
        ({"flag": "maybe"}, "config key 'flag' must be true or false"),
        ({"lr": True}, "config key 'lr' must be a number"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(CuraError) as info:
        from_dict(Outer, data)
    assert message in str(info.value)


def test_set_path_and_yaml_errors(tmp_path):
    data = {}
    set_path(data, "inner.r", "4")
    assert from_dict(Outer, data).inner.r == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1\ninner: [unclosed\n")
    with pytest.raises(CuraError, match=r"bad.yaml:\d+: not valid YAML"):
        load_yaml(bad)
    with pytest.raises(CuraError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_train_config_validation():
    from cura.train import TrainConfig

    with pytest.raises(CuraError, match="'batch_size' must be at least 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(CuraError, match="'lr' must be a learning rate above 0"):
        TrainConfig(lr=0)
    with pytest.raises(CuraError, match="blocksize"):
        TrainConfig(blocksize=48)
