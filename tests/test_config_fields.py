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


def test_the_engine_settings_are_declared_once(monkeypatch):
    """Every engine setting that names a variable or a flag reaches the environment,
    ``gesal-bot eval`` and the README from its one field: the same default, range and
    words; a value set either way lands in the engine's config."""
    from pathlib import Path

    from bot.settings import Settings, SettingsError, load_settings
    from gesal_core import evaluation
    from gesal_core.config import EngineConfig

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for e in env_entries(EngineConfig):
        var = e.setting.env
        field = Settings.model_fields[var.lower()]
        assert field.default == e.default and field.description.startswith(e.setting.help)
        assert f"| `{var}` |" in readme
        monkeypatch.delenv(var, raising=False)
    assert load_settings(None).engine_config() == EngineConfig()

    monkeypatch.setenv("GESAL_LEARNING_RATE", "0.01")
    monkeypatch.setenv("GESAL_THRESHOLD", "0.4")
    monkeypatch.setenv("GESAL_GUARD_SAMPLED", "true")
    cfg = load_settings(None).engine_config()
    assert (cfg.learning.lr, cfg.channel_defaults.threshold, cfg.guard.sampled) == (0.01, 0.4, True)
    monkeypatch.setenv("GESAL_LEARNING_RATE", "0.5")  # above its bound
    with pytest.raises(SettingsError, match="GESAL_LEARNING_RATE"):
        load_settings(None)

    parser = argparse.ArgumentParser()
    evaluation.add_arguments(parser)
    args = parser.parse_args(["--lr", "0.01", "--round", "2", "--no-guard", "--threshold", "0.4"])
    cfg = apply(EngineConfig(), flag_values(args, EngineConfig))
    assert (cfg.learning.lr, cfg.train_round, cfg.guard.enabled) == (0.01, 2, False)
    assert cfg.channel_defaults.threshold == 0.4
