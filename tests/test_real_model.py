"""Slow tests on the real bundled SmolLM2-135M-Instruct (converted once, then cached)."""

import time

import pytest
import torch

from gesal_core.generate import SamplingConfig, build_prompt, generate
from gesal_core.layout import is_input_major
from gesal_core.model import load_model
from gesal_core.svf import SVFConfig, SVFModel, find_targets
from gesal_core.svf.model import decompose

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_lm():
    load_model(progress=False)  # make sure the conversion cache exists
    start = time.perf_counter()
    lm = load_model(progress=False)
    lm.load_seconds = time.perf_counter() - start
    return lm


def test_cached_load_takes_seconds(real_lm):
    assert real_lm.load_seconds < 15, f"cached load took {real_lm.load_seconds:.1f}s"
    assert real_lm.dtype == torch.float32
    assert type(real_lm.model).__name__ == "LlamaForCausalLM"
    # stored input-major on a CPU (gesal_core.layout), the tied head included
    model = real_lm.model
    assert is_input_major(model.lm_head.weight)
    assert is_input_major(model.model.layers[0].self_attn.q_proj.weight)
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_real_answer(real_lm):
    prompt = build_prompt(
        real_lm.tokenizer, [{"role": "user", "content": "What is the capital of France?"}]
    )
    out = generate(
        real_lm.model, real_lm.tokenizer, [prompt], SamplingConfig(max_new_tokens=24, temperature=0)
    )[0]
    assert "Paris" in out.text


def test_svf_identity_and_svd_cache_on_real_model(real_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("GESAL_CACHE_DIR", str(tmp_path))  # a cold SVD cache
    tok = real_lm.tokenizer
    ids = torch.tensor(
        [build_prompt(tok, [{"role": "user", "content": "Name three fruits."}]).input_ids]
    )
    base = real_lm.model(ids).logits.clone()

    # The SVD of the 90 targets is computed once, then read from the disk cache, much
    # faster (timed alone: building an SVFModel also packs weights, the same either way)
    cfg = SVFConfig(progress=False)
    names = find_targets(real_lm.model, cfg)
    start = time.perf_counter()
    decompose(real_lm.model, names, real_lm.name, cfg)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    decompose(real_lm.model, names, real_lm.name, cfg)
    warm = time.perf_counter() - start

    svf = SVFModel(real_lm.model, real_lm.name, cfg)
    assert len(svf.layers) == 90  # 30 layers x gate/up/down
    merged = svf.model(ids).logits
    assert (merged - base).abs().max().item() <= 1e-3
    with svf.factored(svf.ones()):
        factored = svf.model(ids).logits
    assert (factored - base).abs().max().item() <= 1e-3
    assert warm < cold / 3, f"cache load {warm:.2f}s vs compute {cold:.2f}s"
