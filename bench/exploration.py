"""What does exploration do for preferences the base model rarely shows?

    python -m bench.exploration [--tasks opener,emoji,brevity] [--samples 8] [--widest 1.0]

A community can only vote 👍 on what the bot shows. When most of a node's recent votes are
👎 the engine can raise its sampling temperature from ``sampling.temperature`` up to
``explore_max_temperature``, inside the same top-p nucleus (`Responder.explore`); that
bound is the sampling temperature by default (no widening), so the widest setting
measured is ``--widest`` (1.0 unless given). This script samples the base model (z = 1,
as every node starts) on each task's *training* prompts at the narrow setting, half-way,
the widest bound and an open nucleus (temperature 1.2, top-p 1, which the engine never
samples from: it makes answers degenerate), and prints per setting:

* the like rate: the share of answers the task's simulated member votes 👍;
* P(👍 in a round): the chance that a training round of 8 answers holds at least one 👍,
  ``1 − (1 − p)^8``; with no 👍 the votes alone teach nothing (corrections must);
* the on-topic and degenerate rates of the same answers, judged as `gesal-bot eval` does.
"""

from __future__ import annotations

import torch

from bench.common import apply_threads, base_args, model_meta, report
from gesal_core.engine import EngineConfig
from gesal_core.evaluation import Harness, load_task
from gesal_core.generate import SamplingConfig, build_prompt, generate
from gesal_core.model import load_model
from gesal_core.svf import SVFConfig, SVFModel

ROUND = 8  # answers per training round in `gesal-bot eval`
OPEN_NUCLEUS = (1.2, 1.0)  # (temperature, top_p) past any bound the engine allows


def settings(cfg: EngineConfig, widest: float) -> list[tuple[str, float, float]]:
    """(name, temperature, top_p): the engine's sampling widened up to ``widest``, plus the
    open nucleus (`OPEN_NUCLEUS`) for comparison."""
    lo, hi, top_p = cfg.sampling.temperature, widest, cfg.sampling.top_p
    return [
        ("narrow (votes mostly 👍)", lo, top_p),
        ("half-way (75% 👎)", (lo + hi) / 2, top_p),
        ("widest (all 👎)", hi, top_p),
        ("open nucleus", *OPEN_NUCLEUS),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__, repeats=1)
    ap.add_argument("--tasks", default="opener,emoji,brevity")
    ap.add_argument("--samples", type=int, default=8, help="answers per prompt and setting")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=32, help="rows per generate call")
    ap.add_argument(
        "--widest",
        type=float,
        default=1.0,
        help="widest temperature measured (the engine's bound, explore_max_temperature, "
        "is 0.7 by default: no widening)",
    )
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    samples = 2 if args.quick else args.samples
    lm = load_model(args.model, progress=False)
    tok = lm.tokenizer
    svf = SVFModel(lm.model, lm.name, SVFConfig(progress=False))
    cfg = EngineConfig(sampling=SamplingConfig(max_new_tokens=args.max_new_tokens))
    harness = Harness(svf, tok, cfg)
    rows = []
    for name in args.tasks.split(","):
        task = load_task(name.strip())
        prompts = list(task.train)
        built = [build_prompt(tok, [{"role": "user", "content": p}], cfg.system) for p in prompts]
        for label, temperature, top_p in settings(cfg, args.widest):
            sampling = SamplingConfig(
                max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=top_p
            )
            liked, topical, degenerate, examples = [], [], [], []
            for r in range(samples):  # one pass over the prompts per sample round
                torch.manual_seed(1000 * r + 7)
                answers = []
                for i in range(0, len(built), args.batch):
                    outs = generate(svf.model, tok, built[i : i + args.batch], sampling)
                    answers += [o.text for o in outs]
                liked += [task.complies(p, a) for p, a in zip(prompts, answers, strict=True)]
                on, bad = harness.quality(prompts, answers)
                topical.append(on)
                degenerate.append(bad)
                pairs = zip(prompts, answers, strict=True)
                examples += [a for p, a in pairs if task.complies(p, a)]
            p_like = sum(liked) / len(liked)
            rows.append(
                {
                    "task": task.name,
                    "setting": label,
                    "temperature": temperature,
                    "top_p": top_p,
                    "answers": len(liked),
                    "like_rate": p_like,
                    "p_like_in_round": 1 - (1 - p_like) ** ROUND,
                    "on_topic": sum(topical) / len(topical),
                    "degenerate": sum(degenerate) / len(degenerate),
                    "liked_examples": [e[:100] for e in examples[:3]],
                }
            )
            print(
                f"{task.name:8s} {label:26s} like {p_like:6.1%}  "
                f"P(👍 in a round of {ROUND}) {rows[-1]['p_like_in_round']:6.1%}  "
                f"on-topic {rows[-1]['on_topic']:6.1%}  degenerate {rows[-1]['degenerate']:6.1%}",
                flush=True,
            )
    table = [{k: v for k, v in r.items() if k != "liked_examples"} for r in rows]
    report(
        "exploration",
        table,
        {
            **model_meta(lm),
            "samples_per_prompt": samples,
            "max_new_tokens": args.max_new_tokens,
            "liked_examples": {f"{r['task']} / {r['setting']}": r["liked_examples"] for r in rows},
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
