"""Re-judge the held-out answers stored in `gesal-bot eval` JSON with the current
degenerate-answer rules (gesal_core.guard.judge_answers, which the
evaluation uses) and the current key-fact lists (gesal_core.evaluation.fact_rate).

Why: a rule added after a run (say, a new kind of collapse seen in its answers) changes
what the run's degenerate rate should read, and rerunning 128 votes takes an hour. This
prints both rates per seed and checkpoint, and each answer the current rules flag, so a
reader can check the verdicts. It judges the answers; it does not replay the learning,
which the new rule would also have changed (the guard uses the same rules).

It also prints how many key facts the task's simulated member keeps when correcting the
base model's answers (the 0-vote ones): a community whose corrections drop content
teaches the bot to drop it, and that is the level to read a run's key facts against.

    python scripts/rejudge_eval.py eval-results/eval-brevity.json
"""

from __future__ import annotations

import argparse
import json

from gesal_core.evaluation import fact_rate, load_task, split_samples
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
    base: dict[str, tuple] = {}  # task -> (task, prompts, base answers) at 0 votes
    for path in args.json:
        with open(path) as f:
            runs = json.load(f)["runs"]
        for run in runs:
            try:
                task = load_task(run["task"])
            except ValueError:  # an own task whose file is not here: no key facts
                task = None
            for cp in run["checkpoints"]:
                prompts, answers = split_samples(cp["samples"])
                reasons = judge_answers(svf, lm.tokenizer, prompts, answers, args.system)
                now = sum(r is not None for r in reasons) / len(reasons)
                facts = task and fact_rate(task, prompts, answers)
                if cp["votes"] == 0 and task is not None and getattr(task, "correct", None):
                    seen = base.setdefault(task.name, (task, [], []))
                    seen[1].extend(prompts)
                    seen[2].extend(answers)
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
    for name, (task, prompts, answers) in base.items():
        fixed = [task.correct(q, a) for q, a in zip(prompts, answers, strict=True)]
        before, after = fact_rate(task, prompts, answers), fact_rate(task, prompts, fixed)
        if before is not None:
            print(
                f"\n{name}: key facts in the base model's answers (0 votes, {len(prompts)} "
                f"answers): {before:.0%}; in the simulated member's corrections of them: "
                f"{after:.0%}"
            )


if __name__ == "__main__":
    main()
