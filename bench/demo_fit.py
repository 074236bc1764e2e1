"""How far can each adapter go on the same corrections? SVF z against LoRA r=8.

    python -m bench.demo_fit [--task emoji] [--demos 16] [--updates 8]
                             [--svf-lr 3e-3,6e-3] [--lora-lr 1e-3]
                             [--adapters svf,svf-persistent,lora]

On emoji, gesal reaches held-out compliance later than LoRA under the same votes and
corrections (docs/learning.md); larger steps, guard variants and focused corrections
reach it sooner only with looping answers. This asks whether the adapter itself is the
limit, without votes, routing, settling or the guard in the way:

* the base model answers ``--demos`` training questions (sampled, as the bot would) and
  the task's member corrects every answer, as in `gesal-bot eval`;
* each learner then takes ``--updates`` updates on those same corrections, each update
  as its method takes one in the eval:
  - ``svf``: gesal's `reinforce_steps` (a fresh Adam, 4 steps, the pull λ of
    `LearningConfig.l2`, ‖Δz‖ bounded at lr × 1000, i.e. 3 at the default 3e-3; ``--l2``
    changes the pull);
  - ``svf-persistent``: the LoRA baseline's rule on SVF's z (one Adam kept across
    updates, no pull, no step bound);
  - ``lora``: the eval's LoRA r=8 baseline (`adam_update`, a persistent Adam at 1e-3);
* after every update it judges greedy answers to the held-out questions the way the
  eval does: compliance, on-topic, degenerate, key facts, and the reference NLL of the
  base model's own answers (how far the model has moved).

Read the table as a path per learner: how many updates it takes to comply, and what the
answers have lost by then. At equal compliance, a higher reference NLL or fewer key
facts is a worse trade. In the eval, 16 votes are two updates (8 corrections, then 16).
docs/learning.md ("The update" and "Tried and rejected") has the emoji figures.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

import numpy as np
import torch

from bench.common import apply_threads, base_args, model_meta, report
from gesal_core.engine import EngineConfig
from gesal_core.evaluation import (
    LORA_LR,
    Harness,
    adam_update,
    fact_rate,
    load_task,
    lora_scorer,
)
from gesal_core.generate import SamplingConfig, build_prompt, generate
from gesal_core.learning import (
    LearningConfig,
    Sample,
    correction_sample,
    plan_batch,
    reinforce_step,
    response_logprobs,
    sequence_logprobs,
)
from gesal_core.model import load_model
from gesal_core.svf import SVFConfig, SVFModel


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


class Fit:
    """The shared pieces: model, judge, task, held-out prompts and the corrections."""

    def __init__(self, args):
        self.lm = load_model(args.model)
        self.tok = self.lm.tokenizer
        self.pad = self.tok.pad_token_id or 0
        self.svf = SVFModel(self.lm.model, self.lm.name, SVFConfig())
        self.cfg = EngineConfig(sampling=SamplingConfig(max_new_tokens=args.tokens))
        self.harness = Harness(
            self.svf,
            self.tok,
            self.cfg,
            model_factory=lambda: load_model(args.model, progress=False).model,
        )
        self.task = load_task(args.task)
        self.heldout = list(self.task.heldout)[: args.heldout]
        self.greedy = SamplingConfig(max_new_tokens=args.tokens, temperature=0)
        self.demos, self.examples = self._corrections(args.demos, args.seed)

    def _built(self, prompts: list[str]):
        return [
            build_prompt(self.tok, [{"role": "user", "content": p}], self.cfg.system)
            for p in prompts
        ]

    def _corrections(self, n: int, seed: int) -> tuple[list[Sample], list[str]]:
        """The base model's sampled answers to n training questions, each corrected by the
        task's member (every one: a member who wants what the base model never does
        votes every answer down)."""
        rng = random.Random(seed)
        prompts = [rng.choice(self.task.train) for _ in range(n)]
        torch.manual_seed(seed)
        with self.svf.factored(self.svf.ones().expand(n, -1)):
            outs = generate(self.svf.model, self.tok, self._built(prompts), self.cfg.sampling)
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        demos, examples = [], []
        for p, o in zip(prompts, outs, strict=True):
            better = self.task.correct(p, o.text).strip()
            ids = self.tok(better, add_special_tokens=False)["input_ids"]
            demos.append(correction_sample(o.prompt_ids, o.response_ids, list(ids) + eos, 0.0))
            examples.append(f"{p} -> {better}")
        return demos, examples

    @torch.inference_mode()
    def judge(self, answers: list[str], ref_nll: float) -> dict:
        prompts = self.heldout
        on_topic, degenerate = self.harness.quality(prompts, answers)
        facts = fact_rate(self.task, prompts, answers)
        return {
            "compliance": float(
                np.mean([self.task.complies(p, a) for p, a in zip(prompts, answers, strict=True)])
            ),
            "on_topic": on_topic,
            "degenerate": degenerate,
            "key_facts": float("nan") if facts is None else facts,
            "ref_nll": ref_nll,
        }

    def references(self) -> list[Sample]:
        return self.harness.reference(self.heldout)


def svf_path(fit: Fit, lr: float, updates: int, inner_steps: int, l2: float | None = None):
    """gesal's update rule on one z (its own pull λ unless ``l2`` is given): yields
    (update, held-out answers, ref NLL, ‖z − 1‖) from update 0, the base model, on."""
    cfg = LearningConfig(lr=lr, max_step=1000 * lr, inner_steps=inner_steps, replay=0)
    cfg = cfg if l2 is None else replace(cfg, l2=l2)
    z = np.ones(fit.svf.z_size, dtype=np.float32)
    for u in range(updates + 1):
        if u:
            result = reinforce_step(fit.svf, z, fit.demos, 0.0, cfg, fit.pad)
            if result.z is None:
                raise RuntimeError(f"update {u} was not taken: {result.status} {result.reason}")
            z = result.z
        yield u, *_judged_svf(fit, torch.from_numpy(z)), float(np.linalg.norm(z - 1))


def svf_persistent_path(fit: Fit, lr: float, updates: int, inner_steps: int):
    """The LoRA baseline's update rule on SVF's z: one Adam kept across updates, no pull,
    no step bound. Set beside `svf_path`, it tells the update rule from the adapter."""
    lc = LearningConfig(inner_steps=inner_steps, replay=0)
    z = fit.svf.trainable()
    opt = torch.optim.Adam([z], lr=lr)

    def score(samples: list[Sample]):
        with fit.svf.compute_precision(lc.compute_dtype):
            return sequence_logprobs(fit.svf, z, samples, lc.max_tokens, fit.pad)

    for u in range(updates + 1):
        if u:
            adam_update([z], opt, plan_batch(fit.demos, 0.0, lc), lc, score)
        zt = z.detach()
        yield u, *_judged_svf(fit, zt), float((zt - 1).norm())


def _judged_svf(fit: Fit, z: torch.Tensor) -> tuple[list[str], float]:
    """Greedy held-out answers and the reference NLL under z."""
    with torch.inference_mode():
        with fit.svf.factored(z.expand(len(fit.heldout), -1)):
            outs = generate(fit.svf.model, fit.tok, fit._built(fit.heldout), fit.greedy)
        lp, n = sequence_logprobs(fit.svf, z, fit.references(), pad_id=fit.pad)
    return [o.text for o in outs], float(-lp.sum() / n.sum())


def lora_path(fit: Fit, lr: float, updates: int, inner_steps: int):
    """The eval's LoRA baseline on the same corrections: yields as `svf_path` (no z)."""
    learner = fit.harness.learner("lora")  # the same adapter, optimiser and products
    model, params, opt = learner.model, learner.params, learner.opt
    for group in opt.param_groups:
        group["lr"] = lr
    lc = LearningConfig(inner_steps=inner_steps, replay=0)
    score = lora_scorer(model, learner.precision, lc, fit.pad)
    for u in range(updates + 1):
        if u:
            adam_update(params, opt, plan_batch(fit.demos, 0.0, lc), lc, score)
        with torch.inference_mode():
            outs = generate(model, fit.tok, fit._built(fit.heldout), fit.greedy)
            lp, n = response_logprobs(model, fit.references(), 512, fit.pad)
        yield u, [o.text for o in outs], float(-lp.sum() / n.sum()), None


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__.splitlines()[0], repeats=1)
    ap.add_argument("--task", default="emoji", help="a built-in task or path.py:Name")
    ap.add_argument("--demos", type=int, default=16, help="corrections to fit")
    ap.add_argument("--updates", type=int, default=8)
    ap.add_argument("--inner-steps", type=int, default=LearningConfig().inner_steps)
    ap.add_argument("--adapters", default="svf,svf-persistent,lora")
    ap.add_argument("--svf-lr", default=str(LearningConfig().lr), help="comma-separated")
    ap.add_argument("--lora-lr", default=str(LORA_LR), help="comma-separated")
    ap.add_argument("--l2", type=float, default=None, help="gesal rule's pull λ (default: its own)")
    ap.add_argument("--heldout", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per answer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="demo_fit", help="results file name")
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    if args.quick:
        args.demos, args.updates, args.heldout, args.tokens = 2, 1, 2, 8
    fit = Fit(args)
    print(f"{len(fit.demos)} corrections, e.g. {fit.examples[0]!r}", flush=True)
    paths = {  # adapter -> (its learning rates, a path per rate)
        "svf": (args.svf_lr, lambda lr: svf_path(fit, lr, args.updates, args.inner_steps, args.l2)),
        "svf-persistent": (
            args.svf_lr,
            lambda lr: svf_persistent_path(fit, lr, args.updates, args.inner_steps),
        ),
        "lora": (args.lora_lr, lambda lr: lora_path(fit, lr, args.updates, args.inner_steps)),
    }
    chosen = [a.strip() for a in args.adapters.split(",") if a.strip()]
    unknown = sorted(set(chosen) - set(paths))
    if unknown:
        ap.error(f"unknown adapter(s) {unknown}; choose from {', '.join(paths)}")
    runs = [(a, lr, paths[a][1](lr)) for a in chosen for lr in _floats(paths[a][0])]
    rows, answers = [], {}
    for name, lr, path in runs:
        t0 = time.perf_counter()
        for u, texts, ref_nll, drift in path:
            row = {"adapter": name, "lr": lr, "update": u, **fit.judge(texts, ref_nll)}
            row["drift"] = float("nan") if drift is None else drift
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            answers[f"{name} lr={lr} update={u}"] = [
                f"{p} -> {a}" for p, a in zip(fit.heldout, texts, strict=True)
            ]
            print(
                f"  {name} lr {lr:g} update {u}: compliance {row['compliance']:.0%}, "
                f"on-topic {row['on_topic']:.0%}, degenerate {row['degenerate']:.0%}, "
                f"key facts {row['key_facts']:.0%}, ref NLL {ref_nll:.3f}",
                flush=True,
            )
    report(
        args.name,
        rows,
        {
            **model_meta(fit.lm),
            "task": fit.task.name,
            "seed": args.seed,
            "inner_steps": args.inner_steps,
            "corrections": fit.examples,
            "answers": answers,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
