"""A real `Engine` on the tiny random Llama: fast enough for adapter tests."""

from __future__ import annotations

from gesal_core.engine import Engine, EngineConfig
from gesal_core.generate import SamplingConfig
from gesal_core.guard import GuardConfig
from gesal_core.records import ChannelConfig
from gesal_core.store import MemoryStore
from gesal_core.svf import SVFConfig, SVFModel
from gesal_core.worker import BatchConfig, ModelWorker

from ..conftest import make_tiny_llama


def make_engine(
    tok, store=None, threshold: float = 0.85, max_new_tokens: int = 6, **config
) -> Engine:
    svf = SVFModel(make_tiny_llama(len(tok)), "tiny", SVFConfig(progress=False))
    # one reply makes a round: unit tests of the learning maths train on a vote or two;
    # tests of the round itself pass train_round
    config.setdefault("train_round", 1)
    cfg = EngineConfig(
        sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.9),
        guard=GuardConfig(enabled=False),
        channel_defaults=ChannelConfig(threshold=threshold),
        **config,
    )
    store = store if store is not None else MemoryStore(cfg.channel_defaults)
    # max_wait_s=0: no batching timer. simcord runs the bot on virtual time, where a
    # loop.call_later wake-up only fires when the test advances the clock.
    worker = ModelWorker(batching=BatchConfig(max_wait_s=0))
    return Engine(svf, tok, store, cfg, worker=worker, model_name="tiny")
