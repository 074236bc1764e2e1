"""Input-major weight storage (gesal_core.layout): the same model, faster CPU products."""

import torch
from torch import nn

from gesal_core.layout import input_major, is_input_major, set_weight_layout
from gesal_core.svf import SVFConfig, SVFModel

from .conftest import assert_same_update_gradient, make_tiny_llama


def _ids(vocab: int, n: int = 2, t: int = 9) -> torch.Tensor:
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(0))


def _frozen_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_input_major_keeps_shape_and_values_and_changes_only_strides():
    w = torch.randn(6, 4)
    t = input_major(w)
    assert t.shape == w.shape and torch.equal(t, w)
    assert is_input_major(t) and not is_input_major(w)
    assert t.stride() == (1, 6)
    back = input_major(t, on=False)
    assert back.is_contiguous() and torch.equal(back, w)
    # low-precision copies and clones keep the order (gesal_core.svf.precision makes them)
    assert is_input_major(t.to(torch.bfloat16)) and is_input_major(t.clone())


def test_set_weight_layout_keeps_logits_and_tied_head(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    ids = _ids(model.config.vocab_size)
    before = model(ids).logits.clone()
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is emb.weight  # the tiny Llama ties its head

    changed = set_weight_layout(model)

    assert changed == len(_frozen_linears(model))
    assert all(is_input_major(m.weight) for m in _frozen_linears(model))
    assert head.weight is emb.weight  # still one Parameter, so still tied
    assert (model(ids).logits - before).abs().max() < 1e-5
    assert set_weight_layout(model) == 0  # already in that order: nothing to do
    assert set_weight_layout(model, on=False) == changed
    assert all(m.weight.is_contiguous() for m in _frozen_linears(model))


def test_svf_layers_follow_the_order_of_the_weights_they_replace(tiny_tokenizer):
    """Plain merged weights (not packed for oneDNN: `gesal_core.prepacked`) keep the
    storage order of the weight they replace."""
    cfg = SVFConfig(progress=False, prepack=False)
    plain = SVFModel(make_tiny_llama(len(tiny_tokenizer)), "tiny-rows", cfg)
    model = make_tiny_llama(len(tiny_tokenizer))
    set_weight_layout(model)
    svf = SVFModel(model, "tiny-cols", cfg)
    for layer in svf.layers.values():
        assert is_input_major(layer.merged_weight)
    for layer in plain.layers.values():
        assert layer.U.is_contiguous() and layer.merged_weight.is_contiguous()

    ids = _ids(model.config.vocab_size, n=3)
    zs = 1 + 0.4 * torch.randn(3, svf.z_size, generator=torch.Generator().manual_seed(3))
    svf.set_merged(zs[0], key="a")
    plain.set_merged(zs[0], key="a")
    assert all(is_input_major(layer.merged_weight) for layer in svf.layers.values())
    merged = svf.model(ids[:1]).logits
    assert (merged - plain.model(ids[:1]).logits).abs().max() < 1e-4
    with svf.factored(zs), plain.factored(zs):
        factored = svf.model(ids).logits
        assert (factored - plain.model(ids).logits).abs().max() < 1e-4
    assert (factored[0] - merged[0]).abs().max() < 1e-4

    # an update's gradient is the same in either order
    assert_same_update_gradient(svf, plain, zs[1], ids)
