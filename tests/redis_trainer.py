"""A training worker in its own process, for the crash tests (killed on purpose).

    python -m tests.redis_trainer URL CHANNEL MODE [--lock-ttl S] [--claim-ms MS]

MODE: ``train`` one training run; ``crash`` compute the updates, then die with exit code
17 *before* the commit reaches Redis; ``loop`` train again and again until killed;
``drain`` train until nothing is pending. Each run prints one JSON line.
It builds the same tiny model and tokenizer as the tests (both are deterministic).
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
        sampling=SamplingConfig(max_new_tokens=6),
        guard=GuardConfig(enabled=False),
        train_lock_ttl=lock_ttl,
    )
    store = RedisStore(url, claim_idle_ms=claim_ms)
    return Engine(svf, tok, store, cfg, model_name="tiny")


async def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("channel")
    ap.add_argument("mode", choices=["train", "crash", "loop", "drain"])
    ap.add_argument("--lock-ttl", type=float, default=2.0)
    ap.add_argument("--claim-ms", type=int, default=200)
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
