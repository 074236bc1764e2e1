"""Reliability under failure: channels talk to the bot while its trainer and Redis die.

    python -m bench.reliability [--channels 8] [--seconds 60] [--kills 4] [--restarts 1]

N simulated channels (half Discord, half Slack) send mentions and feedback concurrently
through `bot.service.ChatService`, the way the adapters call it: a mention is answered,
the answer's message ids are linked, one to three members vote on it (some change their
mind, some take the vote back) and a few correct it (``better: ...``). Everything runs on
a real Redis that the script starts itself (`gesal_core.store.embedded`, with its
production settings: AOF ``appendfsync everysec``, so a vote is acknowledged only after
WAITAOF).

Training runs in a separate trainer process (`bot.scheduler.TrainingScheduler` rounds,
forked from a warm process so a new one starts in a fraction of a second; a round is one
reply with feedback unless ``--train-round``). The trainer is SIGKILLed ``--kills``
times during the run, at whatever point of its work it has reached; after the first
kill, the third and so on, the next trainer dies right before its first commit (the
worst moment: every update computed, nothing committed). In the middle (``--restarts``)
redis-server is killed with SIGKILL, stays down ``--down`` seconds (5 by default: longer
than the store's retries, about 3.5 s, so some requests are refused and their users are
told so) and is restarted from its AOF. After the traffic stops, the trainer's rounds get
``--grace`` seconds to reach every channel, a last trainer drains every channel, and the
store is read back and checked:

* **lost**: a vote or a correction acknowledged to its user (the last one of that user on
  that reply) that is not in the store, a voted reply whose final verdict was not learnt
  (its ``counted`` differs from the reward of its votes), and feedback events that left
  the stream without being trained or are still pending;
* **applied twice**: a reply counted more than once in its node's statistics (``rated``
  above the replies with a counted verdict) and feedback events committed more than once
  (the channel's ``trained_events`` above the entries its stream ever received);
* **inconsistent nodes**: ``reward_sum`` different from the sum of its replies' counted
  verdicts, or a z version that differs from the updates committed;
* **channels trained**: channels whose feedback the trainer's rounds committed, before
  the final drain.

Target: 0 lost, 0 applied twice, no inconsistent node, every channel trained; the script
exits with 1 when it is missed (and keeps its work folder, with the logs, for a look;
``--keep`` keeps it in any case).

By default both processes run the tiny random Llama and tokenizer that the tests build
(`tests/conftest.py`, so pytest must be importable): the bench measures the bookkeeping,
not the model. ``--model bundled`` (or a model name) runs the real model instead, much
more slowly. The guard is off unless ``--guard``; the trainer lock's lease (``--lock-ttl``)
and the idle time before a dead trainer's events are claimed (``--claim-ms``) are short,
so a killed trainer's work is taken over within seconds, not the production 30 s. The
mention rate limits are lifted: refusals here come from failures only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import queue
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.common import PROMPTS

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench.reliability")
WORKSPACE = "bench"
PLATFORMS = ("discord", "slack")
EMOJI = {"discord": {1: "\U0001f44d", -1: "\U0001f44e"}, "slack": {1: "+1", -1: "-1"}}
VOTERS = 40  # members per channel who react
ASKERS = 30
NO_LIMIT = 1_000_000  # mentions per minute: the rate limits never refuse here
UNKNOWN = "unknown"  # a refused vote may or may not have landed
# the options a result file records
SETTINGS = ("kills", "restarts", "down", "pause", "tokens", "train_round", "lock_ttl",
            "claim_ms", "grace", "guard", "seed", "threads")  # fmt: skip
QUESTIONS = PROMPTS[:12]  # the generation benchmarks' community questions
BETTER = [
    "Paris is the capital of France.",
    "Sure, here is a short answer!",
    "hello world how are you today",
    "the quick brown fox jumps over the lazy dog",
]


# -- the model, the engine, the settings (both processes) -----------------------------------
def build_model(name: str):
    """(SVF model, tokenizer, name): the tests' tiny random Llama, or a real model."""
    from gesal_core.svf import SVFConfig, SVFModel

    if name == "tiny":
        from tests.conftest import make_tiny_llama, make_tiny_tokenizer

        tok = make_tiny_tokenizer()  # deterministic: every process builds the same
        return SVFModel(make_tiny_llama(len(tok)), "tiny", SVFConfig(progress=False)), tok, name
    from gesal_core.model import load_model

    lm = load_model(None if name == "bundled" else name, progress=False)
    return SVFModel(lm.model, lm.name, SVFConfig(progress=False)), lm.tokenizer, lm.name


def settings_for(args):
    from bot.settings import load_settings

    return load_settings(
        None,
        gesal_train_round=args.train_round,
        gesal_rate_user=NO_LIMIT,
        gesal_rate_channel=NO_LIMIT,
    )


def build_engine(args, url: str):
    """The production engine configuration, with the bench's model, answer length, guard
    switch and trainer lease, on a `RedisStore` at ``url``."""
    from gesal_core.engine import Engine
    from gesal_core.store.redis_store import RedisStore

    settings = settings_for(args)
    base = settings.engine_config()
    cfg = replace(
        base,
        sampling=replace(base.sampling, max_new_tokens=args.tokens),
        guard=replace(base.guard, enabled=args.guard),
        train_lock_ttl=args.lock_ttl,
    )
    svf, tok, name = build_model(args.model)
    store = RedisStore(url, settings.channel_defaults(), claim_idle_ms=args.claim_ms)
    return Engine(svf, tok, store, cfg, model_name=name), settings


# -- the trainer process ----------------------------------------------------------------------
async def trainer(args, mode: str) -> int:
    """One trainer: ``loop`` scheduler rounds until killed; ``crash`` the same, but it
    SIGKILLs itself right before its first commit of feedback; ``drain`` train every
    channel (full rounds or not) until nothing is pending anywhere."""
    import torch

    from bot.scheduler import TrainingScheduler

    torch.set_num_threads(1)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s trainer {os.getpid()} {mode} %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    engine, settings = build_engine(args, args.zygote)
    store = engine.store
    if mode == "crash":
        commit = store.commit

        async def die_before_commit(channel, updates, event_ids):
            if event_ids:
                print(json.dumps({"dying": len(event_ids)}), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            await commit(channel, updates, event_ids)

        store.commit = die_before_commit
    if mode == "drain":
        deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < deadline:
            try:
                report = await engine.train(force=True)
                left = sum([await store.pending_count(c) for c in await store.channels()])
            except Exception as exc:  # noqa: BLE001 - report, and try again
                print(json.dumps({"drain_error": str(exc)}), flush=True)
                await asyncio.sleep(0.5)
                continue
            print(json.dumps({"drained": report.events, "left": left}), flush=True)
            if left == 0:
                return 0
            await asyncio.sleep(0.2)
        return 1
    scheduler = TrainingScheduler(engine, settings)
    while True:
        report = await scheduler.run_once()  # never raises: a failed run is logged
        if report is not None and report.events:
            line = {"events": report.events, "updated": report.count("updated")}
            print(json.dumps(line), flush=True)
        await asyncio.sleep(0.05)


def zygote(args) -> int:
    """Import torch, transformers and the engine once, then fork a trainer per command.

    Commands on stdin: a mode (prints ``pid N``); ``poll N`` (prints ``exit N CODE``,
    CODE negative for a signal, or ``running N``). No model work happens before a fork,
    and torch has no thread pool yet, so the forks are safe.
    """
    import tokenizers  # noqa: F401
    import torch

    # transformers imports its model classes lazily, seconds each: here, once
    from transformers import (  # noqa: F401
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    import bot.scheduler  # noqa: F401
    import bot.settings  # noqa: F401
    import gesal_core.engine  # noqa: F401
    import gesal_core.model  # noqa: F401
    import gesal_core.store.redis_store  # noqa: F401
    import tests.conftest  # noqa: F401

    torch.set_num_threads(1)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "poll":
            pid, status = os.waitpid(int(cmd[1]), os.WNOHANG)
            if pid == 0:
                print(f"running {cmd[1]}", flush=True)
            else:
                print(f"exit {cmd[1]} {os.waitstatus_to_exitcode(status)}", flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            try:
                code = asyncio.run(trainer(args, cmd[0]))
            except BaseException:  # noqa: BLE001 - the parent sees the exit code
                import traceback

                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            os._exit(code)
        print(f"pid {pid}", flush=True)
    return 0


class Trainers:
    """The bench's side of the zygote: start trainers, kill them, see how they ended."""

    def __init__(self, args, url: str, log_path: Path) -> None:
        cmd = [sys.executable, "-m", "bench.reliability", "--zygote", url, *forwarded(args)]
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self.replies: queue.Queue[str] = queue.Queue()
        self.reports: list[dict] = []  # what the trainers printed, one dict a line
        self.live: set[int] = set()  # trainers started and not yet seen to end
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def ready(self) -> None:
        """Wait until the zygote has imported everything (it starts while the service
        builds its engine)."""
        self._expect("ready", timeout=300)

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                self.reports.append(json.loads(line))
            elif line:
                self.replies.put(line)
        self.replies.put("")  # the zygote is gone

    def _expect(self, prefix: str, timeout: float = 60) -> str:
        line = self.replies.get(timeout=timeout)
        if not line.startswith(prefix):
            raise RuntimeError(f"trainer zygote said {line!r}, expected {prefix!r}")
        return line

    def spawn(self, mode: str) -> int:
        self.proc.stdin.write(mode + "\n")
        pid = int(self._expect("pid ").split()[1])
        self.live.add(pid)
        return pid

    def poll(self, pid: int) -> int | None:
        """The trainer's exit code (negative: killed by that signal), or None if it runs."""
        self.proc.stdin.write(f"poll {pid}\n")
        line = self.replies.get(timeout=60)
        if line.startswith("running "):
            return None
        if line.startswith(f"exit {pid} "):
            self.live.discard(pid)
            return int(line.split()[2])
        raise RuntimeError(f"trainer zygote said {line!r}")

    def wait(self, pid: int, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while (code := self.poll(pid)) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return code

    def kill(self, pid: int) -> int | None:
        with contextlib.suppress(ProcessLookupError):  # it ended by itself: poll reaps it
            os.kill(pid, signal.SIGKILL)
        return self.wait(pid, 30)

    def close(self) -> None:
        """Kill the trainers still running (a run cut short), then end the zygote."""
        for pid in list(self.live):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def forwarded(args) -> list[str]:
    """The options a trainer needs to build the same engine as the service."""
    out = ["--model", args.model, "--tokens", str(args.tokens)]
    out += ["--train-round", str(args.train_round), "--lock-ttl", str(args.lock_ttl)]
    out += ["--claim-ms", str(args.claim_ms), "--drain-timeout", str(args.drain_timeout)]
    return out + (["--guard"] if args.guard else [])


# -- the traffic --------------------------------------------------------------------------------
@dataclass
class Tally:
    """What the members saw, and what the store must hold afterwards."""

    mentions: Counter = field(default_factory=Counter)  # kind -> count
    refusals: Counter = field(default_factory=Counter)  # (kind, words) -> count
    latencies: list[float] = field(default_factory=list)  # answered mentions, seconds
    votes_acked: int = 0
    votes_refused: Counter = field(default_factory=Counter)  # words -> count
    votes_ignored: Counter = field(default_factory=Counter)  # why -> count
    corrections_acked: int = 0
    corrections_refused: Counter = field(default_factory=Counter)
    # (channel, reply id, user) -> the vote the store must hold (None: none), or UNKNOWN
    expected: dict[tuple[str, str, str], object] = field(default_factory=dict)
    corrections: list[tuple[str, str, str, str]] = field(default_factory=list)
    answers: list[tuple[str, str]] = field(default_factory=list)  # (channel, reply id)


class Traffic:
    def __init__(self, service, args, tally: Tally) -> None:
        self.service, self.args, self.tally = service, args, tally
        self.feedback: list[asyncio.Task] = []

    async def channel(self, i: int, deadline: float, rng: random.Random) -> None:
        from bot.messages import Mention

        platform, name = PLATFORMS[i % 2], f"c{i}"
        n = 0
        while time.monotonic() < deadline:
            n += 1
            m = Mention(
                platform, WORKSPACE, name, f"asker{rng.randrange(ASKERS)}", rng.choice(QUESTIONS),
                f"q{n}",
            )  # fmt: skip
            start = time.perf_counter()
            parts = await self.service.handle_mention(m)
            seconds = time.perf_counter() - start
            self.tally.mentions[parts.kind] += 1
            if parts.ok:
                self.tally.latencies.append(seconds)
                self.tally.answers.append((m.key, parts.reply_id))
                ids = [f"a{n}.{k}" for k in range(len(parts.chunks))]
                await self.service.link_reply(parts, ids)
                member_rng = random.Random(rng.random())
                self.feedback.append(
                    asyncio.create_task(self.react(m, parts.reply_id, ids[0], member_rng))
                )
            else:
                self.tally.refusals[(parts.kind, parts.chunks[0])] += 1
            await asyncio.sleep(rng.uniform(0, self.args.pause))

    async def react(self, m, reply_id: str, message_id: str, rng: random.Random) -> None:
        """One to three members vote on an answer; some later change or retract their
        vote; one in ten answers is also corrected."""
        await asyncio.sleep(rng.uniform(0, 1.5))
        voters = rng.sample(range(VOTERS), rng.randint(1, 3))
        jobs = [self.member(m, reply_id, message_id, f"voter{v}", rng) for v in voters]
        if rng.random() < 0.1:
            jobs.append(self.correct(m, reply_id, message_id, f"voter{voters[0]}", rng))
        await asyncio.gather(*jobs)

    async def member(self, m, reply_id, message_id, user, rng: random.Random) -> None:
        value = 1 if rng.random() < 0.6 else -1
        await self.vote(m, reply_id, message_id, user, value, True)
        then = rng.random()
        if then < 0.25:
            await asyncio.sleep(rng.uniform(0.2, 2.0))
            if then < 0.15:  # changes their mind: the new reaction replaces the vote
                await self.vote(m, reply_id, message_id, user, -value, True)
            else:  # takes the reaction away
                await self.vote(m, reply_id, message_id, user, value, False)

    async def vote(self, m, reply_id, message_id, user, value: int, added: bool) -> None:
        from bot.messages import Reaction

        emoji = EMOJI[m.platform][value]
        r = Reaction(m.platform, WORKSPACE, m.channel, user, message_id, emoji, added)
        result = await self.service.handle_reaction(r)
        key = (m.key, reply_id, user)
        if result.counted:
            self.tally.votes_acked += 1
            self.tally.expected[key] = value if added else None
        elif result.status == "error":  # the member is told it failed
            self.tally.votes_refused[result.message] += 1
            self.tally.expected[key] = UNKNOWN
        else:  # nothing was written
            self.tally.votes_ignored[result.message] += 1

    async def correct(self, m, reply_id, message_id, user, rng: random.Random) -> None:
        from bot.messages import Correction

        await asyncio.sleep(rng.uniform(0, 1.0))
        text = rng.choice(BETTER)
        c = Correction(
            m.platform, WORKSPACE, m.channel, user, f"fix-{message_id}", message_id,
            f"better: {text}",
        )  # fmt: skip
        result = await self.service.handle_correction(c)
        if result.counted:
            self.tally.corrections_acked += 1
            self.tally.corrections.append((m.key, reply_id, user, text))
        elif result.status == "error":
            self.tally.corrections_refused[result.message] += 1


# -- the chaos ----------------------------------------------------------------------------------
@dataclass
class Chaos:
    start: float = field(default_factory=time.monotonic)
    kills: int = 0  # trainers SIGKILLed by the bench, at whatever they were doing
    deaths_before_commit: int = 0  # trainers that died right before their commit
    redis_kills: int = 0
    redis_down_s: list[float] = field(default_factory=list)
    worker: int | None = None  # the running trainer
    timeline: list[tuple[float, str]] = field(default_factory=list)  # (s since start, what)

    def log(self, what: str) -> None:
        """Note an event in the timeline and in the service's log, between its errors."""
        self.timeline.append((round(time.monotonic() - self.start, 2), what))
        log.warning("chaos: %s", what)


async def until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.monotonic()))


async def kill_trainers(trainers: Trainers, chaos: Chaos, args) -> None:
    """SIGKILL the running trainer at ``args.kills`` moments spread over the run (never at
    the Redis restart); after every other kill, a new trainer first dies right before its
    commit. A new trainer takes over at once each time."""
    run = asyncio.to_thread

    async def spawn(mode: str) -> int:
        pid = await run(trainers.spawn, mode)
        chaos.log(f"trainer {pid} started ({mode})")
        return pid

    chaos.worker = await spawn("loop")
    k = args.kills
    for j in range(k):
        await until(chaos.start + args.seconds * (2 * j + 1) / (2 * k + 1))
        await run(trainers.kill, chaos.worker)
        chaos.kills += 1
        chaos.log(f"trainer {chaos.worker} SIGKILLed")
        if j % 2 == 0:
            pid = await spawn("crash")
            # a real model takes a new trainer far longer to load than the tiny one
            patience = 4 * args.lock_ttl + (4.0 if args.model == "tiny" else 90.0)
            code = await run(trainers.wait, pid, patience)
            if code == -signal.SIGKILL:
                chaos.deaths_before_commit += 1
                chaos.log(f"trainer {pid} died right before its commit")
            elif code is None:  # found nothing to commit in time: killed where it was
                await run(trainers.kill, pid)
                chaos.kills += 1
                chaos.log(f"trainer {pid} SIGKILLed (it had not reached a commit)")
            else:
                chaos.log(f"trainer {pid} exited with {code}")
        chaos.worker = await spawn("loop")


async def restart_redis(box: dict, chaos: Chaos, args) -> None:
    """kill -9 redis-server ``args.restarts`` times, each down ``args.down`` seconds, and
    restart it from its AOF in the same folder (the same socket)."""
    from gesal_core.store.embedded import start_embedded

    for j in range(args.restarts):
        await until(chaos.start + args.seconds * (j + 1) / (args.restarts + 1))
        t0 = time.monotonic()
        await asyncio.to_thread(box["server"].kill)
        chaos.redis_kills += 1
        chaos.log("redis-server killed -9")
        await asyncio.sleep(args.down)
        box["server"] = await asyncio.to_thread(start_embedded, box["dir"])
        chaos.redis_down_s.append(time.monotonic() - t0)
        chaos.log("redis-server restarted from its AOF")


async def watch_training(store, chaos: Chaos, keys: list[str], first: dict[str, float]) -> None:
    """Note when each channel's feedback is first committed (``trained_events`` > 0)."""
    from gesal_core.records import ChannelMeta

    while len(first) < len(keys):
        for ch in keys:
            if ch in first:
                continue
            try:
                if ChannelMeta.from_dict(await store.meta(ch)).trained_events > 0:
                    first[ch] = time.monotonic() - chaos.start
            except Exception:  # noqa: BLE001 - Redis is down for a moment: look again
                pass
        await asyncio.sleep(0.5)


# -- the checks ---------------------------------------------------------------------------------
@dataclass
class Audit:
    lost_votes: int = 0
    lost_corrections: int = 0
    not_learnt: int = 0  # voted replies whose final verdict is not the counted one
    events_pending: int = 0
    events_vanished: int = 0  # left the stream untrained
    counted_twice: int = 0  # replies in rated beyond those with a counted verdict
    events_twice: int = 0  # committed beyond the stream's entries
    inconsistent_nodes: list[str] = field(default_factory=list)
    unverifiable: int = 0  # (reply, user) pairs whose last vote was refused
    # answers posted whose reply record is gone: a reply is stored without waiting for
    # the fsync, so the last second before a Redis crash can lose it; votes on it are
    # then ignored ("not one of my replies"), never acknowledged and lost
    answers_unrecorded: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return (
            self.lost_votes
            + self.lost_corrections
            + self.not_learnt
            + self.events_pending
            + self.events_vanished
        )

    @property
    def twice(self) -> int:
        return self.counted_twice + self.events_twice

    def note(self, what: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(what)


def owner(merged: dict[str, str], node_id: str) -> str:
    """The node a reply's feedback goes to: its own, or the one it was folded into."""
    seen = set()
    while node_id in merged and node_id not in seen:
        seen.add(node_id)
        node_id = merged[node_id]
    return node_id


async def audit(store, client, tally: Tally, channels: list[str]) -> tuple[Audit, dict]:
    from gesal_core.engine import reply_reward
    from gesal_core.records import ChannelMeta
    from gesal_core.store.layout import Keys

    a = Audit()
    totals = Counter()
    replies: dict[tuple[str, str], object] = {}
    for ch in channels:
        cfg = await store.get_config(ch)
        meta = ChannelMeta.from_dict(await store.meta(ch))
        merged = meta.merged
        stored = await store.list_replies(ch)
        for r in stored:
            replies[(ch, r.reply_id)] = r
            reward = reply_reward(r.votes, cfg)
            if reward is not None and (r.counted is None or abs(r.counted - reward) > 1e-9):
                a.not_learnt += 1
                a.note(f"{ch} reply {r.reply_id}: votes {r.votes} counted {r.counted}")
        for node in await store.load_nodes(ch):
            mine = [r for r in stored if owner(merged, r.node_id) == node.node_id]
            counted = [r.counted for r in mine if r.counted is not None]
            totals["updates"] += node.updates
            totals["skipped"] += node.skipped
            totals["rollbacks"] += node.rollbacks
            totals["nodes"] += 1
            if node.rated > len(counted):
                a.counted_twice += node.rated - len(counted)
                a.note(f"{ch} node {node.node_id}: rated {node.rated}, {len(counted)} counted")
            problems = []
            if node.rated < len(counted):
                problems.append(f"rated {node.rated} < {len(counted)} counted replies")
            if abs(node.reward_sum - math.fsum(counted)) > 1e-6:
                problems.append(f"reward_sum {node.reward_sum} != {math.fsum(counted)}")
            if node.version != node.updates:
                problems.append(f"version {node.version} != updates {node.updates}")
            if problems:
                a.inconsistent_nodes.append(f"{ch} node {node.node_id}: {'; '.join(problems)}")
        trained = meta.trained_events
        pending = await store.pending_count(ch)
        feedback = Keys(ch).feedback
        added = 0  # entries the stream ever received (acknowledged ones are deleted)
        if client.exists(feedback):
            added = int(client.xinfo_stream(feedback)["entries-added"])
        totals["events_trained"] += trained
        totals["events_added"] += added
        a.events_pending += pending
        if trained + pending > added:
            a.events_twice += trained + pending - added
            a.note(f"{ch}: {trained} events trained + {pending} pending, {added} ever added")
        elif trained + pending < added:
            a.events_vanished += added - trained - pending
            a.note(f"{ch}: {trained} events trained + {pending} pending, {added} ever added")
    for (ch, rid, user), want in tally.expected.items():
        if want == UNKNOWN:
            a.unverifiable += 1
            continue
        r = replies.get((ch, rid))
        have = None if r is None else r.votes.get(user)
        if have != want:
            a.lost_votes += 1
            a.note(f"{ch} reply {rid}: {user}'s acknowledged vote {want}, stored {have}")
    a.answers_unrecorded = sum(1 for key in tally.answers if key not in replies)
    for ch, rid, user, text in tally.corrections:
        r = replies.get((ch, rid))
        found = r is not None and any(
            c.get("user") == user and c.get("text") == text for c in r.corrections
        )
        if not found:
            a.lost_corrections += 1
            a.note(f"{ch} reply {rid}: {user}'s acknowledged correction is missing")
    return a, dict(totals)


# -- the run ------------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


async def bench(args, box: dict, trainers: Trainers) -> dict:
    from bot.service import ChatService

    engine, settings = build_engine(args, box["server"].url)
    service = ChatService(engine, settings)  # no scheduler: the trainer process trains
    tally = Tally()
    keys = [f"{PLATFORMS[i % 2]}:{WORKSPACE}:c{i}" for i in range(args.channels)]
    first: dict[str, float] = {}  # channel -> seconds into the run of its first commit
    try:
        await asyncio.to_thread(trainers.ready)
        traffic = Traffic(service, args, tally)
        rng = random.Random(args.seed)
        chaos = Chaos()
        deadline = chaos.start + args.seconds
        killer = asyncio.create_task(kill_trainers(trainers, chaos, args))
        restarter = asyncio.create_task(restart_redis(box, chaos, args))
        watcher = asyncio.create_task(watch_training(engine.store, chaos, keys, first))
        channels = [
            asyncio.create_task(traffic.channel(i, deadline, random.Random(rng.random())))
            for i in range(args.channels)
        ]
        await asyncio.gather(*channels)
        await asyncio.gather(*traffic.feedback)
        traffic_s = time.monotonic() - chaos.start
        await asyncio.gather(killer, restarter)
        # the trainer's own rounds get a grace period to reach a channel whose feedback
        # came last; the drain below trains whatever is left, which does not count here
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watcher, args.grace)
        await asyncio.to_thread(trainers.kill, chaos.worker)  # the drain takes over
        chaos.log(f"trainer {chaos.worker} stopped (SIGKILL) for the final drain")
        t0 = time.monotonic()
        pid = await asyncio.to_thread(trainers.spawn, "drain")
        drained = await asyncio.to_thread(trainers.wait, pid, args.drain_timeout + 30)
        drain_s = time.monotonic() - t0
        chaos.log(f"drain {'finished' if drained == 0 else f'ended with {drained}'}")
        result, totals = await audit(engine.store, box["server"].client(), tally, keys)
    finally:
        engine.close()
        await service.close()
        await engine.store.close()
    return {
        "tally": tally,
        "chaos": chaos,
        "audit": result,
        "totals": totals,
        "first": first,
        "drained": drained,
        "traffic_s": traffic_s,
        "drain_s": drain_s,
        "trainer_runs": len([r for r in trainers.reports if "events" in r]),
    }


def summarise(args, out: dict, redis_version: str) -> tuple[list[dict], bool, list[str]]:
    """The printed lines, the result rows, and whether the target is met."""
    t: Tally = out["tally"]
    c: Chaos = out["chaos"]
    a: Audit = out["audit"]
    totals, first = out["totals"], out["first"]
    trained = len(first)
    answered = t.mentions["answer"]
    refused = sum(n for k, n in t.mentions.items() if k != "answer")
    p50, p99 = percentile(t.latencies, 50), percentile(t.latencies, 99)
    slowest = max(t.latencies, default=float("nan"))
    lines = [
        f"{args.channels} channels, {out['traffic_s']:.0f} s of traffic through ChatService; "
        f"model: {args.model}"
        + (" (the tests' tiny random Llama: this measures the bookkeeping, not the model)"
           if args.model == "tiny" else ""),
        f"Redis: embedded redis-server {redis_version}, AOF appendfsync everysec; "
        f"killed -9 {c.redis_kills} time(s), down "
        + ", ".join(f"{s:.1f} s" for s in c.redis_down_s)
        + ", restarted from its AOF",
        f"trainer: {c.kills} SIGKILL(s) at random points, {c.deaths_before_commit} death(s) "
        f"right before a commit; {out['trainer_runs']} training runs reported",
        f"mentions: {answered} answered, {refused} refused",
    ]  # fmt: skip
    for (kind, words), n in sorted(t.refusals.items()):
        lines.append(f"  refused ({kind}) x{n}: {words}")
    lines.append(
        f"votes: {t.votes_acked} acknowledged, {sum(t.votes_refused.values())} refused "
        f"(the member was told), {sum(t.votes_ignored.values())} ignored"
    )
    for words, n in sorted(t.votes_refused.items()):
        lines.append(f"  refused x{n}: {words}")
    for why, n in sorted(t.votes_ignored.items()):
        lines.append(f"  ignored x{n}: {why}")
    lines.append(
        f"corrections: {t.corrections_acked} acknowledged, "
        f"{sum(t.corrections_refused.values())} refused"
    )
    lines += [
        f"lost: {a.lost} (votes {a.lost_votes}, corrections {a.lost_corrections}, verdicts "
        f"not learnt {a.not_learnt}, events pending {a.events_pending}, events gone "
        f"untrained {a.events_vanished}); {a.unverifiable} (reply, member) pairs whose "
        "last vote was refused are not checked",
        f"applied twice: {a.twice} (replies counted twice {a.counted_twice}, events "
        f"committed twice {a.events_twice})",
        f"inconsistent nodes: {len(a.inconsistent_nodes)}; answers whose reply record did "
        f"not survive the Redis restart: {a.answers_unrecorded}",
        f"updates committed: {totals.get('updates', 0)} ({totals.get('skipped', 0)} skipped, "
        f"{totals.get('rollbacks', 0)} rolled back) over {totals.get('nodes', 0)} nodes; "
        f"{totals.get('events_trained', 0)} feedback events trained",
        f"channels trained by the trainer's rounds: {trained}/{args.channels}"
        + (
            f", first commits {min(first.values()):.1f} to {max(first.values()):.1f} s in"
            if first
            else ""
        )
        + "; final drain "
        + ("finished" if out["drained"] == 0 else f"did not finish (exit {out['drained']})")
        + f" in {out['drain_s']:.1f} s",
        f"mention latency (answered mentions): p50 {1000 * p50:.0f} ms, p99 {1000 * p99:.0f} "
        f"ms, max {1000 * slowest:.0f} ms ({os.cpu_count()} CPU cores shared with other work: "
        "noisy)",
    ]
    lines += [f"  {x}" for x in a.inconsistent_nodes[:20]]
    lines += [f"  {x}" for x in a.examples]
    met = (
        a.lost == 0
        and a.twice == 0
        and not a.inconsistent_nodes
        and trained == args.channels
        and out["drained"] == 0
    )
    lines.append(
        "target (0 lost, 0 applied twice, every channel trained): " + ("met" if met else "MISSED")
    )
    rows = [
        {"figure": "mentions answered", "value": answered},
        {"figure": "mentions refused", "value": refused},
        {"figure": "votes acknowledged", "value": t.votes_acked},
        {"figure": "votes refused", "value": sum(t.votes_refused.values())},
        {"figure": "votes ignored", "value": sum(t.votes_ignored.values())},
        {"figure": "corrections acknowledged", "value": t.corrections_acked},
        {"figure": "lost", "value": a.lost},
        {"figure": "applied twice", "value": a.twice},
        {"figure": "inconsistent nodes", "value": len(a.inconsistent_nodes)},
        {"figure": "answers unrecorded", "value": a.answers_unrecorded},
        {"figure": "updates committed", "value": totals.get("updates", 0)},
        {"figure": "feedback events trained", "value": totals.get("events_trained", 0)},
        {"figure": "channels trained", "value": trained},
        {"figure": "channels", "value": args.channels},
        {"figure": "trainer SIGKILLs", "value": c.kills},
        {"figure": "trainer deaths before commit", "value": c.deaths_before_commit},
        {"figure": "redis kill -9 and restarts", "value": c.redis_kills},
        {"figure": "mention p50 ms", "value": round(1000 * p50, 1)},
        {"figure": "mention p99 ms", "value": round(1000 * p99, 1)},
        {"figure": "mention max ms", "value": round(1000 * slowest, 1)},
    ]
    return rows, met, lines


def parse(argv: list[str] | None) -> argparse.Namespace:
    from bench.common import base_args

    ap = base_args(__doc__, repeats=1)
    model = ap._option_string_actions["--model"]
    model.help = "tiny (default: the tests' random Llama), bundled, or a model name"
    ap.set_defaults(model="tiny")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0, help="traffic time")
    ap.add_argument("--kills", type=int, default=4, help="trainer SIGKILLs during the run")
    ap.add_argument("--restarts", type=int, default=1, help="redis kill -9 and restarts")
    ap.add_argument("--down", type=float, default=5.0, help="seconds Redis stays down")
    ap.add_argument("--pause", type=float, default=0.5, help="most seconds between mentions")
    ap.add_argument("--tokens", type=int, default=8, help="answer length in tokens")
    ap.add_argument("--train-round", type=int, default=1, help="GESAL_TRAIN_ROUND")
    ap.add_argument("--lock-ttl", type=float, default=2.0, help="trainer lock lease, s")
    ap.add_argument("--claim-ms", type=int, default=1000, help="idle ms before a claim")
    ap.add_argument("--drain-timeout", type=float, default=120.0)
    ap.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds after the traffic for the trainer's rounds to reach every channel",
    )
    ap.add_argument("--guard", action="store_true", help="check updates with the guard")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the logs and the Redis data")
    ap.add_argument("--zygote", metavar="URL", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:  # a smoke run: a few channels, one of each failure
        args.channels, args.seconds, args.kills = min(args.channels, 3), 15.0, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.zygote:
        return zygote(args)
    from bench.common import apply_threads, report
    from gesal_core.store.embedded import start_embedded

    apply_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="gesal-reliability-"))
    handler = logging.FileHandler(work / "service.log")
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    box = {"dir": work / "redis"}
    box["server"] = start_embedded(box["dir"])
    trainers = None
    try:
        version = box["server"].client().info("server")["redis_version"]
        trainers = Trainers(args, box["server"].url, work / "trainer.log")
        out = asyncio.run(bench(args, box, trainers))
    finally:
        if trainers is not None:
            trainers.close()
        box["server"].stop()
        root.removeHandler(handler)
        handler.close()
    rows, met, lines = summarise(args, out, version)
    print("\n".join(lines) + "\n")
    a: Audit = out["audit"]
    report(
        "reliability",
        rows,
        {
            "model": args.model,
            "channels": args.channels,
            "seconds": args.seconds,
            "settings": {k: getattr(args, k) for k in SETTINGS},
            "transport": "unix socket, embedded redis-server, AOF everysec",
            "redis_version": version,
            "target_met": met,
            "lines": lines,
            "examples": a.examples,
            "inconsistent_nodes": a.inconsistent_nodes,
            "first_trained_s": {k: round(v, 2) for k, v in out["first"].items()},
            "timeline": out["chaos"].timeline,
            "latencies_s": [round(x, 4) for x in out["tally"].latencies],
        },
    )
    if met and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    elif met:
        print(f"logs and the Redis data are in {work}")
    else:
        print(f"target missed; logs and the Redis data are kept in {work}", file=sys.stderr)
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
