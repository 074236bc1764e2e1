"""The trainer lock is a short lease renewed by a heartbeat (real Redis, sub-second TTLs).

A long training keeps its lock however long it runs; a trainer that is SIGKILLed frees
the channel within one lease; and a heartbeat never extends a lock that is no longer its
own. Production uses `EngineConfig.train_lock_ttl` (30 s); the tests use 0.5 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

from gesal_core.engine import EngineConfig
from gesal_core.store.layout import Keys

from .redis_server import run

CH = "discord:3:3"
TTL = 0.5


def test_default_lease_is_short():
    assert EngineConfig().train_lock_ttl <= 60


def test_a_long_training_keeps_its_lock(make_redis_store, redis_client):
    a, b = make_redis_store(), make_redis_store()

    async def go():
        seen = []
        async with a.trainer_lock(CH, ttl=TTL) as held:
            assert held
            for _ in range(8):  # 8 half leases: 4 leases' worth
                await asyncio.sleep(TTL / 2)
                async with b.trainer_lock(CH, ttl=TTL) as other:
                    seen.append(other)
            ttl_ms = redis_client.pttl(Keys(CH).trainlock)
        async with b.trainer_lock(CH, ttl=TTL) as after:  # released at the end
            pass
        return seen, ttl_ms, after

    seen, ttl_ms, after = run(go())
    assert seen == [False] * 8
    assert 0 < ttl_ms <= TTL * 1000
    assert after and not redis_client.exists(Keys(CH).trainlock)


HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from gesal_core.store.redis_store import RedisStore

    async def main():
        store = RedisStore(sys.argv[1])
        async with store.trainer_lock(sys.argv[2], ttl=float(sys.argv[3])) as held:
            print("held" if held else "busy", flush=True)
            await asyncio.sleep(3600)  # training forever, until killed

    asyncio.run(main())
    """
)


def test_a_killed_trainer_frees_the_channel_within_one_lease(make_redis_store, redis_url):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_url, CH, str(TTL)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        b = make_redis_store()

        async def try_lock() -> bool:
            async with b.trainer_lock(CH, ttl=TTL) as held:
                return held

        async def go():
            await asyncio.sleep(TTL * 4)  # alive: its heartbeat keeps the lock
            alive = await try_lock()
            os.kill(holder.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            # before reaping the process, which on a loaded machine can outlast what is
            # left of the lease (2/3 of it or more); a check that late finds it rightly free
            right_after = await try_lock()
            checked_after = time.monotonic() - killed_at
            await asyncio.to_thread(holder.wait, 10)
            while not await try_lock():
                assert time.monotonic() - killed_at < 5, "the dead trainer's lock never freed"
                await asyncio.sleep(0.02)
            return alive, right_after, checked_after, time.monotonic() - killed_at

        alive, right_after, checked_after, freed_after = run(go())
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    print(f"lock of a SIGKILLed trainer freed after {freed_after:.2f}s (lease {TTL}s)")
    assert not alive  # held while alive
    # ...and for a moment after: the lease expires, nothing releases it at the kill
    # (heartbeats every third of a lease leave two thirds; one third allows a late one)
    assert not right_after or checked_after >= TTL / 3
    assert freed_after <= TTL + 1.0  # one lease, plus polling on a busy machine


def test_a_heartbeat_never_extends_someone_elses_lock(make_redis_store, redis_client):
    a = make_redis_store()
    key = Keys(CH).trainlock

    async def go():
        async with a.trainer_lock(CH, ttl=TTL) as held:
            assert held
            # a stall longer than the lease: it expires and another trainer takes it
            redis_client.set(key, "other-trainer", px=int(10 * TTL * 1000))
            await asyncio.sleep(TTL)  # our heartbeat (every TTL / 3) ran meanwhile
            during = redis_client.pttl(key)
        return during, redis_client.get(key)

    during, after = run(go())
    assert during > 6 * TTL * 1000  # untouched: our renewal would have set it to TTL
    assert after == b"other-trainer"  # and not deleted by our release


def test_the_lock_is_released_when_its_renewal_swallows_the_cancel(make_redis_store):
    """The holder leaves while the heartbeat is inside a renewal whose client turns the
    cancellation into a connection error: the heartbeat still stops, the holder's exit
    returns and the lock is released, instead of being renewed forever."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    store = make_redis_store()
    real_eval = store._eval
    renewing = asyncio.Event()

    async def slow_eval(script, keys, args):
        if script.name == "renew_lock":
            renewing.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise RedisConnectionError("Connection closed by server.") from None
        return await real_eval(script, keys, args)

    store._eval = slow_eval

    async def go():
        async with store.trainer_lock(CH, ttl=TTL) as held:
            assert held
            await renewing.wait()  # the heartbeat is inside its renewal now
        async with store.trainer_lock(CH, ttl=TTL) as again:
            return again  # released: free at once

    assert asyncio.run(asyncio.wait_for(go(), 5)) is True
