"""Start-up with visible progress: the page is up in a second, the engine follows.

Loading takes tens of seconds the first time (GGUF conversion, SVD of every adapted
matrix, starting Redis). A newcomer staring at a blank terminal assumes it hung, so the
playground serves its page at once and shows each step, with the live tqdm line of the
long ones, until the engine is ready.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Step:
    name: str
    state: str = "pending"  # pending | running | done | failed
    detail: str = ""
    seconds: float | None = None


@dataclass
class BootProgress:
    """What /api/status shows while the engine loads."""

    steps: list[Step] = field(default_factory=list)
    error: str | None = None
    ready: bool = False

    def add(self, name: str) -> Step:
        step = Step(name)
        self.steps.append(step)
        return step

    def as_dict(self) -> dict:
        return {
            "ready": self.ready,
            "error": self.error,
            "steps": [asdict(s) for s in self.steps],
        }


_BAR = re.compile(r"[\r\n]")


class _TqdmTee:
    """Passes writes through to the real stream and remembers the latest progress line.

    tqdm writes to ``sys.stderr`` as it finds it when a bar starts, so swapping the
    stream for the duration of a step lets the page show the bar's current line.
    """

    def __init__(self, stream, on_line: Callable[[str], None]) -> None:
        self._stream, self._on_line = stream, on_line
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            parts = [p.strip() for p in _BAR.split(text) if p.strip()]
            if parts:
                self._on_line(parts[-1][:160])
            return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


StepFn = Callable[[Step], Awaitable[Any]]


async def run_step(progress: BootProgress, name: str, fn: StepFn, echo: bool = True) -> Any:
    """Run one start-up step, recording its state, duration and live progress line."""
    step = progress.add(name)
    step.state = "running"
    if echo:
        print(f"  … {name}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    real = sys.stderr
    sys.stderr = _TqdmTee(real, lambda line: setattr(step, "detail", line))
    try:
        result = await fn(step)
    except BaseException as exc:
        step.state, step.seconds = "failed", round(time.perf_counter() - start, 2)
        step.detail = str(exc) or type(exc).__name__
        progress.error = f"{name} failed: {step.detail}"
        raise
    finally:
        sys.stderr = real
    step.state, step.seconds = "done", round(time.perf_counter() - start, 2)
    if echo:
        extra = f" ({step.detail})" if step.detail else ""
        print(f"  ✓ {name} in {step.seconds:.1f}s{extra}", file=sys.stderr, flush=True)
    return result


def in_thread(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    """Blocking work (torch, subprocesses) off the event loop, so the page stays live."""
    return asyncio.to_thread(fn, *args)


__all__ = ["BootProgress", "Step", "in_thread", "run_step"]
