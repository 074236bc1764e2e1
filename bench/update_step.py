"""Time of one learning update on k rated samples: SVF (z only) vs PEFT LoRA r=8.

    python -m bench.update_step [--repeats 3] [--sizes 1,4,16]

Both run the same REINFORCE objective with the same inner steps on the same samples:
SVF through `gesal_core.learning.reinforce_step`, LoRA through the evaluation harness's
`LoraLearner.train` (the evaluation's LoRA baseline). Samples are real prompts with
greedy answers of ``--tokens`` tokens, votes alternating 👍/👎, `LearningConfig()`
defaults (its inner steps are recorded in the JSON).

Each is measured with the update's products in fp32 and in bf16
(`LearningConfig.compute_dtype`, `gesal_core.svf.precision`); the model itself is fp32
in both. "auto", the default, picks bf16 where this machine runs it faster; the JSON
records what it picked, and how far the bf16 step points from the fp32 one.

"all cores" is the same SVF update under as many torch threads as the machine has
cores: the bot does not limit torch's threads, so on a host of its own that is how it
trains (the suite's default of one thread is for a shared host, see `bench.common`).

A further variant, "svf plain", runs the same fp32 `reinforce_step` with the plain
log-prob computation (full forward, logits at every position, full-vocabulary
log_softmax), which the optimised `sequence_logprobs` must equal, so the speed-up of the
optimised one is measured side by side and its step checked against the plain one.

"compiled" variants are the bf16 update with `LearningConfig.compile` on: the passes run
through the model's forward under `torch.compile` (`gesal_core.svf.compiled`), compiled
once before the timed rounds; the JSON records how long that took. A smoke run
(``--quick``) leaves them out: compiling takes minutes.

"shared prefix" variants flip `learning.shares_prefix`, the rule for running the prompt
prefix every sample shares once: bf16 updates with it forced on, fp32 ones with it forced
off, so each choice the rule makes is measured against the other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from unittest import mock

import numpy as np
import torch

from bench.common import (
    apply_threads,
    base_args,
    cosine,
    greedy_pairs,
    median,
    model_meta,
    report,
    timed,
    with_threads,
)
from gesal_core.engine import EngineConfig
from gesal_core.evaluation import LoraLearner
from gesal_core.learning import (
    LearningConfig,
    Sample,
    reinforce_step,
    warm_up_compiled,
)
from gesal_core.learning.logprobs import batch_tensors
from gesal_core.model import load_model
from gesal_core.svf import SVFConfig, SVFModel


def plain_sequence_logprobs(
    svf, z, samples, max_tokens=512, pad_id=0, share_prefix=False, compiled=False
):
    """The reference computation the optimised `sequence_logprobs` must equal."""
    ids, attn, resp = batch_tensors(samples, max_tokens, pad_id)
    with svf.factored(z):
        logits = svf.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = resp[:, 1:]
    return (logp * mask).sum(-1), mask.sum(-1)


def matmul_gflops(repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best sustained matmul rate of this thread on the update's typical shape (a few
    hundred tokens times a 576x1536 projection): the ceiling for an update."""
    x, w = torch.randn(256, 576).to(dtype), torch.randn(1536, 576).to(dtype)
    best = min(timed(lambda: [x @ w.T for _ in range(20)], repeats))
    return 20 * 2 * 256 * 576 * 1536 / best / 1e9


def update_flops(step, k: int) -> int:
    """FLOPs of one update (forward and backward of every inner step), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(k)
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__)
    ap.add_argument("--sizes", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    sizes = [1, 4] if args.quick else [int(s) for s in args.sizes.split(",")]
    lm = load_model(args.model, progress=False)
    tok = lm.tokenizer
    svf = SVFModel(lm.model, lm.name, SVFConfig(progress=False))
    learning = LearningConfig()
    precision = {
        name: dataclasses.replace(learning, compute_dtype=name) for name in ("float32", "bfloat16")
    }
    compiled = dataclasses.replace(precision["bfloat16"], compile=True)
    pairs = greedy_pairs(svf.model, tok, max(sizes), 8 if args.quick else args.tokens)
    cfg = EngineConfig(learning=learning)
    lora = LoraLearner(
        lambda: load_model(args.model, progress=False).model,
        tok,
        cfg,
        sorted({t.rsplit(".", 1)[-1] for t in svf.target_names}),
    )
    pad = tok.pad_token_id or 0
    z0 = np.ones(svf.z_size, dtype=np.float32)

    def svf_step(k, dtype="float32"):
        samples = [
            Sample(p, r, reward=1.0 if j % 2 == 0 else -2.0) for j, (p, r) in enumerate(pairs[:k])
        ]
        step_cfg = compiled if dtype == "compiled" else precision[dtype]
        res = reinforce_step(svf, z0, samples, 0.0, step_cfg, pad)
        assert res.status == "updated", res.reason
        return res.z

    def svf_sharing_step(k, dtype, share):
        with mock.patch("gesal_core.learning.logprobs.shares_prefix", lambda *_: share):
            return svf_step(k, dtype)

    def svf_plain_step(k):
        with mock.patch("gesal_core.learning.logprobs.sequence_logprobs", plain_sequence_logprobs):
            return svf_step(k)

    def lora_step(k, dtype="float32"):
        lora.cfg = dataclasses.replace(cfg, learning=precision[dtype])
        lora.history = []  # no replay of earlier calls' liked answers: the same k samples
        for j, (p, r) in enumerate(pairs[:k]):
            lora.replies[f"h{j}"] = (p, r, "")
            lora.votes[f"h{j}"] = 1 if j % 2 == 0 else -1
        lora.baseline = 0.0
        res = asyncio.run(lora.train())
        assert res["updated"] == 1, res

    for dtype in precision:  # warm-up (and the low-precision copies are made once)
        svf_step(1, dtype)
        lora_step(1, dtype)
    cores = os.cpu_count() or 1
    compile_s = None
    if not args.quick:
        print("compiling the update passes (minutes on a CPU) …", flush=True)
        compile_s = with_threads(cores, lambda: warm_up_compiled(svf, compiled, pad))
        if svf.compiled_passes.failed:
            raise SystemExit(f"compiling failed: {svf.compiled_passes.failed}")
        print(f"compiled in {compile_s:.1f} s", flush=True)
    auto = "bfloat16" if svf.compute_precision.resolve("auto") is torch.bfloat16 else "float32"

    variants = (
        ("svf", svf_step),
        ("svf_bf16", lambda k: svf_step(k, "bfloat16")),
        ("svf_all_cores", lambda k: with_threads(cores, lambda: svf_step(k))),
        ("svf_bf16_all_cores", lambda k: with_threads(cores, lambda: svf_step(k, "bfloat16"))),
        ("svf_plain", svf_plain_step),
        ("svf_bf16_shared_prefix", lambda k: svf_sharing_step(k, "bfloat16", True)),
        (
            "svf_bf16_all_cores_shared_prefix",
            lambda k: with_threads(cores, lambda: svf_sharing_step(k, "bfloat16", True)),
        ),
        ("svf_unshared_prefix", lambda k: svf_sharing_step(k, "float32", False)),
        ("lora", lora_step),
        ("lora_bf16", lambda k: lora_step(k, "bfloat16")),
    )
    if compile_s is not None:
        variants += (
            ("svf_bf16_compiled", lambda k: svf_step(k, "compiled")),
            (
                "svf_bf16_all_cores_compiled",
                lambda k: with_threads(cores, lambda: svf_step(k, "compiled")),
            ),
        )
    gflops = matmul_gflops()
    gflops_bf16 = matmul_gflops(dtype=torch.bfloat16)
    print(f"sustained matmul on this thread: fp32 {gflops:.1f}, bf16 {gflops_bf16:.1f} GFLOP/s")
    print(f'compute_dtype "auto" picks {auto} here')
    copies_mb = svf.compute_precision.nbytes() / 2**20  # made by the bf16 warm-up
    print(f"bf16 copies of the frozen weights, kept for updates: {copies_mb:.0f} MB")
    rows, raw, z_diff = [], {}, {}
    for k in sizes:
        # both SVF variants must take the same step (the optimisation is exact maths)
        # (Adam divides by |gradient|, so components whose gradient is ~0 turn float
        # rounding into visible differences: the relative L2 difference of the steps says
        # more than the largest component)
        za, zp, zb = svf_step(k), svf_plain_step(k), svf_step(k, "bfloat16")
        step, step_bf16 = za - z0, zb - z0
        z_diff[k] = {
            "max_abs": float(np.abs(za - zp).max()),
            "relative_l2_of_step": float(np.linalg.norm(za - zp) / np.linalg.norm(zp - z0)),
            # bf16 is not exact: how far its step is from the fp32 one
            "bf16_vs_fp32_cosine": cosine(step, step_bf16),
            "bf16_vs_fp32_relative_l2": float(
                np.linalg.norm(step_bf16 - step) / np.linalg.norm(step)
            ),
        }
        if compile_s is not None:
            # compiled bf16 against eager bf16 (and fp32): the same maths, other rounding
            step_c = svf_step(k, "compiled") - z0
            z_diff[k]["compiled_vs_bf16_cosine"] = cosine(step_c, step_bf16)
            z_diff[k]["compiled_vs_fp32_cosine"] = cosine(step_c, step)
        t: dict[str, list[float]] = {name: [] for name, _ in variants}
        for _ in range(args.repeats):
            for name, fn in variants:
                start = time.perf_counter()
                fn(k)
                t[name].append(time.perf_counter() - start)
        raw[k] = t
        flops = update_flops(svf_step, k)
        # bf16 passes run every row whole (`learning.shares_prefix`): more products
        flops_bf16 = update_flops(lambda k: svf_step(k, "bfloat16"), k)
        m = {name: median(v) for name, v in t.items()}
        s, sb = m["svf"], m["svf_bf16"]
        # the bot's own setting: what "auto" picks, on one thread or on every core
        best = (
            min(m["svf_bf16"], m["svf_bf16_all_cores"])
            if auto == "bfloat16"
            else min(m["svf"], m["svf_all_cores"])
        )
        rows.append(
            {
                "k": k,
                "svf_s": s,
                "svf_bf16_s": sb,
                "fp32_over_bf16": s / sb,
                "svf_all_cores_s": m["svf_all_cores"],
                "svf_bf16_all_cores_s": m["svf_bf16_all_cores"],
                "svf_per_inner_step_s": s / learning.inner_steps,
                "svf_plain_s": m["svf_plain"],
                # > 1: the rule's choice (bf16 unshared, fp32 shared) was the faster one
                "bf16_shared_over_unshared": m["svf_bf16_shared_prefix"] / sb,
                "bf16_all_cores_shared_over_unshared": m["svf_bf16_all_cores_shared_prefix"]
                / m["svf_bf16_all_cores"],
                "fp32_unshared_over_shared": m["svf_unshared_prefix"] / s,
                "plain_over_svf": m["svf_plain"] / s,
                "lora_s": m["lora"],
                "lora_bf16_s": m["lora_bf16"],
                "svf_vs_lora": s / m["lora"],
                "svf_vs_lora_bf16": sb / m["lora_bf16"],
                "svf_gflop": flops / 1e9,
                "svf_flop_bound_s": flops / 1e9 / gflops,
                "svf_bf16_gflop": flops_bf16 / 1e9,
                "svf_bf16_flop_bound_s": flops_bf16 / 1e9 / gflops_bf16,
                "svf_le_1.5s": ("met" if best <= 1.5 else "not met") if k == 4 else "-",
            }
        )
        if compile_s is not None:
            comp, comp_all = m["svf_bf16_compiled"], m["svf_bf16_all_cores_compiled"]
            rows[-1].update(
                {
                    "svf_bf16_compiled_s": comp,
                    "svf_bf16_all_cores_compiled_s": comp_all,
                    # > 1: compiling made the update faster, side by side
                    "bf16_eager_over_compiled": sb / comp,
                    "bf16_all_cores_eager_over_compiled": m["svf_bf16_all_cores"] / comp_all,
                    "compiled_le_1.5s": ("met" if comp_all <= 1.5 else "not met")
                    if k == 4
                    else "-",
                }
            )
    report(
        "update_step",
        rows,
        {
            **model_meta(lm),
            "repeats": args.repeats,
            "inner_steps": learning.inner_steps,
            "learning_config": learning.__dict__,
            "matmul_gflops": gflops,
            "matmul_gflops_bf16": gflops_bf16,
            "auto_compute_dtype": auto,
            "compile_s": compile_s,
            "bf16_weight_copies_mb": copies_mb,
            "z_difference_svf_vs_plain": z_diff,
            "response_tokens": len(pairs[0][1]),
            "cores": cores,
            "trainable_params": {
                "svf": svf.z_size,
                "lora": sum(p.numel() for p in lora.params),
            },
            "times_s": raw,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
