"""The one thread that owns the model, with dynamic batching and idle-time jobs.

torch work (generation, embedding, training) is queued to a single worker thread, so
the asyncio event loop never blocks on it and the SVF state (which z is merged) is only
ever touched by one thread.

Three ways in:

* ``run(fn, ...)``: one job, first come first served.
* ``batch(fn, item, group)``: items of the same ``(fn, group)`` that arrive close together
  are handed to ``fn(items)`` as one list. A drain job is queued after a short wait
  (``max_wait_s``) and takes whatever has piled up *when it starts running*, up to
  ``max_batch``; so requests that arrive while the thread is busy join the next batch.
  Leftovers queue another drain at the tail, behind jobs already waiting (a training step
  is never starved by a stream of chat, and chat waits for at most one job in front).
* ``steps(make, ...)``: a generator job (a training update) advanced one step per turn of
  the queue, so answers that arrive meanwhile run between its steps.
* ``when_idle(job)``: a generator run one ``next()`` at a time, only while nothing else is
  queued (serving pre-merges hot nodes' weights this way, delaying nobody's answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Generator, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchConfig:
    """Dynamic batching: how long to wait for company, and how big a batch may get."""

    max_batch: int = 8
    max_wait_s: float = 0.005

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.max_wait_s < 0:
            raise ValueError("max_wait_s must be >= 0")


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


def _deliver(future: asyncio.Future, result: Any = None, error: BaseException | None = None):
    if future.done():  # the caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _advance(job: Generator[Any, None, Any]) -> tuple[bool, Any]:
    """One step of ``job``: (False, None) while it runs, (True, its result) at the end."""
    try:
        next(job)
    except StopIteration as stop:
        return True, stop.value
    return False, None


class ModelWorker:
    def __init__(self, name: str = "gesal-model", batching: BatchConfig | None = None) -> None:
        self.batching = batching or BatchConfig()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._thread_ident: int | None = None
        self._lock = threading.Lock()
        self._queued = 0  # jobs submitted to the pool and not started yet
        self._pending: dict[Hashable, list[_Pending]] = {}
        self._scheduled: set[Hashable] = set()
        self._idle: deque[Iterator[Any]] = deque()
        self._idle_scheduled = False
        self.busy = False
        self.batch_sizes: list[int] = []  # history, for tests and benchmarks

    # -- plumbing ------------------------------------------------------------------------
    def _submit(self, fn: Callable[..., T], *args: Any) -> Any:
        with self._lock:
            self._queued += 1
        return self._pool.submit(self._wrap, fn, *args)

    def _wrap(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self._lock:
            self._queued -= 1
        self._thread_ident = threading.get_ident()
        self.busy = True
        try:
            return fn(*args, **kwargs)
        finally:
            self.busy = False
            self._maybe_schedule_idle()

    def on_thread(self) -> bool:
        return threading.get_ident() == self._thread_ident

    # -- single jobs ---------------------------------------------------------------------
    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the model thread and await its result."""
        return await asyncio.wrap_future(self._submit(lambda: fn(*args, **kwargs)))

    async def steps(self, make: Callable[..., Generator[Any, None, R]], *args: Any) -> R:
        """Run the generator ``make(*args)`` one ``next()`` per turn of the queue; return
        what it returns.

        Each step is queued at the tail, so jobs that arrived meanwhile (answers) run
        between steps: a long training update delays an answer by one step, not by the
        whole update, and a stream of answers still cannot starve the update.
        """
        job = make(*args)  # a generator: nothing runs until the first next()
        done = False
        try:
            while not done:
                done, value = await self.run(_advance, job)
            return value
        finally:
            if not done:  # the caller was cancelled: close the job on its own thread, after
                with contextlib.suppress(RuntimeError):  # the step that may be running
                    self._submit(job.close)

    # -- dynamic batching ----------------------------------------------------------------
    async def batch(
        self, fn: Callable[[list[Any]], Sequence[R]], item: Any, group: Hashable = None
    ) -> R:
        """Queue ``item`` for ``fn(items) -> results`` (same order); await this item's result.

        Only items with the same ``fn`` and ``group`` share a batch, so ``group`` holds what
        a batch must agree on (for generation: the sampling settings).
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        key = (fn, group)
        with self._lock:
            queue = self._pending.setdefault(key, [])
            queue.append(_Pending(item, future, loop))
            full = len(queue) >= self.batching.max_batch
            schedule = key not in self._scheduled
            if schedule:
                self._scheduled.add(key)
        if schedule:
            if full or self.batching.max_wait_s == 0:
                self._submit(self._drain, fn, key)
            else:
                loop.call_later(self.batching.max_wait_s, self._submit_drain, fn, key)
        return await future

    def _submit_drain(self, fn: Callable[[list[Any]], Sequence[Any]], key: Hashable) -> None:
        try:
            self._submit(self._drain, fn, key)
        except RuntimeError as exc:  # closed while the items waited: fail them, never hang
            with self._lock:
                queue = self._pending.pop(key, [])
                self._scheduled.discard(key)
            for p in queue:
                _deliver(p.future, None, RuntimeError(f"the model worker is closed ({exc})"))

    def _drain(self, fn: Callable[[list[Any]], Sequence[Any]], key: Hashable) -> None:
        """On the model thread: run one batch of what is pending for ``key`` now."""
        with self._lock:
            queue = self._pending.get(key, [])
            taken, rest = queue[: self.batching.max_batch], queue[self.batching.max_batch :]
            if rest:
                self._pending[key] = rest
            else:
                self._pending.pop(key, None)
                self._scheduled.discard(key)
        if rest:  # at the tail: whatever was queued meanwhile goes first
            self._submit(self._drain, fn, key)
        if not taken:
            return
        self.batch_sizes.append(len(taken))
        try:
            results = list(fn([p.item for p in taken]))
            if len(results) != len(taken):
                raise RuntimeError(f"batch function returned {len(results)} for {len(taken)}")
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            for p in taken:
                p.loop.call_soon_threadsafe(_deliver, p.future, None, exc)
            return
        for p, result in zip(taken, results, strict=True):
            p.loop.call_soon_threadsafe(_deliver, p.future, result)

    # -- idle-time jobs --------------------------------------------------------------------
    def when_idle(self, job: Iterator[Any]) -> None:
        """Advance ``job`` (a generator) one step at a time while nothing else is queued."""
        with self._lock:
            self._idle.append(job)
        self._maybe_schedule_idle()

    def _maybe_schedule_idle(self) -> None:
        with self._lock:
            if self._idle_scheduled or not self._idle or self._queued or self._pool._shutdown:  # noqa: SLF001
                return
            self._idle_scheduled = True
        try:
            self._submit(self._idle_step)
        except RuntimeError:  # the pool shut down meanwhile
            with self._lock:
                self._idle_scheduled = False

    def _idle_step(self) -> None:
        with self._lock:
            self._idle_scheduled = False
            if self._queued or not self._idle:  # real work arrived: it goes first
                return
            job = self._idle[0]
        try:
            next(job)
        except StopIteration:
            with self._lock:
                if self._idle and self._idle[0] is job:
                    self._idle.popleft()
        except Exception:  # an idle job must never take the worker down
            log.exception("idle job failed; dropped")
            with self._lock:
                if self._idle and self._idle[0] is job:
                    self._idle.popleft()

    def idle_jobs(self) -> int:
        with self._lock:
            return len(self._idle)

    # -- lifecycle -----------------------------------------------------------------------
    def alive(self) -> bool:
        return not self._pool._shutdown  # noqa: SLF001 - no public accessor

    def close(self) -> None:
        with self._lock:
            self._idle.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
