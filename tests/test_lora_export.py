"""Exporting a node's z as a PEFT LoRA: exact at full rank, exactly the truncated z at
rank k, loadable by PEFT itself, and its error shrinks as k grows."""

import json

import pytest
import torch

from gesal_core.errors import GesalError
from gesal_core.lora_export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    export_lora,
    logit_error,
    top_components,
    truncated_z,
)
from gesal_core.svf import SVFConfig, SVFModel

from .conftest import make_tiny_llama


def _setup(tok):
    svf = SVFModel(make_tiny_llama(len(tok), seed=3), "tiny", SVFConfig(progress=False))
    g = torch.Generator().manual_seed(7)
    z = 1 + 0.3 * torch.randn(svf.z_size, generator=g)
    ids = torch.randint(3, len(tok), (2, 7), generator=g)
    return svf, z, ids


def _peft_logits(tok, path, ids):
    from peft import PeftModel

    base = make_tiny_llama(len(tok), seed=3)  # a fresh copy of the same base weights
    model = PeftModel.from_pretrained(base, str(path)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("k", [2, 64])
def test_peft_loads_the_export_and_matches_the_truncated_z(tiny_tokenizer, tmp_path, k):
    svf, z, ids = _setup(tiny_tokenizer)
    out = export_lora(svf, z, k, tmp_path / "adapter", base_model="tiny", meta={"node": "n1"})
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert (out / ADAPTER_WEIGHTS).exists()
    assert cfg["r"] == min(k, 32) and cfg["lora_alpha"] == cfg["r"]
    assert set(cfg["target_modules"]) == {"gate_proj", "up_proj", "down_proj"}
    lora = _peft_logits(tiny_tokenizer, out, ids)
    with torch.no_grad(), svf.factored(truncated_z(svf, z, k)):
        expected = svf.model(input_ids=ids).logits
    assert (lora - expected).abs().max() < 1e-4
    if k >= 32:  # every component kept: the LoRA is the SVF adapter itself
        with torch.no_grad(), svf.factored(z):
            full = svf.model(input_ids=ids).logits
        assert (lora - full).abs().max() < 1e-4


def test_components_with_the_largest_effect_are_kept(tiny_tokenizer):
    svf, _, _ = _setup(tiny_tokenizer)
    layer_name, layer = next(iter(svf.layers.items()))
    z = svf.ones()
    sl = layer.z_slice
    z[sl.start + 5] = 1.5  # effect 0.5 σ_5
    z[sl.start + 0] = 1.01  # σ_0 is the largest singular value but the change is tiny
    z[sl.start + 20] = 0.2  # effect 0.8 σ_20
    picked = top_components(svf, z, 2)[layer_name].tolist()
    s = layer.S
    effects = {i: abs(float(s[i]) * (float(z[sl.start + i]) - 1)) for i in (0, 5, 20)}
    assert picked == sorted(sorted(effects, key=effects.get)[-2:])
    with pytest.raises(GesalError):
        top_components(svf, z, 0)


def test_logit_error_shrinks_with_rank(tiny_tokenizer):
    svf, z, ids = _setup(tiny_tokenizer)
    errs = [logit_error(svf, z, k, ids) for k in (1, 8, 32)]
    assert errs[0]["rel_error"] > errs[1]["rel_error"] > errs[2]["rel_error"]
    assert errs[2]["rel_error"] < 1e-4 and errs[2]["captured"] > 0.9999
    assert errs[0]["kl_full_to_k"] > errs[2]["kl_full_to_k"] >= -1e-6
