"""`gesal-bot` command line.

Exit codes: 0 success, 1 unexpected failure (a bug: run with --debug and report it),
2 bad usage, 3 a model or resource is missing, 130 interrupted.
Errors print one plain sentence; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from gesal_core.errors import GesalError, ModelNotFoundError

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_MISSING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="model: bundled (default), a folder, a .gguf "
        "file or a Hugging Face hub id (needs internet)",
    )
    p.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")


def cmd_chat(args: argparse.Namespace) -> int:
    from gesal_core.generate import SamplingConfig, build_prompt, generate
    from gesal_core.model import load_model

    question = " ".join(args.question).strip()
    if not question:
        raise GesalError('nothing to ask: pass a question, e.g. gesal-bot chat "What is Redis?"')
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p
    )
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    messages = [{"role": "user", "content": question}]
    prompt = build_prompt(lm.tokenizer, messages, system=args.system)
    out = generate(lm.model, lm.tokenizer, [prompt], sampling, seed=args.seed)[0]
    print(out.text)
    if args.verbose:
        rate = len(out.response_ids) / out.seconds if out.seconds else 0.0
        print(
            f"[{lm.name} on {lm.device}: {len(out.response_ids)} tokens in {out.seconds:.2f}s, "
            f"{rate:.1f} tok/s]",
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from gesal_core.model import load_model
    from gesal_core.svf import SVFConfig, SVFModel

    start = time.perf_counter()
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    loaded = time.perf_counter()
    svf = SVFModel(lm.model, lm.name, SVFConfig(targets=args.targets))
    done = time.perf_counter()
    print(f"model {lm.name} ready in {loaded - start:.1f}s ({lm.source})")
    print(
        f"SVF on {len(svf.layers)} {args.targets} matrices, {svf.z_size} z components, "
        f"factors {svf.factor_bytes() / 2**20:.0f} MiB, ready in {done - loaded:.1f}s"
    )
    return EXIT_OK


def cmd_model_info(args: argparse.Namespace) -> int:
    from gesal_core.model import load_model
    from gesal_core.svf import SVFConfig, find_targets

    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    params = sum(p.numel() for p in lm.model.parameters())
    print(f"name:    {lm.name}\nsource:  {lm.source}\ndevice:  {lm.device}\ndtype:   {lm.dtype}")
    print(f"params:  {params / 1e6:.1f} M\narch:    {type(lm.model).__name__}")
    for targets in ("mlp", "attention"):
        try:
            names = find_targets(lm.model, SVFConfig(targets=targets))
            print(f"svf {targets}: {len(names)} matrices")
        except GesalError as exc:
            print(f"svf {targets}: {exc}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gesal-bot",
        description="A Discord/Slack bot on a local LLM that learns from 👍/👎 reactions.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    chat = sub.add_parser("chat", help="ask the model one question and print the answer")
    chat.add_argument("question", nargs="+", help="the question")
    _model_args(chat)
    chat.add_argument("--system", default=None, help="system prompt (default: the model's own)")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("-v", "--verbose", action="store_true", help="print timing to stderr")
    chat.set_defaults(func=cmd_chat)

    model = sub.add_parser("model", help="prepare or inspect the model")
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    prepare = msub.add_parser("prepare", help="convert the model and compute its SVD ahead of time")
    _model_args(prepare)
    prepare.add_argument("--targets", default="mlp", choices=["mlp", "attention", "all"])
    prepare.set_defaults(func=cmd_model_prepare)
    info = msub.add_parser("info", help="show what model would be used and what SVF would adapt")
    _model_args(info)
    info.set_defaults(func=cmd_model_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModelNotFoundError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_MISSING
    except (GesalError, ValueError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - last resort: one line, not a traceback
        if args.debug:
            raise
        print(
            f"error: unexpected {type(exc).__name__}: {exc}\nRun again with --debug for details.",
            file=sys.stderr,
        )
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
