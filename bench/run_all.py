"""Run the whole benchmark suite and summarise the project's performance targets.

    python -m bench.run_all [--quick] [--only generation,routing] [--threads 1]
    gesal-bot bench [...]           (the same, through the CLI)

Each script runs in its own process (so its peak RSS is its own) and writes
bench/results/<name>.json (a --quick smoke run: bench/results/quick/); this prints every
table and then one line per target (docs/performance.md lists them) with the measured
figure and whether it is met, and writes those lines to summary.json beside the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.common import results_dir, set_quick

SCRIPTS = (
    "generation",
    "decode",
    "node_switch",
    "multichannel",
    "serving_logprob",
    "serving_batch",
    "weight_layout",
    "factored_order",
    "update_step",
    "logprob_tail",
    "update_precision",
    "train_vs_serve",
    "routing",
    "redis_store",
    "lora_export",
    "svd_cache",
    "reliability",
    "routing_load",
)


def _rows(name: str) -> list[dict]:
    path = results_dir() / f"{name}.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _row(rows: list[dict], key: str, value) -> dict | None:
    return next((r for r in rows if r.get(key) == value), None)


def targets() -> list[dict]:
    """The performance targets, read back from the result files (absent figures say so)."""
    out = []

    def add(target: str, figure: str, met: bool | None) -> None:
        out.append(
            {
                "target": target,
                "measured": figure,
                "met": {True: "yes", False: "no"}.get(met, "n/a"),
            }
        )

    gen = _rows("generation")
    for v in ("SVF merged", "SVF factored"):
        r = _row(gen, "variant", v)
        add(
            f"{v} >= 0.97x base tok/s",
            f"{r['vs_base']:.2f}x" if r else "not run",
            r["vs_base"] >= 0.97 if r else None,
        )
    ns = _rows("node_switch")
    for v in ("switch: hot node, LRU hit", "switch: cold node, factored"):
        r = _row(ns, "variant", v)
        add(
            f"{v}: TTFT over the base model's <= 50 ms",
            f"+{r['over_base_ms']:.0f} ms (TTFT {r['median_ms']:.0f} ms, {r['vs_base']:.2f}x base)"
            if r
            else "not run",
            r["over_base_ms"] <= 50 if r else None,
        )
    r = _row(_rows("multichannel"), "N", 8)
    add(
        "8 channels batched >= 3x one by one (merged, merge cost excluded)",
        f"{r['batched_vs_merged']:.2f}x (vs re-merging: {r['batched_vs_remerge']:.2f}x)"
        if r
        else "not run",
        r["batched_vs_merged"] >= 3 if r else None,
    )
    for suffix, threads in (("", "1 thread"), ("_2threads", "2 threads")):
        r = _row(_rows(f"serving_batch{suffix}"), "N", 8)
        add(
            f"8 channels batched >= 3x one by one, serving path (nodes hot), {threads}",
            f"{r['batched vs one by one (head cache)']:.2f}x (head cache off: "
            f"{r['batched vs one by one (no head cache)']:.2f}x; on plain products: "
            f"{r['batched vs one by one (plain products)']:.2f}x; packed products "
            f"{r['packed vs plain products, batched']:.2f}x plain batched, "
            f"{r['packed vs plain products, one by one']:.2f}x one by one)"
            if r
            else "not run",
            r["batched vs one by one (head cache)"] >= 3 if r else None,
        )
    lay = {r["variant"]: r["speed-up"] for r in _rows("weight_layout")}
    add(
        "weights stored input-major vs as HF stores them (same answers)",
        ", ".join(f"{v} {x:.2f}x" for v, x in lay.items()) if lay else "not run",
        None,
    )
    order = [r for r in _rows("factored_order") if r["rows"] == 8]
    add(
        "factored product on 8 rows per layer vs x-first on plain factors",
        ", ".join(
            f"{r['shape']}: weight-first {r['weight-first speed-up']:.2f}x, "
            f"oneDNN packed {r.get('oneDNN packed speed-up', float('nan')):.2f}x"
            for r in order
        )
        if order
        else "not run",
        None,
    )
    r = _row(_rows("serving_logprob"), "N", 8)
    add(
        "answering 8 channels: log π recorded while generating vs scored after",
        f"{r['speedup']:.2f}x faster ({r['recorded_s']:.2f} s vs {r['scored_after_s']:.2f} s)"
        if r
        else "not run",
        None,
    )
    r = _row(_rows("update_step"), "k", 4)
    bf16 = r.get("svf_bf16_s") if r else None
    add(
        "SVF update on 4 samples <= 1.5 s",
        f"fp32 products {r['svf_s']:.2f} s, all cores {r['svf_all_cores_s']:.2f} s"
        + (
            f"; bf16 products {bf16:.2f} s, all cores {r['svf_bf16_all_cores_s']:.2f} s"
            if bf16
            else ""
        )
        + f" (LoRA {r['lora_s']:.2f} s; fp32 FLOP bound {r['svf_flop_bound_s']:.2f} s)"
        if r
        else "not run",
        r["svf_le_1.5s"] == "met" if r else None,
    )
    compiled = r.get("svf_bf16_all_cores_compiled_s") if r else None
    add(
        "SVF update on 4 samples <= 1.5 s, compiled (GESAL_COMPILE_UPDATES)",
        f"bf16 products, all cores {compiled:.2f} s, one thread {r['svf_bf16_compiled_s']:.2f} s"
        f" ({r['bf16_all_cores_eager_over_compiled']:.2f}x eager on all cores)"
        if compiled
        else "not run",
        r["compiled_le_1.5s"] == "met" if compiled else None,
    )
    tvs = _rows("train_vs_serve")
    step, whole = _row(tvs, "mode", "stepwise"), _row(tvs, "mode", "whole update")
    add(
        "training and serving share the worker (answer latency during an update)",
        f"+{step['over_idle_s']:.2f} s over idle, stepwise (whole-update job: "
        f"+{whole['over_idle_s']:.2f} s)"
        if step and whole
        else "not run",
        None,
    )
    r = _row(_rows("routing"), "nodes", 10000)
    add(
        "routing at 10k nodes <= 2 ms",
        f"{r['route_ms']:.2f} ms" if r else "not run",
        r["route_ms"] <= 2 if r else None,
    )
    r = _row(_rows("redis_store"), "figure", "load + commit round trip ms")
    add("Redis node load + commit round trip", f"{r['value']:.2f} ms" if r else "not run", None)
    dec = _rows("decode")
    best = max(
        (d for d in dec if "bound" not in d["variant"]), key=lambda d: d["vs_eager"], default=None
    )
    two = best is not None and "2 threads" in best["variant"]
    bound = next(  # the bound of the thread count the best variant ran on
        (d for d in dec if "bound" in d["variant"] and ("2 threads" in d["variant"]) == two),
        None,
    )
    add(
        "base decoding >= 2x eager HF generate",
        f"best {best['vs_eager']:.2f}x ({best['variant']})"
        + (
            f", {best['tok_s'] / bound['tok_s']:.0%} of its threads' bandwidth bound, "
            f"which is {bound['vs_eager']:.2f}x eager"
            if bound
            else ""
        )
        if best
        else "not run",
        best["vs_eager"] >= 2 if best else None,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SCRIPTS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summary-only", action="store_true", help="only re-read the results")
    args = ap.parse_args(argv)
    set_quick(args.quick)  # a smoke run's summary reads the smoke results
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(SCRIPTS)
    unknown = sorted(set(chosen) - set(SCRIPTS))
    if unknown:
        print(
            f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(SCRIPTS)}",
            file=sys.stderr,
        )
        return 2
    failed = []
    if not args.summary_only:
        env = {
            **os.environ,
            "OPENBLAS_NUM_THREADS": str(args.threads),
            "OMP_NUM_THREADS": str(args.threads),
        }
        for name in chosen:
            cmd = [sys.executable, "-m", f"bench.{name}"]
            if name != "svd_cache":
                cmd += ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
            print(f"\n== {name} ==", flush=True)
            if subprocess.run(cmd, env=env, check=False).returncode != 0:
                failed.append(name)
    from bench.common import report

    print("\n== performance targets (docs/performance.md) ==")
    report("summary", targets(), {"failed": failed, "threads": args.threads})
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
