"""How many corrections does a preference the base model never shows need?

    python -m bench.corrections [--rounds 6] [--per-round 4] [--opener "Sure!"]
                                [--optimizer adam --lr 1e-3 --inner-steps 4 --max-step 1.0]
                                [--l2 0.05] [--demo-focus 0.5]

One channel, one node (θ = -1), the real model, the engine's learning defaults unless
overridden. Each round answers ``--per-round`` training questions, votes each 👎 and
corrects it to "<opener> <the answer>", then trains; after each round it prints the mean
log-probability of the opener on held-out questions and the share of greedy held-out
answers that start with it (see gesal_core/correction_curve.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, replace

import torch

from bench.common import apply_threads, base_args, report
from gesal_core.correction_curve import correction_curve
from gesal_core.engine import Engine, EngineConfig
from gesal_core.evaluation import HELDOUT_QUESTIONS, QUESTIONS
from gesal_core.learning import LearningConfig


def main() -> None:
    ap = base_args(__doc__.splitlines()[0], repeats=1)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=4)
    ap.add_argument("--opener", default="Sure!")
    ap.add_argument("--heldout", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizer", choices=["adam", "ngd"], default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--inner-steps", type=int, default=None)
    ap.add_argument("--max-step", type=float, default=None)
    ap.add_argument("--l2", type=float, default=None, help="pull of z towards ones (λ)")
    ap.add_argument(
        "--demo-focus",
        type=float,
        default=None,
        help="share of a correction's weight on the tokens it changed (LearningConfig)",
    )
    ap.add_argument(
        "--drop-corrected-votes",
        action="store_true",
        help="learn a corrected reply from its correction only (correction_replaces_vote)",
    )
    args = ap.parse_args()
    apply_threads(args.threads)
    torch.manual_seed(args.seed)  # the same sampled answers for every variant
    if args.quick:
        args.rounds, args.per_round, args.heldout = 1, 2, 2
    changes = {
        k: v
        for k, v in dict(
            optimizer=args.optimizer,
            lr=args.lr,
            inner_steps=args.inner_steps,
            max_step=args.max_step,
            l2=args.l2,
            demo_focus=args.demo_focus,
        ).items()
        if v is not None
    }
    if args.drop_corrected_votes:
        changes["correction_replaces_vote"] = True
    learning = replace(LearningConfig(), **changes)
    engine = Engine.load(args.model, config=EngineConfig(learning=learning))
    try:
        points = asyncio.run(
            correction_curve(
                engine,
                QUESTIONS,
                HELDOUT_QUESTIONS[: args.heldout],
                args.opener,
                args.rounds,
                args.per_round,
            )
        )
    finally:
        engine.close()
    rows = [
        {
            "round": p.round,
            "corrections": p.corrections,
            "log p(opener)": round(p.opener_logprob, 3),
            "greedy compliance": round(p.greedy_compliance, 3),
            "training": p.status,
            "seconds": round(p.seconds, 1),
        }
        for p in points
    ]
    name = "corrections-drop-votes" if args.drop_corrected_votes else "corrections"
    if args.l2 is not None:
        name += f"-l2-{args.l2:g}"
    if args.demo_focus is not None:
        name += f"-focus-{args.demo_focus:g}"
    report(
        name,
        rows,
        {
            "model": engine.model_name,
            "learning": asdict(learning),
            "opener": args.opener,
            "per_round": args.per_round,
            "samples": [p.sample for p in points],
        },
    )
    print("\nheld-out greedy answer after each round:")
    for p in points:
        print(f"  round {p.round}: {p.sample!r}")


if __name__ == "__main__":
    main()
