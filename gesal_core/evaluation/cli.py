"""`gesal-bot eval`: its arguments and the run they describe."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import asdict
from pathlib import Path

from ..config import EngineConfig, SamplingConfig
from ..config_fields import add_flags, apply, flag_values
from ..learning import warm_up_compiled
from ..model import LoadedModel, load_model
from ..svf import SVFConfig, SVFModel
from .harness import METHODS, EvalConfig, Harness, RunResult
from .report import merge, suite_table, write_results
from .suite import BUILTIN, GROUPS, load_task, task_specs
from .tasks import Task


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        default="brevity",
        help=f"built-in task ({', '.join(BUILTIN)}), path/to/file.py:Name, several of "
        f"them separated by commas, or a group ({', '.join(GROUPS)}: docs/results.md, "
        "'The task suite'); several tasks print one table and write each task's files "
        "under --out/<task>/",
    )
    p.add_argument(
        "--methods", default="none,gesal,lora", help=f"comma-separated, from {', '.join(METHODS)}"
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (median over them)")
    p.add_argument("--budget", type=int, default=64, help="votes per run")
    p.add_argument("--checkpoints", default="0,16,32,64", help="vote counts to evaluate at")
    p.add_argument("--batch", type=int, default=8, help="votes between training runs")
    p.add_argument(
        "--corrections",
        type=int,
        default=0,
        help="members send a better answer for the first N answers they vote down",
    )
    p.add_argument("--heldout", type=int, default=12, help="held-out prompts used")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest answer, in tokens")
    p.add_argument("--out", default="eval-results", help="folder for JSON, markdown and PNG")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        default=None,
        help="run nothing: merge eval-*.json files of one task (e.g. seeds run in parallel "
        "processes) into one table, JSON and plot in --out",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model folder, .gguf file or hub id (default: the bundled model)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    # the engine's settings that name a flag (gesal_core/config.py): --lr, --round,
    # --no-guard, --threshold…, with the library's defaults, ranges and help texts
    add_flags(p, EngineConfig)
    p.add_argument(
        "--targets",
        choices=("mlp", "attention", "all"),
        default="mlp",
        help="weights SVF adapts (and the LoRA baseline with it; default: mlp)",
    )


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def run(args: argparse.Namespace) -> int:
    """`gesal-bot eval`: run the harness and write results; returns an exit code."""

    def load():
        lm = load_model(args.model, device=args.device)
        return lm, SVFModel(lm.model, lm.name, SVFConfig(targets=args.targets))

    if getattr(args, "merge", None):

        def judge(max_new_tokens: int) -> Harness:
            lm, svf = load()
            sampling = SamplingConfig(max_new_tokens=max_new_tokens)
            return Harness(svf, lm.tokenizer, EngineConfig(sampling=sampling))

        return merge(args.merge, args.out, judge)

    ec = _eval_config(args)
    # every task loads before the model does: a bad name or setting fails at once
    tasks = [load_task(spec) for spec in task_specs(ec.task)]
    sampling = SamplingConfig(max_new_tokens=ec.max_new_tokens)
    cfg = apply(EngineConfig(sampling=sampling), flag_values(args, EngineConfig))
    lm, svf = load()

    def factory():
        return load_model(args.model, device=args.device, progress=False).model

    harness = Harness(svf, lm.tokenizer, cfg, model_factory=factory)
    if cfg.learning.compile and {"gesal", "svf-single"} & set(ec.methods):  # else: a stall
        print("compiling the update passes (minutes on a CPU) ...", flush=True)
        took = warm_up_compiled(svf, cfg.learning, lm.tokenizer.pad_token_id or 0)
        print(f"  {svf.compiled_passes.outcome(took)}", flush=True)
    meta = _meta(ec, cfg, svf, lm, args.targets)
    out = Path(ec.out)
    if len(tasks) == 1:
        _run_task(harness, tasks[0], ec, out, meta)
        return 0
    runs = {task.name: _run_task(harness, task, ec, out / task.name, meta) for task in tasks}
    table = suite_table(runs, ec.checkpoints)
    (out / "suite.md").write_text(table)
    print(table)
    print(f"written: {out / 'suite.md'}, and each task's files under {out}/<task>/")
    return 0


def _eval_config(args: argparse.Namespace) -> EvalConfig:
    ec = EvalConfig(
        task=args.task,
        methods=tuple(m.strip() for m in args.methods.split(",")),
        seeds=_ints(args.seeds),
        budget=args.budget,
        checkpoints=_ints(args.checkpoints),
        batch=args.batch,
        corrections=args.corrections,
        heldout=args.heldout,
        max_new_tokens=args.max_new_tokens,
        out=args.out,
    )
    bad = [m for m in ec.methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; use {', '.join(METHODS)}")
    return ec


def _meta(ec: EvalConfig, cfg: EngineConfig, svf: SVFModel, lm: LoadedModel, targets: str) -> dict:
    """What a result file records about the run's settings and machine."""
    return {
        "config": asdict(ec),
        "learning": asdict(cfg.learning),
        "guard": asdict(cfg.guard),
        # what "auto" chose on the machine that ran this (None: the model's own dtype)
        "update_products": str(
            svf.compute_precision.resolve(cfg.learning.compute_dtype) or lm.dtype
        ),
        "explore_max_temperature": cfg.explore_max_temperature,
        "train_round": cfg.train_round,
        "targets": targets,
        "z_size": svf.z_size,
        "model": lm.name,
    }


def _run_task(
    harness: Harness, task: Task, ec: EvalConfig, out: Path, meta: dict
) -> list[RunResult]:
    """Every (method, seed) run of one task, its files written after every checkpoint:
    a long comparison stopped part-way keeps what it has, and its answers can be read
    while it runs."""
    task.heldout = list(task.heldout)[: ec.heldout]
    results: list[RunResult] = []
    md = ""
    for method in ec.methods:
        for seed in ec.seeds:
            print(f"{task.name} / {method} / seed {seed} ...", flush=True)

            def so_far(partial: RunResult) -> None:
                write_results(out, task, [*results, partial], meta)

            results.append(asyncio.run(harness.run(task, method, seed, ec, checkpointed=so_far)))
            md = write_results(out, task, results, meta)
    print(md)
    print(f"written: {out / f'eval-{task.name}'}.json, .md, .png")
    return results
