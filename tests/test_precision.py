"""Low-precision updates: bf16 products for the gradient of z, fp32 for everything else."""

import numpy as np
import pytest
import torch

from gesal_core.errors import SVFError
from gesal_core.learning import LearningConfig, Sample, reinforce_step, sequence_logprobs
from gesal_core.svf import SVFConfig, SVFModel
from gesal_core.svf.precision import LowPrecisionWeights, bf16_speedup, resolve_compute_dtype

from .conftest import make_tiny_llama

CPU = torch.device("cpu")


@pytest.fixture
def svf(tiny_llama):
    return SVFModel(tiny_llama, "tiny-precision", SVFConfig(progress=False, cache_svd=False))


def _weights(model):
    return {n: t for n, t in model.state_dict(keep_vars=True).items()}


def test_compute_dtype_names_and_model_dtypes():
    assert resolve_compute_dtype("float32", torch.float32, CPU) is None
    assert resolve_compute_dtype("bfloat16", torch.float32, CPU) is torch.bfloat16
    # a model loaded in low precision already computes in it: nothing is lowered
    assert resolve_compute_dtype("bfloat16", torch.bfloat16, CPU) is None
    assert resolve_compute_dtype("bfloat16", torch.float16, CPU) is None
    auto = resolve_compute_dtype("auto", torch.float32, CPU)
    assert auto is (torch.bfloat16 if bf16_speedup("cpu") >= 1.5 else None)
    with pytest.raises(SVFError, match="unknown compute dtype 'fp8'"):
        resolve_compute_dtype("fp8", torch.float32, CPU)


def test_low_precision_copies_are_swapped_in_and_always_back_out(svf):
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    before = _weights(svf.model)
    with torch.no_grad():
        full = svf.model(input_ids=ids).logits
    low = LowPrecisionWeights(svf.model, torch.bfloat16)
    # every SVF factor and every frozen projection (attention, tied LM head)
    assert low.nbytes() > 0
    with low.active(), torch.no_grad():
        layer = next(iter(svf.layers.values()))
        assert layer.U.dtype == layer.Vh.dtype == torch.bfloat16
        assert svf.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        assert svf.model.lm_head.weight.dtype == torch.bfloat16
        # the embedding is a lookup, not a product: it stays, and the tie survives
        assert svf.model.model.embed_tokens.weight.dtype == torch.float32
        lowered = svf.model(input_ids=ids).logits
    assert not torch.equal(lowered.float(), full)  # really computed in bf16
    assert torch.allclose(lowered.float(), full, atol=0.1 * float(full.abs().max()))
    with pytest.raises(RuntimeError, match="boom"), low.active():
        raise RuntimeError("boom")
    after = _weights(svf.model)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)  # the very same tensors
    assert svf.model.lm_head.weight is svf.model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(svf.model(input_ids=ids).logits, full)


def test_trainable_weights_are_never_copied():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        make_tiny_llama(64), LoraConfig(r=4, target_modules=["gate_proj", "up_proj"])
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    low = LowPrecisionWeights(model, torch.bfloat16)
    ids = torch.randint(3, 60, (1, 6))
    with low.active():
        logits = model(input_ids=ids).logits
        assert all(p.dtype == torch.float32 for p in trainable)
    logits.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    assert any(float(p.grad.abs().sum()) > 0 for p in trainable)


def test_a_bf16_step_points_the_way_the_fp32_one_does(svf):
    """(That each moves log π the way its reward asks: test_engine's reward-sign test.)"""
    samples = [
        Sample([1, 5, 9, 12, 40], [50, 60, 70, 2], reward=1.0),
        Sample([1, 7, 3, 30], [80, 20, 2], reward=-2.0),
    ]
    z0 = np.ones(svf.z_size, dtype=np.float32)
    steps = []
    for dtype in ("float32", "bfloat16"):
        cfg = LearningConfig(lr=1e-2, inner_steps=3, max_step=5.0, compute_dtype=dtype)
        res = reinforce_step(svf, z0, samples, 0.0, cfg)
        assert res.status == "updated"
        steps.append(res.z - z0)
    a, b = steps
    assert not np.array_equal(a, b)  # the bf16 path really ran
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.9
    # the served model is untouched by the update's low-precision copies
    assert next(iter(svf.layers.values())).U.dtype == torch.float32


def test_only_full_precision_updates_run_the_shared_prefix_once(svf):
    """`learning.shares_prefix`: with bf16 products a separate prefix pass cost more than
    the rows it saves (`bench.update_step`), so those passes run every row whole."""
    prefix = list(range(3, 15))  # 12 shared tokens: enough to share (at least 8)
    samples = [
        Sample(prefix + [40, 41], [50, 60, 2], reward=1.0),
        Sample(prefix + [42], [80, 20, 2], reward=-2.0),
    ]
    calls = []
    hook = svf.model.model.register_forward_hook(
        lambda m, a, kw, out: calls.append(1), with_kwargs=True
    )
    z0 = np.ones(svf.z_size, dtype=np.float32)
    try:
        for dtype, per_pass in (("float32", 2), ("bfloat16", 1)):
            calls.clear()
            cfg = LearningConfig(inner_steps=3, compute_dtype=dtype)
            assert reinforce_step(svf, z0, samples, 0.0, cfg).status == "updated"
            assert len(calls) == 3 * per_pass, dtype  # the decoder's calls: 3 inner steps
    finally:
        hook.remove()


def test_a_non_finite_bf16_update_rolls_back(svf):
    sample = Sample([1, 5, 9], [50, 60, 2], reward=float("nan"))
    z0 = np.ones(svf.z_size, dtype=np.float32)
    res = reinforce_step(svf, z0, [sample], 0.0, LearningConfig(compute_dtype="bfloat16"))
    assert res.status == "rolled_back" and res.z is None and "non-finite" in res.reason


def test_a_stale_samples_weight_compares_like_with_like(svf):
    """Its old log-prob was recorded by the fp32 model that answered; a bf16 log-prob
    now would put bf16's rounding into the ratio, so the weight is the fp32 update's."""
    prompt, answer = [1, 5, 9, 12, 40, 7, 33], [50, 60, 70, 80, 90, 2]
    with torch.no_grad():
        z1 = torch.ones(svf.z_size)
        now = float(sequence_logprobs(svf, z1, [Sample(prompt, answer)])[0][0])
        with svf.compute_precision("bfloat16"):
            now_bf16 = float(sequence_logprobs(svf, z1, [Sample(prompt, answer)])[0][0])
    assert now_bf16 != now  # bf16 really differs, so the check below can fail
    weights = {}
    for dtype in ("float32", "bfloat16"):
        stale = Sample(prompt, answer, reward=1.0, old_logprob=now - 0.3, staleness=1)
        res = reinforce_step(
            svf,
            np.ones(svf.z_size, dtype=np.float32),
            [stale],
            0.0,
            LearningConfig(compute_dtype=dtype),
        )
        assert res.status == "updated"
        weights[dtype] = res.metrics["mean_weight"]
    assert weights["float32"] == pytest.approx(np.exp(0.3), rel=1e-4)
    assert weights["bfloat16"] == pytest.approx(weights["float32"], rel=1e-5)


# SmolLM2's LM head as `load_model` stores it on a CPU (input-major), its backward pass
# fed 32 rows: the product that killed an eval process with SIGFPE inside oneDNN (see
# gesal_core.svf.precision.SAFE_ROWS). Run in a child process, since the failure is a
# signal, not an exception; on CPUs without AMX or with another L2 size the bare product
# survives, and the row count checked below is what keeps the guard in place.
_HEAD_SCRIPT = """
import torch
from torch import nn
from gesal_core.layout import input_major
from gesal_core.svf.precision import LowPrecisionWeights
torch.manual_seed(0)
head = nn.Linear(576, 49152, bias=False).requires_grad_(False)
head.weight = nn.Parameter(input_major(head.weight.detach()), requires_grad=False)
model = nn.Sequential(head)
seen = []
x = torch.randn(4, 8, 576, requires_grad=True)
with LowPrecisionWeights(model, torch.bfloat16).active():
    # (registered after the guard's own hooks, so it sees what the product gets)
    head.register_forward_pre_hook(lambda m, a: seen.append(a[0].numel() // a[0].shape[-1]))
    out = model(x)
out.float().square().sum().backward()
ref_x = x.detach().clone().requires_grad_(True)
ref = ref_x @ head.weight.T
ref.square().sum().backward()
assert out.shape == (4, 8, 49152), out.shape
err = float((out.float() - ref).abs().max() / ref.abs().max())
gerr = float((x.grad - ref_x.grad).norm() / ref_x.grad.norm())
print(seen, err, gerr)
assert err < 0.02 and gerr < 0.02, (err, gerr)
assert min(seen) >= 33, seen
"""


def test_a_wide_layers_backward_never_sees_32_rows_in_bf16():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _HEAD_SCRIPT],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert proc.stdout.startswith("[33]")  # the hook saw the padded rows, not 32
