"""Compiled update passes (`LearningConfig.compile`): the same maths as eager, and eager
again whenever compiling fails.

Compiling, even the tiny model, takes tens of seconds, so these are marked slow.
"""

import dataclasses
import logging
import os

import numpy as np
import pytest
import torch

from gesal_core.learning import (
    LearningConfig,
    Sample,
    reinforce_step,
    sequence_logprobs,
    warm_up_compiled,
)
from gesal_core.svf import SVFConfig, SVFModel

from .conftest import make_tiny_llama
from .system_deps import require

pytestmark = pytest.mark.slow

FP32 = LearningConfig(compute_dtype="float32", compile=True)


@pytest.fixture
def svf(tiny_llama):
    require("g++", "g++", "c++")  # torch.compile's CPU backend builds its kernels with it
    return SVFModel(tiny_llama, "tiny-compiled", SVFConfig(progress=False, cache_svd=False))


def _samples(n, offset=0):
    ids = list(range(5, 60))
    return [
        Sample(ids[offset + i : offset + 10 + 2 * i], ids[30 + i : 36 + i], reward=r)
        for i, r in zip(range(n), [1.0, -2.0, 1.0, -2.0, 1.0], strict=False)
    ]


def _logprobs_and_grad(svf, samples, compiled, z0):
    z = svf.trainable(z0)
    logp, _ = sequence_logprobs(svf, z, samples, share_prefix=False, compiled=compiled)
    (logp * torch.tensor([1.0, -2.0, 0.5][: len(samples)])).sum().backward()
    return logp.detach(), z.grad.detach().clone()


def test_compiled_passes_give_the_eager_values_and_gradients(svf, caplog):
    z0 = 1 + 0.1 * torch.randn(svf.z_size, generator=torch.Generator().manual_seed(0))
    caplog.set_level(logging.INFO, "gesal_core.svf.compiled")
    took = warm_up_compiled(svf, FP32)
    assert took > 0 and svf.compiled_passes.warmed and not svf.compiled_passes.failed
    assert "update passes compiled in" in caplog.text  # the wait is shown, not silent
    for rows in (3, 1):  # both compiled shapes, with padding (lengths differ)
        samples = _samples(rows, offset=rows)
        eager_lp, eager_g = _logprobs_and_grad(svf, samples, False, z0)
        calls = svf.compiled_passes.calls
        comp_lp, comp_g = _logprobs_and_grad(svf, samples, True, z0)
        assert svf.compiled_passes.calls == calls + 1
        assert torch.allclose(comp_lp, eager_lp, atol=1e-4, rtol=1e-5)
        assert torch.allclose(comp_g, eager_g, atol=1e-5, rtol=1e-4)
        assert eager_g.abs().sum() > 0


def test_passes_of_any_shape_reuse_the_warm_up_graphs():
    from torch._dynamo.utils import counters

    from gesal_core.svf.precision import WIDE_OUT

    # a vocabulary as wide as a real model's, so that the LM head's small-row padding
    # (`svf.precision.SAFE_ROWS`) is one of the size tests a pass can fall either side of
    model = make_tiny_llama(WIDE_OUT + 16)
    svf = SVFModel(model, "tiny-compiled-wide", SVFConfig(progress=False, cache_svd=False))
    cfg = dataclasses.replace(FP32, compute_dtype="bfloat16")
    warm_up_compiled(svf, cfg)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # one sample, several samples
    # short and long, padded and not, one row and four: no pass compiles anew
    cases = [(1, 3, 1), (1, 40, 1), (1, 90, 0), (2, 60, 0), (2, 4, 1), (3, 9, 1), (4, 30, 1)]
    for rows, prompt, step in cases:  # step 0: rows of one length, no padding of their own
        samples = _samples(rows)
        for i, s in enumerate(samples):
            s.prompt_ids = list(range(5, 5 + prompt + step * i))
            s.response_ids = s.response_ids[:6]
        z = svf.trainable()
        with svf.compute_precision("bfloat16"):
            logp, _ = sequence_logprobs(svf, z, samples, share_prefix=False, compiled=True)
        logp.sum().backward()
        assert counters["stats"]["unique_graphs"] == graphs, (rows, prompt)


def test_a_compiled_update_takes_the_eager_step(svf):
    z0 = np.ones(svf.z_size, dtype=np.float32)
    eager = reinforce_step(svf, z0, _samples(3), 0.0, dataclasses.replace(FP32, compile=False))
    # no warm-up called: the first compiled update compiles first, then steps
    compiled = reinforce_step(svf, z0, _samples(3), 0.0, FP32)
    assert svf.compiled_passes.warmed and not svf.compiled_passes.failed
    # the warm-up's two passes, then one pass per inner step
    assert svf.compiled_passes.calls == 2 + FP32.inner_steps
    assert eager.status == compiled.status == "updated"
    step, step_c = eager.z - z0, compiled.z - z0
    assert np.linalg.norm(step) > 0
    cosine = step @ step_c / np.linalg.norm(step) / np.linalg.norm(step_c)
    assert cosine > 0.999
    assert np.linalg.norm(step_c - step) / np.linalg.norm(step) < 0.02


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(svf, caplog):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    from gesal_core.svf.compiled import CompiledPasses

    svf.compiled_passes = CompiledPasses(svf.model, backend=broken_backend)
    z0 = np.ones(svf.z_size, dtype=np.float32)
    with caplog.at_level(logging.WARNING, "gesal_core.svf.compiled"):
        res = reinforce_step(svf, z0, _samples(2), 0.0, FP32)
    assert res.status == "updated"  # the update still happened, eagerly
    assert "no C++ compiler here" in svf.compiled_passes.failed
    assert "running them eagerly" in caplog.text
    assert svf.compiled_passes.calls == 0
    eager = reinforce_step(svf, z0, _samples(2), 0.0, dataclasses.replace(FP32, compile=False))
    np.testing.assert_allclose(res.z, eager.z, atol=1e-6)


def test_the_bot_compiles_at_start_up_and_shows_it(svf):
    import asyncio

    from bot.boot import BootProgress
    from bot.runtime import compile_updates_step

    progress = BootProgress()
    asyncio.run(compile_updates_step(svf, dataclasses.replace(FP32, compile=False), 0, progress))
    assert progress.steps == [] and not svf.compiled_passes.warmed  # off: no step at all
    asyncio.run(compile_updates_step(svf, FP32, 0, progress))
    (step,) = progress.steps
    assert step.state == "done" and step.detail.endswith(" s")
    assert svf.compiled_passes.warmed and svf.compiled_passes.calls == 2


def test_the_compile_cache_lives_with_the_other_caches(tiny_llama, tmp_path, monkeypatch):
    from gesal_core.svf.compiled import CompiledPasses

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("GESAL_CACHE_DIR", str(tmp_path))

    def broken_backend(graph, example_inputs):
        raise RuntimeError("not compiling in this test")

    passes = CompiledPasses(tiny_llama, backend=broken_backend)
    out = passes(input_ids=torch.tensor([[5, 6, 7]]))  # eager after the failure
    assert out.logits.shape[:2] == (1, 3)
    # a container keeps GESAL_CACHE_DIR on a volume; /tmp, inductor's default, it loses
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torchinductor")
