"""The one thread that owns the model.

torch work (generation, embedding, training) is queued to a single worker thread, so
the asyncio event loop never blocks on it and the SVF state (which z is merged) is only
ever touched by one thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ModelWorker:
    def __init__(self, name: str = "gesal-model") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._thread_ident: int | None = None
        self.busy = False

    def _wrap(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        self._thread_ident = threading.get_ident()
        self.busy = True
        try:
            return fn(*args, **kwargs)
        finally:
            self.busy = False

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the model thread and await its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: self._wrap(fn, *args, **kwargs))

    def alive(self) -> bool:
        return not self._pool._shutdown  # noqa: SLF001 - no public accessor

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
