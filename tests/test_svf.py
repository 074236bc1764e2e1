import pytest
import torch
from torch import nn

from gesal_core.errors import SVFError
from gesal_core.svf import SVFConfig, SVFLinear, SVFModel, SVFState, find_targets
from gesal_core.svf.model import _svd_cache_path, weights_digest

from .conftest import assert_same_update_gradient, make_tiny_llama


def _ids(n=2, t=7, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, t), generator=g)


def _tiny_arch(kind: str):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    small = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**small))
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**small))
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4))


@pytest.mark.parametrize(
    "kind,targets,expected",
    [
        ("llama", "mlp", {"gate_proj", "up_proj", "down_proj"}),
        ("qwen2", "mlp", {"gate_proj", "up_proj", "down_proj"}),
        ("mistral", "mlp", {"gate_proj", "up_proj", "down_proj"}),
        ("gpt2", "mlp", {"c_fc", "c_proj"}),
        ("llama", "attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
        ("gpt2", "attention", {"c_attn", "c_proj"}),
        (
            "llama",
            "all",
            {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
        ),
        ("llama", ("up_proj",), {"up_proj"}),
    ],
)
def test_target_discovery_per_architecture(kind, targets, expected):
    model = make_tiny_llama(64) if kind == "llama" else _tiny_arch(kind)
    names = find_targets(model, SVFConfig(targets=targets))
    assert {n.rsplit(".", 1)[-1] for n in names} == expected
    assert not any("lm_head" in n for n in names)
    if kind == "gpt2" and targets == "mlp":  # attn.c_proj must not sneak into the MLP set
        assert all(".mlp." in n for n in names)


def test_nothing_matching_is_an_error():
    with pytest.raises(SVFError, match="no module matches"):
        find_targets(make_tiny_llama(64), SVFConfig(targets=("not_a_layer",)))
    with pytest.raises(SVFError, match="unknown SVF target set"):
        find_targets(make_tiny_llama(64), SVFConfig(targets="everything"))


@pytest.mark.parametrize("leading", [(), (5,), (2, 3), (2, 3, 4)])
def test_layer_has_linear_semantics_with_bias(leading):
    torch.manual_seed(0)
    lin = nn.Linear(12, 7, bias=True)
    U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    state = SVFState()
    layer = SVFLinear(U, S, Vh, lin.bias, state, offset=0)
    x = torch.randn(*leading, 12)
    expected = lin(x)
    assert layer(x).shape == expected.shape == (*leading, 7)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    state.mode, state.z = "factored", torch.ones(7)
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("leading", [(9,), (2, 5), (3, 4, 2)])
@pytest.mark.parametrize("per_row", [False, True])
def test_products_on_packed_weights_equal_the_plain_ones(leading, per_row):
    """`SVFLinear.prepack` (the CPU's oneDNN products) computes the same layer, merged
    and factored, and a z being trained still gets autograd's exact gradient."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 7, bias=True)
    U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    plain_state, packed_state = SVFState(mode="factored"), SVFState(mode="factored")
    plain = SVFLinear(U, S, Vh, lin.bias, plain_state, offset=0)
    packed = SVFLinear(U, S, Vh, lin.bias, packed_state, offset=0)
    packed.prepack()
    assert packed.merged_weight.is_mkldnn and not plain.merged_weight.is_mkldnn
    z = 1 + 0.5 * torch.randn(leading[0], 7) if per_row else 1 + 0.5 * torch.randn(7)
    plain_state.z = packed_state.z = z
    x = torch.randn(*leading, 12)
    expected = plain(x)
    assert packed(x).shape == expected.shape == (*leading, 7)
    assert torch.allclose(packed(x), expected, atol=1e-5)
    for state in (plain_state, packed_state):
        state.mode, state.merged_z, state.merged_key = "merged", z.reshape(-1, 7)[0], "a"
    assert torch.allclose(packed(x), plain(x), atol=1e-5)
    assert packed.merged_weight.is_mkldnn  # merged weights are packed, not kept plain too
    # a gradient through a packed merged weight is composed plain, not silently dropped
    x_grad = x.clone().requires_grad_(True)
    packed(x_grad).square().sum().backward()
    assert x_grad.grad is not None and x_grad.grad.abs().sum() > 0
    # a z being trained runs on the plain factors, whose backward is autograd's own
    packed_state.mode = "factored"
    trained = z.clone().requires_grad_(True)
    packed_state.z = trained
    packed(x).square().sum().backward()
    plain_state.mode, reference = "factored", z.clone().requires_grad_(True)
    plain_state.z = reference
    plain(x).square().sum().backward()
    assert torch.allclose(trained.grad, reference.grad, atol=1e-5)


@pytest.mark.parametrize("leading", [(9,), (2, 5)])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gradients_of_a_layer_in_training_are_exact(leading, per_row, bias):
    """A layer's gradients in an update against finite differences, for the input and for
    z, shared or one per batch row."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=bias).double()
    U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    state = SVFState(mode="factored")
    layer = SVFLinear(U, S, Vh, lin.bias, state, offset=0)
    z0 = 1 + 0.5 * torch.randn(leading[0], 4) if per_row else 1 + 0.5 * torch.randn(4)
    z0 = z0.double().requires_grad_(True)
    x = torch.randn(*leading, 6, dtype=torch.float64, requires_grad=True)

    def run(x, z):
        state.z = z
        return layer(x)

    assert torch.autograd.gradcheck(run, (x, z0))
    # no gradient for an input that does not need one (the first layer's embeddings)
    state.z = z0
    layer(x.detach()).sum().backward()
    assert z0.grad is not None and torch.isfinite(z0.grad).all()


def test_a_small_step_of_z_reaches_a_bf16_product():
    """An update's bf16 forward passes (`gesal_core.svf.precision`) must see z move by one
    Adam step (3e-3); in bf16, 1.002 is 1."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    state = SVFState(mode="factored")
    layer = SVFLinear(U.bfloat16(), S, Vh.bfloat16(), None, state, offset=0)
    x = torch.randn(4, 64).bfloat16()
    state.z = torch.ones(32)
    before = layer(x)
    state.z = torch.full((32,), 1.002)
    assert before.dtype == torch.bfloat16
    assert not torch.equal(layer(x), before)


def test_z_one_reproduces_base_logits_tiny(tiny_llama):
    ids = _ids(vocab=tiny_llama.config.vocab_size)
    base = tiny_llama(ids).logits.clone()
    svf = SVFModel(tiny_llama, "tiny", SVFConfig(targets="all", progress=False))
    assert (svf.model(ids).logits - base).abs().max() < 1e-4
    with svf.factored(svf.ones()):
        assert (svf.model(ids).logits - base).abs().max() < 1e-4


def test_gpt2_conv1d_identity_and_bias():
    model = _tiny_arch("gpt2").eval()
    ids = torch.randint(0, 64, (2, 5))
    base = model(ids).logits.clone()
    svf = SVFModel(model, "tiny-gpt2", SVFConfig(targets="all", progress=False))
    assert len(svf.layers) == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert all(layer.bias is not None for layer in svf.layers.values())
    assert (svf.model(ids).logits - base).abs().max() < 1e-4


def test_merged_and_factored_agree_for_random_z(tiny_llama):
    ids = _ids(vocab=tiny_llama.config.vocab_size)
    svf = SVFModel(tiny_llama, "tiny", SVFConfig(progress=False))
    z = 1 + 0.3 * torch.randn(svf.z_size, generator=torch.Generator().manual_seed(1))
    base = svf.model(ids).logits.clone()
    svf.set_merged(z)
    merged = svf.model(ids).logits.clone()
    with svf.factored(z):
        factored = svf.model(ids).logits
    assert (merged - base).abs().max() > 1e-3  # z really changes the model
    assert (merged - factored).abs().max() < 1e-4


def test_gradient_reaches_z_only(tiny_llama):
    ids = _ids(vocab=tiny_llama.config.vocab_size)
    svf = SVFModel(tiny_llama, "tiny", SVFConfig(progress=False))
    z = svf.trainable()
    with svf.factored(z):
        loss = svf.model(ids).logits.logsumexp(-1).mean()
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert torch.isfinite(z.grad).all()
    assert not any(p.requires_grad for p in svf.model.parameters())
    assert all(p.grad is None for p in svf.model.parameters())


def test_per_row_z_in_one_batch_equals_separate_runs(tiny_llama):
    ids = _ids(n=3, vocab=tiny_llama.config.vocab_size)
    svf = SVFModel(tiny_llama, "tiny", SVFConfig(progress=False))
    g = torch.Generator().manual_seed(2)
    zs = 1 + 0.5 * torch.randn(3, svf.z_size, generator=g)
    with svf.factored(zs):
        batched = svf.model(ids).logits.clone()
    for row in range(3):
        svf.set_merged(zs[row])
        alone = svf.model(ids[row : row + 1]).logits
        assert (batched[row] - alone[0]).abs().max() < 1e-4


def test_per_row_z_must_match_batch(tiny_llama):
    svf = SVFModel(tiny_llama, "tiny", SVFConfig(progress=False))
    with svf.factored(torch.ones(2, svf.z_size)), pytest.raises(ValueError, match="rows"):
        svf.model(_ids(n=3, vocab=tiny_llama.config.vocab_size))


def test_bad_z_is_rejected(tiny_llama):
    svf = SVFModel(tiny_llama, "tiny", SVFConfig(progress=False))
    with pytest.raises(SVFError, match="components"):
        svf.set_merged(torch.ones(svf.z_size + 1))
    bad = svf.ones()
    bad[3] = float("nan")
    with pytest.raises(SVFError, match="NaN"):
        svf.set_merged(bad)


def test_svd_is_cached_and_keyed_by_weights(tiny_tokenizer):
    cfg = SVFConfig(progress=False)
    m1 = make_tiny_llama(len(tiny_tokenizer), seed=0)
    names = find_targets(m1, cfg)
    path = _svd_cache_path("tiny", weights_digest(m1, names))
    assert not path.exists()
    svf1 = SVFModel(m1, "tiny", cfg)
    assert path.exists()
    m2 = make_tiny_llama(len(tiny_tokenizer), seed=0)  # same weights: served from cache
    mtime = path.stat().st_mtime_ns
    svf2 = SVFModel(m2, "tiny", cfg)
    assert path.stat().st_mtime_ns == mtime
    for name in names:
        assert torch.equal(svf1.layers[name].U, svf2.layers[name].U)
    m3 = make_tiny_llama(len(tiny_tokenizer), seed=1)  # different weights: a new entry
    assert _svd_cache_path("tiny", weights_digest(m3, names)) != path


def test_corrupt_svd_cache_is_recomputed(tiny_tokenizer):
    cfg = SVFConfig(progress=False)
    m1 = make_tiny_llama(len(tiny_tokenizer))
    path = _svd_cache_path("tiny", weights_digest(m1, find_targets(m1, cfg)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a safetensors file")
    ids = _ids(vocab=len(tiny_tokenizer))
    base = m1(ids).logits.clone()
    svf = SVFModel(m1, "tiny", cfg)
    assert (svf.model(ids).logits - base).abs().max() < 1e-4


def test_an_svf_model_on_a_cpu_runs_its_products_on_packed_weights(tiny_tokenizer):
    """Every frozen linear and every SVF layer serves from packed weights, with the same
    logits as a plain copy, merged and factored, and the same update gradient; the LM
    head stays tied to the embedding."""
    from gesal_core.prepacked import PrepackedLinear

    ids = _ids(vocab=len(tiny_tokenizer), n=3)
    plain = SVFModel(
        make_tiny_llama(len(tiny_tokenizer)), "tiny", SVFConfig(progress=False, prepack=False)
    )
    svf = SVFModel(make_tiny_llama(len(tiny_tokenizer)), "tiny", SVFConfig(progress=False))
    assert svf.prepacked and not plain.prepacked
    assert svf.packed_bytes() >= svf.factor_bytes() * 0.9 and plain.packed_bytes() == 0
    linears = [m for m in svf.model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, PrepackedLinear) for m in linears)
    assert not any(isinstance(m, PrepackedLinear) for m in plain.model.modules())
    head, emb = svf.model.get_output_embeddings(), svf.model.get_input_embeddings()
    assert head.weight is emb.weight
    zs = 1 + 0.3 * torch.randn(3, svf.z_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for s in (svf, plain):
            s.set_merged(zs[0], key="a")
        assert (svf.model(ids[:1]).logits - plain.model(ids[:1]).logits).abs().max() < 1e-4
        with svf.factored(zs), plain.factored(zs):
            assert (svf.model(ids).logits - plain.model(ids).logits).abs().max() < 1e-4
    assert_same_update_gradient(svf, plain, zs[1], ids)


def test_a_packed_linear_follows_its_weight():
    """A weight written in place is repacked before its next product; a weight swapped
    for another tensor (an update's bf16 copy) runs plain; a product that wants a
    gradient runs plain, so autograd has one."""
    from gesal_core.prepacked import PrepackedLinear

    torch.manual_seed(0)
    lin = nn.Linear(16, 8).requires_grad_(False)
    packed = PrepackedLinear.replacing(lin)
    x = torch.randn(3, 16)
    assert torch.allclose(packed(x), lin(x), atol=1e-5)
    with torch.no_grad():
        lin.weight[0] += 1.0  # the same Parameter: packed sees the write
    assert torch.allclose(packed(x), lin(x), atol=1e-5)
    full = packed.weight
    packed.weight = nn.Parameter(full.detach().bfloat16(), requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as `LowPrecisionWeights` runs it
        assert packed(x).dtype == torch.bfloat16
    packed.weight = full
    x_grad = x.clone().requires_grad_(True)
    packed(x_grad).sum().backward()
    assert torch.allclose(x_grad.grad, full.sum(0).expand(3, 16), atol=1e-5)
