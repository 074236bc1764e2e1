import pytest
import torch
from torch import nn

from gesal_core.errors import SVFError
from gesal_core.svf import SVFConfig, SVFLinear, SVFModel, SVFState, find_targets
from gesal_core.svf.model import _svd_cache_path, weights_digest

from .conftest import make_tiny_llama


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
def test_weight_first_products_equal_the_x_first_ones(leading, per_row):
    """The CPU's many-row path (`SVFState.weight_first_rows`) computes the same layer."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 7, bias=True)
    U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    state = SVFState(mode="factored")
    layer = SVFLinear(U, S, Vh, lin.bias, state, offset=0)
    state.z = 1 + 0.5 * torch.randn(leading[0], 7) if per_row else 1 + 0.5 * torch.randn(7)
    x = torch.randn(*leading, 12)
    state.weight_first_rows = (0, 0)
    x_first = layer(x)
    state.weight_first_rows = (1, 100)
    weight_first = layer(x)
    assert weight_first.shape == x_first.shape == (*leading, 7)
    assert weight_first.is_contiguous()
    assert torch.allclose(weight_first, x_first, atol=1e-5)
    # a z being trained takes the x-first path, whose backward is autograd's own
    z = state.z.clone().requires_grad_(True)
    state.z = z
    layer(x).square().sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


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


def test_the_factored_order_is_the_one_this_machine_runs_faster():
    """Weight-first products run at the worker's batch sizes only on a CPU, and only
    where they beat x-first by `layout.MIN_GAIN` when timed; the timing of a real
    model's layers gives two positive medians."""
    from gesal_core import layout
    from gesal_core.svf.model import _order_timings

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert layout.weight_first_rows(cpu, lambda: (2.0, 1.0)) == layout.WEIGHT_FIRST_ROWS
    assert layout.weight_first_rows(cpu, lambda: (1.05, 1.0)) == (0, 0)  # within noise
    assert layout.weight_first_rows(cpu, lambda: (1.0, 2.0)) == (0, 0)
    assert layout.weight_first_rows(cuda, lambda: (2.0, 1.0)) == (0, 0)
    lin = nn.Linear(64, 48)
    U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    layers = [SVFLinear(U, S, Vh, lin.bias, SVFState(), offset=0) for _ in range(3)]
    x_first, weight_first = _order_timings(layers, rows=8, rounds=2)
    assert x_first > 0 and weight_first > 0
