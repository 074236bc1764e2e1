"""Settings that document themselves: each is one dataclass field, declared once.

A field made with `setting` (or ``dataclasses.field(metadata={"help": ...})``, the
convention of PEFT's configs) carries its default and its help, and optionally the
environment variable a deployment sets it with, the command-line flag of ``gesal-bot
eval``, and its range. Everything else is generated from the fields:

* `bot.settings.Settings` gains one validated variable per field that names an
  ``env`` (`env_settings`), and builds the engine's configuration from them (`apply`);
* ``gesal-bot eval`` gains one flag per field that names a ``flag`` (`add_flags`,
  `flag_values`);
* the README's configuration table and ``.env.example`` come from the settings model
  (``scripts/config_reference.py``), whose descriptions are these help texts.

So adding a setting is one field (plus its test), and its default, range and wording
cannot differ between the library, the environment, the command line and the docs.
This module imports nothing heavy: the bot reads its settings before torch is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterator
from dataclasses import MISSING, Field, dataclass
from typing import Any, Literal, get_args, get_origin

BOUNDS = ("ge", "gt", "le", "lt")


@dataclass(frozen=True)
class Setting:
    """What a config field says about itself: its ``metadata`` (see `setting`)."""

    help: str
    env: str | None = None
    flag: str | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    @classmethod
    def of(cls, f: Field) -> Setting | None:
        """The field's `Setting`, or None when it has no help text (an internal field)."""
        m = f.metadata
        if "help" not in m:
            return None
        return cls(m["help"], m.get("env"), m.get("flag"), *(m.get(b) for b in BOUNDS))

    def bounds(self) -> dict[str, float]:
        """The range as pydantic's ``Field`` keywords."""
        return {k: v for k in BOUNDS if (v := getattr(self, k)) is not None}

    def range_text(self) -> str:
        """The range in words for a flag's help: ``0 to 10``, ``above 0, at most 0.1``;
        "" when unbounded."""
        if self.ge is not None and self.le is not None:
            return f"{self.ge:g} to {self.le:g}"
        words = []
        if self.ge is not None or self.gt is not None:
            words.append(f"at least {self.ge:g}" if self.ge is not None else f"above {self.gt:g}")
        if self.le is not None or self.lt is not None:
            words.append(f"at most {self.le:g}" if self.le is not None else f"below {self.lt:g}")
        return ", ".join(words)


def setting(
    default: Any = MISSING,
    *,
    help: str,  # noqa: A002 - argparse's and pydantic's word for it
    default_factory: Any = MISSING,
    env: str | None = None,
    flag: str | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field that documents itself: its default, its ``help`` (one or two
    sentences a user reads in the README and ``--help``), the environment variable
    ``env`` that sets it in a deployment, the ``flag`` of ``gesal-bot eval``, and its
    range (checked where a person sets it: environment and command line)."""
    given = {"env": env, "flag": flag, "ge": ge, "gt": gt, "le": le, "lt": lt}
    meta = {"help": help, **{k: v for k, v in given.items() if v is not None}}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Entry:
    """One documented field, found under a root config: its path of field names from
    the root (``("learning", "lr")``), the field, its `Setting`, and its resolved type."""

    path: tuple[str, ...]
    field: Field
    setting: Setting
    type: Any

    @property
    def default(self) -> Any:
        f = self.field
        return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


def entries(cls: type, path: tuple[str, ...] = ()) -> Iterator[Entry]:
    """Every `setting` of ``cls`` and of the config dataclasses nested in it (fields
    whose type is a dataclass), depth first in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if (s := Setting.of(f)) is not None:
            yield Entry((*path, f.name), f, s, kind)
        elif dataclasses.is_dataclass(kind):
            yield from entries(kind, (*path, f.name))


def apply(config: Any, changes: dict[tuple[str, ...], Any]) -> Any:
    """A copy of ``config`` with the fields at ``changes``' paths replaced (frozen
    dataclasses included; each nested config is rebuilt, so its checks run again)."""
    by_head: dict[str, dict[tuple[str, ...], Any]] = {}
    direct: dict[str, Any] = {}
    for path, value in changes.items():
        if len(path) == 1:
            direct[path[0]] = value
        else:
            by_head.setdefault(path[0], {})[path[1:]] = value
    for head, sub in by_head.items():
        direct[head] = apply(getattr(config, head), sub)
    return dataclasses.replace(config, **direct)


# -- the command line ---------------------------------------------------------------------
def _choices(kind: Any) -> tuple | None:
    return get_args(kind) if get_origin(kind) is Literal else None


def _scalar(kind: Any) -> Any:
    """``float | None`` -> float; other types as they are."""
    if get_origin(kind) not in (typing.Union, types.UnionType):
        return kind
    args = [a for a in get_args(kind) if a is not type(None)]
    return args[0] if len(args) == 1 else kind


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of ``cls`` (nested configs included) that names a ``flag``.
    A bool field that defaults to False is a switch; one that defaults to True is
    turned off by ``--no-<flag>``. Defaults are the library's, shown in ``--help``."""
    for e in entries(cls):
        s = e.setting
        if s.flag is None:
            continue
        kind, dest = _scalar(e.type), "_".join(e.path)
        words = s.help + (f" ({s.range_text()})" if s.range_text() else "")
        if kind is bool:
            parser.add_argument(
                "--no-" + s.flag.removeprefix("--") if e.default else s.flag,
                dest=dest,
                action="store_false" if e.default else "store_true",
                default=e.default,
                help=words,
            )
            continue
        choices = _choices(kind)
        parser.add_argument(
            s.flag,
            dest=dest,
            type=_checked(e) if choices is None else str,
            choices=choices,
            metavar=None if choices else s.flag.removeprefix("--").upper().replace("-", "_"),
            default=e.default,
            help=words,
        )


def _checked(e: Entry):
    """The flag's type: the field's scalar type, with the field's range enforced."""
    kind, s = _scalar(e.type), e.setting

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if isinstance(value, float) and value != value:
            raise argparse.ArgumentTypeError("must be a number")
        bad = (
            (s.ge is not None and value < s.ge)
            or (s.gt is not None and value <= s.gt)
            or (s.le is not None and value > s.le)
            or (s.lt is not None and value >= s.lt)
        )
        if bad:
            raise argparse.ArgumentTypeError(f"{value} is out of range ({s.range_text()})")
        return value

    parse.__name__ = kind.__name__
    return parse


def flag_values(args: argparse.Namespace, cls: type) -> dict[tuple[str, ...], Any]:
    """The values of ``cls``' flags in parsed ``args``, by path, for `apply`."""
    return {
        e.path: getattr(args, "_".join(e.path))
        for e in entries(cls)
        if e.setting.flag is not None and hasattr(args, "_".join(e.path))
    }


# -- the environment ------------------------------------------------------------------------
def env_entries(cls: type) -> list[Entry]:
    """The fields of ``cls`` (nested configs included) that a deployment sets through
    an environment variable."""
    return [e for e in entries(cls) if e.setting.env is not None]


__all__ = [
    "Entry",
    "Setting",
    "add_flags",
    "apply",
    "entries",
    "env_entries",
    "flag_values",
    "setting",
]
