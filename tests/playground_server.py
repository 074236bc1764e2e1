"""The playground's real `serve()` on its own event loop in a thread, on the tiny model.

The browser test and the security test both drive this one server; `stop()` cancels it
the way Ctrl-C does, and `run()` awaits a coroutine on its loop (the store belongs to it).
"""

from __future__ import annotations

import asyncio
import threading

from bot.launch import serve
from bot.ops_settings import OpsSettings
from bot.settings import load_settings

from .fakes.tiny import make_engine


class PlaygroundServer:
    """`serve()` for the local platform on ``port``; ``settings`` override the defaults."""

    def __init__(self, tokenizer, port: int, **settings) -> None:
        self.tokenizer, self.port, self.settings = tokenizer, port, settings
        self.url: str | None = None
        self.runtime = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        settings = load_settings(
            None,
            **{
                "redis_url": "memory://",
                "gesal_playground_port": self.port,
                "gesal_train_interval": 3600,
                **self.settings,
            },
        )

        async def factory(store):
            return make_engine(self.tokenizer, store, threshold=0.9999)

        async def on_ready(runtime, url) -> None:
            self.runtime, self.url = runtime, url
            self.ready.set()

        self.task = self.loop.create_task(
            serve(settings, OpsSettings(), ["local"], engine_factory=factory, ready=on_ready)
        )
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.ready.set()

    def start(self) -> str:
        self.thread.start()
        assert self.ready.wait(60), "the playground did not start"
        if self.error:
            raise self.error
        return self.url  # type: ignore[return-value]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(30)

    def run(self, coro):
        """Await ``coro`` on the server's loop (the store belongs to it)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)
