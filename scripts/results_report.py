"""Build docs/results.md's tables and each task's plot from the runs under docs/results/.

    python scripts/results_report.py          # merge each task's runs, rewrite the tables
    python scripts/results_report.py --check  # exit 1 if docs/results.md is out of date

Each built-in preference task has a folder ``docs/results/<task>/runs/<run>/`` per
repetition of the whole experiment, holding the ``eval-<task>.json`` files that
``gesal-bot eval`` wrote for it (one per seed, or one for all). This script

- merges every run of a task with ``gesal-bot eval --merge``'s code, which writes
  ``docs/results/<task>/eval-<task>.md`` (per seed, with the held-out answers) and
  ``eval-<task>.png`` (the curves);
- fills in the generated blocks: the table of medians over every seed of every run (in
  ``docs/results.md`` and the README), and the spread of the per-run medians where a
  method has more than one run (``docs/results.md``).

`tests/test_results_report.py` regenerates the tables and compares them with the
committed files, so the pages cannot drift from the result files.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
PAGE = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
# generated blocks: the table of medians (README and docs/results.md), the run-to-run spread
TABLE, SPREAD = "results-table", "results-spread"

TASKS = ("emoji", "opener", "brevity")
VOTES = (16, 32, 64, 128)
METHODS = {"gesal": "gesal", "lora": "LoRA r=8"}
METRICS = {  # checkpoint field -> column heading
    "compliance": "compliance",
    "sound": "sound",
    "degenerate": "degenerate",
    "facts": "key facts",
}


@dataclass
class SeedRun:
    """One seed of one method in one run (repetition) of a task's experiment."""

    run: str
    method: str
    seed: int
    checkpoints: dict[int, dict]


def run_files(task: str) -> list[Path]:
    """Every ``eval-<task>.json`` under the task's run folders, one level deep or more."""
    return sorted((RESULTS / task / "runs").glob(f"*/**/eval-{task}.json"))


def load_runs(task: str) -> list[SeedRun]:
    """Every seed-run of a task; the run is the folder under ``docs/results/<task>/runs/``."""
    found = []
    runs_dir = RESULTS / task / "runs"
    for path in run_files(task):
        run = path.relative_to(runs_dir).parts[0]
        doc = json.loads(path.read_text())
        for r in doc["runs"]:
            cps = {cp["votes"]: cp for cp in r["checkpoints"]}
            unjudged = [v for v, cp in cps.items() if cp.get("sound") is None]
            if unjudged:
                raise SystemExit(
                    f"{path}: {r['method']} seed {r['seed']} has no sound rate at "
                    f"{unjudged} votes; merge it once with `gesal-bot eval --merge` first"
                )
            found.append(SeedRun(run, r["method"], r["seed"], cps))
    if not found:
        raise SystemExit(f"no runs under {RESULTS / task / 'runs'}")
    return found


def median(runs: list[SeedRun], votes: int, key: str) -> float | None:
    values = [r.checkpoints[votes][key] for r in runs if votes in r.checkpoints]
    return statistics.median(values) if values else None


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}"


def curve(runs: list[SeedRun], key: str) -> str:
    """'75 / 88 / 88 / 100': the median (%) at 16 / 32 / 64 / 128 votes."""
    return " / ".join(pct(median(runs, v, key)) for v in VOTES)


def seeds_of(runs: list[SeedRun]) -> str:
    """'9 (seeds 0–2, 3 runs)' and, where some stop early, how many reach 128 votes."""
    seeds = sorted({r.seed for r in runs})
    span = f"{seeds[0]}–{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])
    n_runs = len({r.run for r in runs})
    text = f"{len(runs)} (seeds {span}, {n_runs} run{'s' if n_runs > 1 else ''})"
    last = sum(VOTES[-1] in r.checkpoints for r in runs)
    if last < len(runs):
        text += f"; {last} to {VOTES[-1]} votes"
    return text


def spread(runs: list[SeedRun], key: str) -> str:
    """The range of the per-run medians (%) at each checkpoint: '62–75 / 88 / 88–100 / 100'."""
    cells = []
    for v in VOTES:
        per_run = [
            median([r for r in runs if r.run == name], v, key)
            for name in sorted({r.run for r in runs})
        ]
        per_run = [x for x in per_run if x is not None]
        if not per_run:
            cells.append("–")
            continue
        lo, hi = min(per_run), max(per_run)
        cells.append(pct(lo) + ("" if lo == hi else f"–{pct(hi)}"))
    return " / ".join(cells)


def tables() -> dict[str, str]:
    """The generated blocks: the medians of every task, and the run-to-run spread."""
    head = "| task | method | seed-runs | " + " | ".join(f"{m} %" for m in METRICS.values()) + " |"
    rule = "|---" * (3 + len(METRICS)) + "|"
    medians, spreads = [head, rule], []
    for task in TASKS:
        runs = load_runs(task)
        base = [r for r in runs if 0 in r.checkpoints]
        cells = [pct(median(base, 0, key)) for key in METRICS]
        medians.append(
            f"| {task} | base model | every run at 0 votes | " + " | ".join(cells) + " |"
        )
        for method, label in METHODS.items():
            mine = [r for r in runs if r.method == method]
            if not mine:
                dashes = " | ".join("–" for _ in METRICS)
                medians.append(f"| {task} | {label} | not run | {dashes} |")
                continue
            curves = " | ".join(curve(mine, key) for key in METRICS)
            medians.append(f"| {task} | {label} | {seeds_of(mine)} | {curves} |")
            n_runs = len({r.run for r in mine})
            if n_runs > 1:
                ranges = " | ".join(spread(mine, key) for key in METRICS)
                spreads.append(f"| {task} | {label} | {n_runs} | {ranges} |")
    spread_head = head.replace("seed-runs", "runs")
    return {
        TABLE: "\n".join(medians) + "\n",
        SPREAD: "\n".join([spread_head, rule, *spreads]) + "\n",
    }


def merge_plots() -> None:
    """Each task's per-seed table and plot, by `gesal-bot eval --merge`'s own code."""
    from gesal_core.evaluation.report import merge

    for task in TASKS:
        paths = [str(p) for p in run_files(task)]
        rel = [str(Path(p).relative_to(ROOT)) for p in paths]
        with contextlib.redirect_stdout(io.StringIO()):
            merge(rel, str((RESULTS / task).relative_to(ROOT)))
        # the merged JSON repeats the runs: the run files stay the one source
        (RESULTS / task / f"eval-{task}.json").unlink()
        print(f"docs/results/{task}/eval-{task}.md, .png: {len(paths)} run file(s)")


def replace_block(text: str, name: str, body: str) -> str:
    """`text` with the block between the ``<!-- name:begin/end -->`` markers set to `body`."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"missing the markers {begin} … {end}")
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start] + "\n" + body + text[stop:]


def rendered() -> dict[Path, str]:
    """README.md and docs/results.md as they should read, generated blocks filled in."""
    blocks = tables()
    readme = replace_block(README.read_text(), TABLE, blocks[TABLE])
    page = PAGE.read_text()
    for name, body in blocks.items():
        page = replace_block(page, name, body)
    return {README: readme, PAGE: page}


def main(argv: list[str]) -> int:
    wanted = rendered()
    stale = [p for p, text in wanted.items() if p.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run python scripts/results_report.py")
        return 1 if stale else 0
    import os

    os.chdir(ROOT)  # merge() records the paths it is given; keep them relative
    merge_plots()
    for path, text in wanted.items():
        path.write_text(text)
        print(f"written: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
