"""The packages talk to each other through their public APIs only.

`bot/` reaches the engine through `gesal_core.engine.Engine`'s public methods, never its
store or a private method, so the engine can change how it keeps its records; the
evaluation harness does the same; and the bot never imports the benchmarks, which are
scripts of the source checkout, not part of the installed package.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE_INSIDE = re.compile(r"\bengine\.(store\b|_\w)")
IMPORTS_BENCH = re.compile(r"^\s*(from|import)\s+bench\b", re.M)


def _sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def test_the_bot_and_the_evaluation_use_only_the_engines_public_api():
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in _sources("bot", "gesal_core/evaluation")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if ENGINE_INSIDE.search(line)
    ]
    assert not found, "\n".join(found)


def test_the_bot_never_imports_the_benchmarks():
    found = [
        str(p.relative_to(ROOT)) for p in _sources("bot") if IMPORTS_BENCH.search(p.read_text())
    ]
    assert not found, found
