"""Shared helpers for benchmark scripts: machine facts, medians, table and JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
# Smoke runs (--quick) write here, so they never overwrite a full run's figures.
QUICK_RESULTS = RESULTS / "quick"
_quick = False


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two steps or gradients: do they point the same way?"""
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def set_quick(on: bool) -> None:
    """Mark this process as a smoke run (``base_args``' parser calls it)."""
    global _quick
    _quick = on


def results_dir() -> Path:
    """Where results go: `QUICK_RESULTS` for a smoke run, else `RESULTS`."""
    return QUICK_RESULTS if _quick else RESULTS


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


# Realistic community questions, used by every generation benchmark.
PROMPTS = [
    "What is the capital of France and why is it famous?",
    "Can you explain what a black hole is in simple words?",
    "Give me three tips for learning to play the guitar.",
    "How do I reverse a list in Python?",
    "What should I cook for dinner tonight with rice and eggs?",
    "Why is the sky blue?",
    "Write a short poem about autumn leaves.",
    "What is the difference between weather and climate?",
    "How many planets are in the solar system?",
    "Recommend a good science fiction book.",
    "What does HTTP stand for?",
    "How can I improve my sleep?",
    "Explain recursion to a ten year old.",
    "What is the boiling point of water on a mountain?",
    "Tell me a fun fact about octopuses.",
    "How do vaccines work?",
]


def model_meta(lm) -> dict:
    """What every result file records about the model it measured (a LoadedModel)."""
    return {"model": lm.name, "dtype": str(lm.dtype), "device": str(lm.device)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 1024)


class _Parser(argparse.ArgumentParser):
    """Records --quick as it parses, so `report` knows where a script's results go
    without every script passing the flag on."""

    def parse_args(self, *a, **kw):  # type: ignore[override]
        ns = super().parse_args(*a, **kw)
        set_quick(bool(getattr(ns, "quick", False)))
        return ns


def base_args(description: str | None, repeats: int = 3) -> argparse.ArgumentParser:
    """The options every script shares: --repeats, --model, --quick, --threads."""
    ap = _Parser(description=description)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--model", default=None, help="model to load (default: the bundled one)")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and sizes (smoke run)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core host, 2 threads measured up to 4x "
        "slower than 1 because OpenMP threads wait on each other; 0 keeps torch's default)",
    )
    return ap


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Time every variant once per round, rounds repeated: variants see the same noise.

    The machine is shared; timing A three times and then B three times would let a
    neighbour's burst land on one variant only.
    """
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].extend(timed(fn, 1))
    return out


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of fn."""
    out = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def with_threads(n: int, fn: Callable[[], object]):
    """fn() under n torch threads, then back to the thread count before."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def report(name: str, rows: list[dict], meta: dict) -> Path:
    """Print rows as a table and write them, with machine facts, to bench/results/NAME.json."""
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-|-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(_fmt(r[c]).ljust(widths[c]) for c in cols))
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    meta = {**meta, "peak_rss_mb": round(peak_rss_mb(), 1)}
    print(f"peak RSS {meta['peak_rss_mb']:.0f} MB")
    path.write_text(
        json.dumps({"bench": name, "machine": machine(), **meta, "rows": rows}, indent=2)
    )
    print(f"\nwritten to {path}")
    return path


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    """A one-message chat rendered by the model's template, shape (1, T)."""
    from gesal_core.generate import build_prompt

    return torch.tensor([build_prompt(tokenizer, [{"role": "user", "content": text}]).input_ids])


def greedy_pairs(model, tokenizer, n: int, new_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) for the first ``n`` of `PROMPTS` (cycled), each answered
    greedily with exactly ``new_tokens`` tokens: real samples for timing updates."""
    pairs = []
    for i in range(n):
        ids = chat_ids(tokenizer, PROMPTS[i % len(PROMPTS)])
        out = decode(model, ids, new_tokens)
        pairs.append((ids[0].tolist(), out[0, ids.shape[1] :].tolist()))
    return pairs


@torch.inference_mode()
def decode(
    model, input_ids: torch.Tensor, new_tokens: int, attention_mask=None, **kwargs
) -> torch.Tensor:
    """Greedy HF ``generate`` of exactly ``new_tokens`` tokens (EOS cannot end it early),
    so every variant decodes the same amount of work."""
    device = next(model.buffers(), None)
    device = device.device if device is not None else next(model.parameters()).device
    ids = input_ids.to(device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=0,
        **kwargs,
    )


def node_z(z_size: int, seed: int, scale: float = 0.1) -> torch.Tensor:
    """A plausible trained node's z: ones plus a small perturbation."""
    g = torch.Generator().manual_seed(seed)
    return 1 + scale * torch.randn(z_size, generator=g)


def node_requests(tokenizer, z_size: int, n: int, sampling, system=None, keyed: bool = False):
    """``n`` one-question chats, each on its own node (z = `node_z`, seeds 10, 11, ...), as
    `gesal_core.serving.GenRequest`s; ``keyed``: adapter keys ("bench", i), else anonymous
    (never merged or cached)."""
    from gesal_core.generate import build_prompt
    from gesal_core.serving import GenRequest

    requests = []
    for i in range(n):
        chat = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        key = ("bench", i) if keyed else None
        z = node_z(z_size, 10 + i).numpy()
        requests.append(GenRequest(build_prompt(tokenizer, chat, system), z, key, sampling))
    return requests


def lora_model(factory: Callable[[], torch.nn.Module], targets: list[str], r: int = 8):
    """A PEFT LoRA on the same modules SVF adapts, with non-zero B (a 'trained' adapter)."""
    from peft import LoraConfig, get_peft_model

    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    cfg = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=leaves, init_lora_weights=False
    )
    return get_peft_model(factory(), cfg).eval()


def left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (1, T_i) prompts into a left-padded batch and its attention mask."""
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1] :] = p[0]
        mask[row, width - p.shape[1] :] = 1
    return ids, mask
