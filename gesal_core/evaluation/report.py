"""Results: medians per checkpoint, the markdown table, the plot, the JSON, and
``--merge`` of stored runs (judged again with the current rules)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .harness import Checkpoint, EvalConfig, Harness, RunResult, print_progress, split_samples
from .suite import group_of, load_task
from .tasks import Task, fact_rate, sound_rate


def summarise(results: list[RunResult], checkpoints: tuple[int, ...]) -> list[dict]:
    """Median over seeds per (method, checkpoint)."""
    rows = []
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        for c in checkpoints:
            cps = [cp for r in runs for cp in r.checkpoints if cp.votes == c]
            if not cps:
                continue
            drifts = [cp.drift for cp in cps if cp.drift is not None]
            facts = [cp.facts for cp in cps if cp.facts is not None]
            nodes = [cp.nodes for cp in cps if cp.nodes is not None]
            sound = [cp.sound for cp in cps if cp.sound is not None]
            rows.append(
                {
                    "method": method,
                    "votes": c,
                    "compliance": statistics.median(cp.compliance for cp in cps),
                    "on_topic": statistics.median(cp.on_topic for cp in cps),
                    "degenerate": statistics.median(cp.degenerate for cp in cps),
                    "ref_nll": statistics.median(cp.ref_nll for cp in cps),
                    "drift": statistics.median(drifts) if drifts else None,
                    "facts": statistics.median(facts) if facts else None,
                    "nodes": statistics.median(nodes) if nodes else None,
                    "sound": statistics.median(sound) if sound else None,
                    "per_seed": [round(cp.compliance, 3) for cp in cps],
                    "per_seed_sound": [
                        None if cp.sound is None else round(cp.sound, 3) for cp in cps
                    ],
                }
            )
    return rows


def markdown(task: Task, rows: list[dict], results: list[RunResult]) -> str:
    lines = [
        f"### Task `{task.name}`: {task.description}",
        "",
        "| method | votes | compliance (median) | per seed | sound (per seed) | on-topic "
        "| degenerate | key facts | ref NLL | ‖z−1‖ | nodes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        seeds = ", ".join(f"{x:.0%}" for x in r["per_seed"])
        sound = "–"
        if r.get("sound") is not None:
            each = ", ".join("–" if x is None else f"{x:.0%}" for x in r["per_seed_sound"])
            sound = f"{r['sound']:.0%} ({each})"
        drift = "–" if r.get("drift") is None else f"{r['drift']:.2f}"
        facts = "–" if r.get("facts") is None else f"{r['facts']:.0%}"
        nodes = "–" if r.get("nodes") is None else f"{r['nodes']:g}"
        lines.append(
            f"| {r['method']} | {r['votes']} | {r['compliance']:.0%} | {seeds} | {sound} | "
            f"{r['on_topic']:.0%} | {r['degenerate']:.0%} | {facts} | {r['ref_nll']:.2f} "
            f"| {drift} | {nodes} |"
        )
    if task.constant_answer_level is not None:
        lines.append(f"\nA constant answer would score {task.constant_answer_level:.0%}.")
    lines.append(
        "\n*sound*: answers that comply **and** stay on-topic **and** are not degenerate, "
        "so compliance bought with collapse does not count."
    )
    lines.append(
        "\n| method | seed | first 👍 at vote | corrections | updates (halved) | "
        "skipped (settled) | rolled back | s/vote | s/update |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r.method == "none":
            continue
        lines.append(
            f"| {r.method} | {r.seed} | {r.first_upvote or '-'} | {r.corrections} | "
            f"{r.updates} ({r.halved}) | "
            f"{r.skipped} ({r.settled}) | {r.rolled_back} | {r.seconds_per_vote:.2f} | "
            f"{r.seconds_per_update:.2f} |"
        )
    checked = [cp.isolation for r in results for cp in r.checkpoints if cp.isolation is not None]
    if checked:
        exact = "exact" if max(checked) == 0 else "**NOT exact**"
        lines.append(
            f"\nTwo-channel isolation ({len(checked)} checkpoints of the runs with a graph): "
            f"another channel's logits, z and version moved by at most {max(checked):g}: "
            f"{exact}."
        )
    lines.append("\nHeld-out answers at the last checkpoint (first seed of each method):\n")
    shown = set()
    for r in results:
        if r.method in shown or not r.checkpoints:
            continue
        shown.add(r.method)
        last = r.checkpoints[-1]
        lines.append(f"- **{r.method}** ({last.votes} votes), predictions {last.predictions}:")
        lines.extend(f"  - `{x[:160]}`" for x in last.samples)
        if last.probes:
            lines.append("  - unrelated probes:")
            lines.extend(f"    - `{x[:160]}`" for x in last.probes)
    return "\n".join(lines) + "\n"


def suite_table(runs: dict[str, list[RunResult]], checkpoints: tuple[int, ...]) -> str:
    """One table of many tasks' runs, grouped as `suite.group_of` says: medians over
    seeds at every checkpoint, the same figures as each task's own table."""

    def cell(rows: list[dict], key: str) -> str:
        return " / ".join("–" if r.get(key) is None else f"{r[key]:.0%}" for r in rows)

    lines = [
        f"| group | task | method | sound % at {' / '.join(map(str, checkpoints))} votes "
        "| compliance % | degenerate % | on-topic % | key facts % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(
        runs, key=lambda name: ("development", "held out", "other").index(group_of(name))
    )
    for name in order:
        rows = summarise(runs[name], checkpoints)
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            lines.append(
                f"| {group_of(name)} | {name} | {method} | {cell(mine, 'sound')} | "
                f"{cell(mine, 'compliance')} | {cell(mine, 'degenerate')} | "
                f"{cell(mine, 'on_topic')} | {cell(mine, 'facts')} |"
            )
    return "\n".join(lines) + "\n"


def plot(task: Task, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("compliance", "held-out compliance"),
        ("sound", "compliant, on-topic, not degenerate"),
        ("on_topic", "on-topic rate"),
        ("degenerate", "degenerate rate"),
        ("facts", "answers naming a key fact"),
        ("ref_nll", "reference NLL (drift from the base model's answers)"),
    ]
    panels = [(k, t) for k, t in panels if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.6))
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        for ax, (key, _) in zip(axes, panels, strict=True):
            pts = [(r["votes"], r[key]) for r in rs if r.get(key) is not None]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=method)
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("votes")
        if key != "ref_nll":  # rates; NLL is in nats per token
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    if task.constant_answer_level is not None:
        axes[0].axhline(task.constant_answer_level, color="grey", linestyle="--", linewidth=1)
        axes[0].annotate("one constant answer", (0, task.constant_answer_level), fontsize=8)
    axes[0].legend()
    fig.suptitle(f"{task.name}: median of seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_from_dict(d: dict, task: Task | None = None) -> RunResult:
    """A stored run; checkpoints stored without key facts get them judged from their
    stored answers (the same `fact_rate`, so every run compares)."""
    cps = [Checkpoint(**c) for c in d.get("checkpoints", [])]
    for cp in cps:
        split = split_samples(cp.samples) if cp.facts is None and task is not None else None
        if split:
            cp.facts = fact_rate(task, *split)
    return RunResult(**{**d, "checkpoints": cps})


def write_results(out: Path, task: Task, results: list[RunResult], meta: dict) -> str:
    """The markdown table, JSON and PNG of a task's runs; returns the markdown."""
    checkpoints = tuple(sorted({cp.votes for r in results for cp in r.checkpoints}))
    rows = summarise(results, checkpoints)
    md = markdown(task, rows, results)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"eval-{task.name}"
    (out / f"{stem}.md").write_text(md)
    payload = {
        **meta,
        "constant_answer_level": task.constant_answer_level,
        "summary": rows,
        "runs": [asdict(r) for r in results],
    }
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    plot(task, rows, out / f"{stem}.png")
    return md


def _tasks_of(doc: dict) -> set[str | None]:
    """The task a results file is about: its config's, or (a merged file has no config of
    its own) the one its runs name."""
    task = doc.get("config", {}).get("task")
    return {task} if task else {r.get("task") for r in doc.get("runs", [])} or {None}


def judge_sound(
    results: list[RunResult],
    task: Task,
    harness: Harness,
    progress: Callable[[str], None] = print_progress,
) -> list[str]:
    """Fill in `Checkpoint.sound` where a stored run lacks it, from its stored answers.

    The verdicts are the ones a run makes (`Harness.verdicts`, base model), so every run
    compares. Returns a line for every checkpoint whose re-judged on-topic or degenerate
    rate differs from the one recorded (the run was judged by other rules): its *sound*
    rate then follows the current rules, not the recorded rates.
    """
    notes = []
    for r in results:
        judged = 0
        for cp in r.checkpoints:
            split = split_samples(cp.samples) if cp.sound is None else None
            if not split:
                continue
            judged += 1
            topical, bad = harness.verdicts(*split)
            cp.sound = sound_rate(task, *split, topical, bad)
            now = (float(np.mean(topical)), float(np.mean(bad)))
            if not np.allclose(now, (cp.on_topic, cp.degenerate)):
                notes.append(
                    f"{r.method} seed {r.seed}, {cp.votes} votes: on-topic/degenerate "
                    f"recorded {cp.on_topic:.0%}/{cp.degenerate:.0%}, judged now "
                    f"{now[0]:.0%}/{now[1]:.0%}"
                )
        if judged:
            progress(f"  judged {r.method} seed {r.seed}: {judged} checkpoint(s)")
    return notes


def _max_new_tokens(docs: list[dict]) -> int:
    """The answer length the merged runs used (the base model's reference answers, which
    on-topic is judged against, are that long)."""
    configs = [d.get("config") for d in docs]
    configs += [m.get("config") for d in docs for m in d.get("merged_from", [])]
    lengths = {c["max_new_tokens"] for c in configs if c and "max_new_tokens" in c}
    if len(lengths) > 1:
        raise ValueError(f"the runs used different answer lengths: {sorted(lengths)}")
    return lengths.pop() if lengths else EvalConfig.max_new_tokens


def merge(paths: list[str], out: str, harness: Callable[[int], Harness] | None = None) -> int:
    """`gesal-bot eval --merge`: one table from runs written by several processes.

    Runs stored without the *sound* rate get it judged from their stored answers when
    ``harness`` (answer length -> a `Harness` on the base model) is given; it is only
    called if some checkpoint needs it, since that loads the model."""
    docs = []
    for p in paths:
        try:
            docs.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read eval results {p}: {exc}") from None
    tasks = {t for d in docs for t in _tasks_of(d)}
    if len(tasks) != 1:
        raise ValueError(f"the files are from different tasks: {sorted(map(str, tasks))}")
    task = load_task(tasks.pop())
    results = [_run_from_dict(r, task) for d in docs for r in d.get("runs", [])]
    asked = next(
        (s[0] for r in results for cp in r.checkpoints if (s := split_samples(cp.samples))), None
    )
    if asked:  # the held-out prompts the runs answered (`--heldout` may have cut the list)
        task.heldout = asked
    unjudged = sum(cp.sound is None for r in results for cp in r.checkpoints)
    if unjudged and harness is not None:
        print_progress(
            f"judging the stored answers of {unjudged} checkpoint(s) for the sound rate ..."
        )
        for note in judge_sound(results, task, harness(_max_new_tokens(docs))):
            print_progress(f"  note: {note}")
    meta = {
        "merged_from": [
            {
                "file": str(p),
                "config": d.get("config"),
                "learning": d.get("learning"),
                "guard": d.get("guard"),
            }
            for p, d in zip(paths, docs, strict=True)
        ],
        "model": docs[0].get("model"),
    }
    md = write_results(Path(out), task, results, meta)
    print(md)
    print(f"written: {Path(out) / f'eval-{task.name}'}.json, .md, .png")
    return 0
