"""Training workers in their own processes, for the crash tests (killed on purpose).

    python -m tests.redis_trainer URL CHANNEL MODE [--lock-ttl S] [--claim-ms MS]

MODE: ``train`` one training run; ``crash`` compute the updates, then die with exit code
17 *before* the commit reaches Redis; ``loop`` train again and again until killed;
``drain`` train until nothing is pending. Each run prints one JSON line.
It builds the same tiny model and tokenizer as the tests (both are deterministic).

Importing torch and transformers takes seconds, which would make "kill the worker
again and again" slow. So `Zygote` starts one process that imports them once, with no
model work done yet (fork-safe), and forks a fresh worker per request: a real separate
process that a SIGKILL takes down mid-flight, started in a fraction of a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

CRASH_EXIT = 17


def build_engine(url: str, lock_ttl: float, claim_ms: int):
    from gesal_core.engine import Engine, EngineConfig
    from gesal_core.generate import SamplingConfig
    from gesal_core.guard import GuardConfig
    from gesal_core.store.redis_store import RedisStore
    from gesal_core.svf import SVFConfig, SVFModel
    from tests.conftest import make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    svf = SVFModel(make_tiny_llama(len(tok)), "tiny", SVFConfig(progress=False))
    cfg = EngineConfig(
        train_round=1,  # one reply makes a round: train on every vote
        sampling=SamplingConfig(max_new_tokens=6),
        guard=GuardConfig(enabled=False),
        train_lock_ttl=lock_ttl,
    )
    store = RedisStore(url, claim_idle_ms=claim_ms)
    return Engine(svf, tok, store, cfg, model_name="tiny")


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("channel")
    ap.add_argument("mode", choices=["train", "crash", "loop", "drain", "zygote"])
    ap.add_argument("--lock-ttl", type=float, default=2.0)
    ap.add_argument("--claim-ms", type=int, default=200)
    return ap.parse_args(argv)


async def work(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    eng = build_engine(args.url, args.lock_ttl, args.claim_ms)
    if args.mode == "crash":

        async def die_before_commit(channel, updates, event_ids):
            print(json.dumps({"crashing": len(event_ids)}), flush=True)
            os._exit(CRASH_EXIT)  # updates computed, nothing committed

        eng.store.commit = die_before_commit
    deadline = time.monotonic() + 120
    while True:
        report = await eng.train(args.channel)
        print(json.dumps({"events": report.events, "updated": report.count("updated")}), flush=True)
        if args.mode in ("train", "crash"):
            break
        if args.mode == "drain" and await eng.pending(args.channel) == 0:
            break
        if time.monotonic() > deadline:
            return 1
        await asyncio.sleep(0.05)
    eng.close()
    await eng.store.close()
    return 0


def zygote(args: argparse.Namespace) -> int:
    """Read commands on stdin: ``<mode>`` forks a worker (prints ``pid N``);
    ``wait N`` reaps it (prints ``exit N CODE``, CODE < 0 for a signal)."""
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401

    import gesal_core.engine  # noqa: F401
    import gesal_core.store.redis_store  # noqa: F401

    torch.set_num_threads(1)  # no thread pool exists before a fork
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "wait":
            _, status = os.waitpid(int(cmd[1]), 0)
            code = os.waitstatus_to_exitcode(status)
            print(f"exit {cmd[1]} {code}", flush=True)
            continue
        pid = os.fork()
        if pid == 0:  # the worker
            try:
                args.mode = cmd[0]
                code = asyncio.run(work(args))
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            os._exit(code)
        print(f"pid {pid}", flush=True)
    return 0


class Zygote:
    """Parent side: fork workers from a warm process, kill them, collect exit codes."""

    def __init__(self, url: str, channel: str, *options: str) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.redis_trainer", url, channel, "zygote", *options],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.output: list[str] = []
        self._expect("ready")

    def _expect(self, prefix: str) -> str:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"trainer zygote died; output: {self.output[-5:]}")
            if line.startswith(prefix):
                return line
            self.output.append(line.strip())  # the workers' JSON reports

    def spawn(self, mode: str) -> int:
        self.proc.stdin.write(mode + "\n")
        return int(self._expect("pid ").split()[1])

    def wait(self, pid: int) -> int:
        self.proc.stdin.write(f"wait {pid}\n")
        return int(self._expect(f"exit {pid} ").split()[2])

    def kill(self, pid: int) -> int:
        import signal

        os.kill(pid, signal.SIGKILL)
        return self.wait(pid)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


if __name__ == "__main__":
    ns = parse(sys.argv[1:])
    sys.exit(zygote(ns) if ns.mode == "zygote" else asyncio.run(work(ns)))
