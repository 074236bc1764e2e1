"""Self-documenting settings (`gesal_core.config_fields`): flags and changes generated
from dataclass fields, with their defaults, ranges and help."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from gesal_core.config_fields import add_flags, apply, entries, env_entries, flag_values, setting


@dataclass(frozen=True)
class Inner:
    lr: float = setting(3e-3, help="step size", env="TOY_LR", flag="--lr", gt=0, le=0.1)
    mode: Literal["a", "b"] = setting("a", help="which way", flag="--mode")
    untouched: int = 5  # no setting: neither env nor flag


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    fast: bool = setting(False, help="go fast", flag="--fast")
    guard: bool = setting(True, help="check updates", flag="--guard")
    limit: int | None = setting(None, help="at most", env="TOY_LIMIT", ge=1)


def test_entries_walk_nested_configs_in_order():
    found = [(e.path, e.default) for e in entries(Outer)]
    assert found == [
        (("inner", "lr"), 3e-3),
        (("inner", "mode"), "a"),
        (("fast",), False),
        (("guard",), True),
        (("limit",), None),
    ]
    assert [e.setting.env for e in env_entries(Outer)] == ["TOY_LR", "TOY_LIMIT"]


def test_flags_parse_check_ranges_and_apply():
    p = argparse.ArgumentParser()
    add_flags(p, Outer)
    args = p.parse_args(["--lr", "0.05", "--mode", "b", "--fast", "--no-guard"])
    cfg = apply(Outer(), flag_values(args, Outer))
    assert cfg == Outer(Inner(lr=0.05, mode="b"), fast=True, guard=False)
    assert apply(Outer(), flag_values(p.parse_args([]), Outer)) == Outer()
    for bad in (["--lr", "0.5"], ["--lr", "0"], ["--lr", "nan"], ["--mode", "c"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    text = p.format_help()
    assert "step size (above 0, at most 0.1)" in text and "--no-guard" in text
