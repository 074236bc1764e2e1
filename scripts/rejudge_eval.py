"""Re-judge the held-out answers stored in `gesal-bot eval` JSON with the current
degenerate-answer rules (gesal_core.guard.judge_answers, which the
evaluation uses) and the current key-fact lists (gesal_core.evaluation.fact_rate).

Why: a rule added after a run (say, a new kind of collapse seen in its answers) changes
what the run's degenerate rate should read, and rerunning 128 votes takes an hour. This
prints both rates per seed and checkpoint, and each answer the current rules flag, so a
reader can check the verdicts. It judges the answers; it does not replay the learning,
which the new rule would also have changed (the guard uses the same rules).

    python scripts/rejudge_eval.py docs/eval/brevity-final/eval-brevity.json
"""

from __future__ import annotations

import argparse
import json

from gesal_core.evaluation import fact_rate, load_task
from gesal_core.guard import judge_answers
from gesal_core.model import load_model
from gesal_core.svf import SVFConfig, SVFModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="eval-*.json files (merged or not)")
    p.add_argument("--system", default=None, help="system prompt the runs used (default: none)")
    args = p.parse_args()
    lm = load_model(None, progress=False)
    svf = SVFModel(lm.model, lm.name, SVFConfig(progress=False))
    print(
        "| file | method | seed | votes | degenerate (recorded) | degenerate (now) "
        "| key facts (now) |"
    )
    print("|---|---|---|---|---|---|---|")
    flagged = []
    for path in args.json:
        with open(path) as f:
            runs = json.load(f)["runs"]
        for run in runs:
            try:
                task = load_task(run["task"])
            except ValueError:  # an own task whose file is not here: no key facts
                task = None
            for cp in run["checkpoints"]:
                pairs = [s.split(" -> ", 1) for s in cp["samples"]]
                prompts = [q for q, _ in pairs]
                answers = [a for _, a in pairs]
                reasons = judge_answers(svf, lm.tokenizer, prompts, answers, args.system)
                now = sum(r is not None for r in reasons) / len(reasons)
                facts = task and fact_rate(task, prompts, answers)
                print(
                    f"| {path} | {run['method']} | {run['seed']} | {cp['votes']} "
                    f"| {cp['degenerate']:.0%} | {now:.0%} "
                    f"| {'–' if facts is None else f'{facts:.0%}'} |"
                )
                flagged += [
                    f"seed {run['seed']}, {cp['votes']} votes: {q} -> {a!r} ({r})"
                    for q, a, r in zip(prompts, answers, reasons, strict=True)
                    if r
                ]
    print("\nFlagged now:")
    print("\n".join(f"- {f}" for f in flagged) or "- none")


if __name__ == "__main__":
    main()
