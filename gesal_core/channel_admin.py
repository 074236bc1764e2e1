"""An admin's changes to a whole channel: its settings, a reset, an export and an
import. Each either changes the channel in one store step or not at all, and then drops
what this process holds about the channel (cached merged weights, fresh downvotes), so
nothing of the old channel answers in the new one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict

from . import snapshot
from .records import ChannelConfig, ChannelMeta
from .store import Store
from .svf import SVFModel


class ChannelAdmin:
    """Settings, reset, export and import of one store's channels. ``forget(channel)``
    drops what the process holds about a channel that was reset or replaced;
    ``model_name()`` names the model in exports (read at each export: the engine's
    name may be set after it is built)."""

    def __init__(
        self,
        store: Store,
        svf: SVFModel,
        model_name: Callable[[], str],
        forget: Callable[[str], Awaitable[None]],
    ) -> None:
        self.store, self.svf, self.model_name = store, svf, model_name
        self.forget = forget

    async def configure(self, channel: str, **changes) -> ChannelConfig:
        """Change some of a channel's settings and return them all. Every value must be
        a finite number in its range (`ChannelConfig`); else `ConfigError`, a
        `GesalError`, names the first bad one and the channel keeps its settings."""
        current = asdict(await self.store.get_config(channel))
        current.update(changes)
        cfg = ChannelConfig.parse(current)
        await self.store.set_config(channel, cfg)
        return cfg

    async def reset(self, channel: str) -> None:
        """Forget the channel's graph, replies, feedback and settings."""
        await self.store.reset(channel)
        await self.forget(channel)

    async def export(self, channel: str) -> dict:
        """A versioned, self-contained JSON-able snapshot of a channel's graph and history
        (`gesal_core.snapshot`).

        Pending (not yet trained) feedback is not part of it; votes on replies are.
        """
        return snapshot.build(
            channel,
            {"name": self.model_name(), "z_size": self.svf.z_size},
            await self.store.get_config(channel),
            await self.store.load_nodes(channel),
            await self.store.list_replies(channel),
            ChannelMeta.from_dict(await self.store.meta(channel)).merged,
        )

    async def import_graph(self, channel: str, data: dict | bytes | str) -> dict:
        """Replace a channel's graph with an export (possibly from another channel).

        ``data``: the export file as bytes or text (its size and nesting are checked
        before it is parsed), or its parsed JSON. Validate, then swap: the whole document
        is checked first and turned into records (`snapshot.parse`, in a thread, so a
        large file does not hold up other channels' answers), then the store replaces the
        channel in one atomic step (`Store.replace`). A refused file raises
        `SnapshotError` (a `GesalError`: one sentence naming the field) and changes nothing.
        """
        config = getattr(self.svf.model, "config", None)
        snap = await asyncio.to_thread(
            snapshot.parse,
            data,
            self.svf.z_size,
            getattr(config, "hidden_size", None),  # prompts embed as mean hidden states
            getattr(config, "vocab_size", None),
            max_replies=getattr(self.store, "max_replies", None),  # the store's retention
        )
        # the merge map travels with the nodes; no other meta field survives an import
        meta = {"merged": snap.merged} if snap.merged else {}
        await self.store.replace(channel, snap.config, snap.nodes, snap.replies, meta)
        # the imported nodes keep their ids and versions: what this process cached under
        # those keys may be another z (an export of a copy trained elsewhere)
        await self.forget(channel)
        return {"nodes": len(snap.nodes), "replies": len(snap.replies)}
