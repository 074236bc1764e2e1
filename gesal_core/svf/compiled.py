"""An update's forward/backward passes under ``torch.compile`` (opt-in).

Why: with bf16 products, most of an update's time is not its matrix products but the
thousands of small operations between them (norms, rotary embeddings, SiLU, casts) and
autograd's bookkeeping for each (docs/performance.md). Compiling the whole model's
forward, and with it the backward, fuses them: side by side in `bench.update_step`
("compiled" columns) a k=4 update runs 1.37× faster on two CPU cores. Compiling one
decoder layer at a time would be cheaper to compile, but every layer differs in an
integer (its index, its slice of z), so dynamo compiles each anew and hits its
recompile limit.

The price is compile time, paid once per process and batch shape (a pass of one sample
is its own shape: dynamo specialises sizes 0 and 1): minutes on a CPU, less when
inductor's on-disk cache is warm from a previous process. So it is off by default
(`LearningConfig.compile`, ``GESAL_COMPILE_UPDATES``), and `CompiledPasses.warm_up`
pays it before the first real update (`learning.warm_up_compiled`; the bot runs it at
start-up, where a stall makes nobody's answer late).

Only an update's passes with gradients use it, and they then run every row whole (no
shared prompt prefix: `learning.reinforce_steps`); scoring without gradients and serving
stay eager. If compiling fails (no C++ compiler, an unsupported model), the passes fall
back to eager with one warning: the update is the same maths either way.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..paths import cache_dir

log = logging.getLogger(__name__)


class CompiledPasses:
    """``model.forward`` compiled once (lazily), with an eager fallback."""

    def __init__(self, model: nn.Module, backend: str | Callable[..., Any] = "inductor"):
        self._model = model
        self._backend = backend
        self._compiled: Callable[..., Any] | None = None
        self.failed: str = ""  # why compiling failed ("" while it has not)
        self.warmed = False  # `warm_up` has run
        self.calls = 0  # passes that ran compiled

    def __call__(self, **inputs: Any) -> Any:
        """The model's output for ``inputs``, compiled where that works."""
        if self.failed:
            return self._model(**inputs)
        if self._compiled is None:
            # inductor's on-disk cache shortens the next process's compile; under /tmp (its
            # default) a container restart loses it, so it goes where the SVD cache is
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torchinductor"))
            self._compiled = torch.compile(self._model.forward, backend=self._backend, dynamic=True)
        try:
            out = self._compiled(**inputs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means eager instead
            self._give_up(exc)
            return self._model(**inputs)
        self.calls += 1
        return out

    def outcome(self, took: float) -> str:
        """What a warm-up that took ``took`` seconds came to, for people to read."""
        return f"failed, updates run eagerly: {self.failed}" if self.failed else f"{took:.0f} s"

    def _give_up(self, exc: BaseException) -> None:
        # dynamo wraps the compiler's own error; say what the compiler said
        while (inner := exc.__cause__ or getattr(exc, "inner_exception", None)) is not None:
            exc = inner
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        self.failed = f"{type(exc).__name__}: {first_line}"
        log.warning("compiling the update passes failed, running them eagerly: %s", self.failed)

    def warm_up(self, run_pass: Callable[[int], None], sizes: tuple[int, ...] = (2, 1)) -> float:
        """Compile ahead of the first real pass by running ``run_pass(rows)``, a throwaway
        forward and backward through this object, for each batch shape; returns seconds.

        A backward is compiled at its first call, so a compiler failure can surface there,
        in the middle of an update; here it only switches the passes to eager.
        """
        start = time.perf_counter()
        for rows in sizes:
            if self.failed:
                break
            log.info("compiling the update passes for %d-row batches (once per process)", rows)
            try:
                run_pass(rows)
            except Exception as exc:  # noqa: BLE001 - the same maths runs eagerly
                self._give_up(exc)
        self.warmed = True
        took = time.perf_counter() - start
        note = f", failed: eager instead ({self.failed})" if self.failed else ""
        log.info("update passes compiled in %.1f s%s", took, note)
        return took
