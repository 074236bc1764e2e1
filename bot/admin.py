"""``/gesal`` commands: stats, config, export, import, reset and train, the same on every
platform.

The adapter checks who is an admin from the platform's own data (Discord's computed
permissions, Slack's ``users.info``) and says so in `AdminCommand.is_admin`; a reset
needs a confirmation, which the adapter asks for with buttons and checks again on its
side. Results are words (and files) for the admin, never an exception.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from gesal_core.engine import Engine
from gesal_core.records import ConfigError
from gesal_core.snapshot import SnapshotError

from .messages import BROKEN, MAX_IMPORT_BYTES, AdminCommand, AdminResult, Attachment, explain
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger(__name__)

ADMIN_COMMANDS = ("reset", "export", "import", "stats", "config", "train")
CONFIG_KEYS = ("threshold", "reward_up", "reward_down", "max_nodes")


class AdminCommands:
    """Runs an admin's ``/gesal <name>`` on the engine, after the permission check."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine, self.settings, self.metrics = engine, settings, metrics

    async def handle(self, cmd: AdminCommand) -> AdminResult:
        """Run ``/gesal <name>`` after the permission check; errors come back as text."""
        if cmd.name not in ADMIN_COMMANDS:
            return AdminResult(
                f"Unknown command “{cmd.name}”. Try one of: {', '.join(ADMIN_COMMANDS)}.",
                ok=False,
            )
        if not cmd.is_admin:
            log.info("refused /gesal %s for %s in %s", cmd.name, cmd.user, cmd.key)
            return AdminResult(
                f"Sorry, only admins can use /gesal {cmd.name} "
                f"({self._who_is_admin(cmd.platform)}).",
                ok=False,
            )
        try:
            return await getattr(self, f"_admin_{cmd.name}")(cmd)
        except Exception as exc:  # noqa: BLE001
            kind, words = explain(exc)
            if words == BROKEN:
                log.exception("/gesal %s in %s failed", cmd.name, cmd.key)
            return AdminResult(words, ok=False)

    @staticmethod
    def _who_is_admin(platform: str) -> str:
        if platform == "discord":
            return "members with the Manage Channels permission"
        if platform == "slack":
            return "workspace admins and owners, or users on the bot's allow-list"
        return "admins"

    async def _admin_reset(self, cmd: AdminCommand) -> AdminResult:
        if not cmd.confirmed:
            stats = await self.engine.stats(cmd.key)
            return AdminResult(
                f"This deletes everything this channel has learned ({stats['nodes']} nodes, "
                f"{stats['replies']} replies and their votes). It cannot be undone.",
                needs_confirmation=True,
            )
        await self.engine.reset(cmd.key)
        log.info("channel %s reset by %s", cmd.key, cmd.user)
        return AdminResult("Done: this channel's graph memory has been reset.")

    async def _admin_export(self, cmd: AdminCommand) -> AdminResult:
        from .picture import render_graph_png

        data = await self.engine.export(cmd.key)
        body = Engine.dumps(data).encode("utf-8")
        png = await asyncio.to_thread(render_graph_png, data)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", cmd.key)
        return AdminResult(
            f"Exported {len(data['nodes'])} nodes and {len(data['replies'])} replies.",
            files=[
                Attachment(f"gesal-{stem}.json", body, "application/json"),
                Attachment(f"gesal-{stem}.png", png, "image/png"),
            ],
            data={"nodes": len(data["nodes"]), "replies": len(data["replies"])},
        )

    async def _admin_import(self, cmd: AdminCommand) -> AdminResult:
        if not cmd.file:
            return AdminResult(
                "Attach the JSON file that /gesal export produced to import it.", ok=False
            )
        if len(cmd.file) > MAX_IMPORT_BYTES:
            return AdminResult(
                f"That file is too large to be an export (over {MAX_IMPORT_BYTES >> 20} MB).",
                ok=False,
            )
        try:  # the file itself: its size and nesting are checked before it is parsed
            counts = await self.engine.import_graph(cmd.key, cmd.file)
        except SnapshotError as exc:
            return AdminResult(f"Not imported, nothing was changed: {exc}.", ok=False)
        return AdminResult(
            f"Imported {counts['nodes']} nodes and {counts['replies']} replies; "
            "this channel's previous graph was replaced.",
            data=counts,
        )

    async def _admin_stats(self, cmd: AdminCommand) -> AdminResult:
        s = await self.engine.stats(cmd.key)
        last = s["last_update"]
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(last)) if last else "never trained"
        cfg = s["config"]
        text = (
            f"**Graph of this channel**: {s['nodes']} nodes, {s['prompts']} prompts, "
            f"{s['replies']} replies.\n"
            f"Votes: {s['votes_up']} 👍, {s['votes_down']} 👎, {s['corrections']} corrections; "
            f"{s['pending_feedback']} waiting for training (the channel trains once "
            f"{self.settings.gesal_train_round} replies have feedback, or once it has "
            f"waited {self.settings.gesal_train_max_wait / 3600:g} h).\n"
            f"Updates: {s['updates']} ({s['rollbacks']} rolled back); "
            f"mean reward {s['mean_reward']:+.2f}; last update: {when}.\n"
            f"Settings: threshold {cfg['threshold']}, rewards {cfg['reward_up']:+g}/"
            f"{cfg['reward_down']:+g}, at most {cfg['max_nodes']} nodes."
        )
        if s["train_parked"]:
            text += (
                f"\n**Training is paused** after {s['train_failures']} failed runs in a row "
                f"({s['train_error']}); the feedback is kept. Fix the cause, then "
                "/gesal train retries it; /gesal reset drops it."
            )
        elif s["train_failures"]:
            text += (
                f"\nThe last {s['train_failures']} training run(s) failed "
                f"({s['train_error']}); the feedback is kept for the next one."
            )
        if s["near_caps"]:
            text += "\n**Near a limit**: " + "; ".join(s["near_caps"]) + "."
        return AdminResult(text, data=s)

    async def _admin_config(self, cmd: AdminCommand) -> AdminResult:
        changes: dict[str, str] = {}
        for name, raw in cmd.args.items():
            if raw is None or str(raw).strip() == "":
                continue
            if name not in CONFIG_KEYS:
                return AdminResult(
                    f"Unknown setting “{name}”; settable: {', '.join(CONFIG_KEYS)}.", ok=False
                )
            changes[name] = str(raw).strip()
        if changes:
            # the engine parses and range-checks every value (NaN and infinities too), for
            # every adapter alike; a refused change leaves all settings as they were
            try:
                cfg = await self.engine.configure(cmd.key, **changes)
            except ConfigError as exc:
                return AdminResult(f"Not changed: {exc}.", ok=False)
            head = "Updated."
        else:
            cfg = await self.engine.get_config(cmd.key)
            head = "Current settings."
        return AdminResult(
            f"{head} threshold {cfg.threshold}, reward_up {cfg.reward_up:+g}, "
            f"reward_down {cfg.reward_down:+g}, max_nodes {cfg.max_nodes}.",
            data={
                "threshold": cfg.threshold,
                "reward_up": cfg.reward_up,
                "reward_down": cfg.reward_down,
                "max_nodes": cfg.max_nodes,
            },
        )

    async def _admin_train(self, cmd: AdminCommand) -> AdminResult:
        # an admin's "train now" does not wait for full rounds
        report = await self.engine.train(cmd.key, force=True)
        self.metrics.observe_train(report)
        log.info("training: %s", report.summary())
        if cmd.key in report.failed:
            return AdminResult(
                f"Training failed ({report.failed[cmd.key]}); the feedback is kept, and "
                "the details are in the bot's log.",
                ok=False,
                data={"events": 0, "error": report.failed[cmd.key]},
            )
        return AdminResult(f"Training done: {report.summary()}.", data={"events": report.events})


__all__ = ["ADMIN_COMMANDS", "CONFIG_KEYS", "AdminCommands"]
