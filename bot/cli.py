"""`gesal-bot` command line.

Exit codes: 0 success, 1 unexpected failure (a bug: run with --debug and report it),
2 bad usage, 3 a model or resource is missing, 130 interrupted.
Errors print one plain sentence; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import time
import typing
from pathlib import Path

from gesal_core.config import SamplingConfig
from gesal_core.config_fields import entries
from gesal_core.errors import GesalError, ModelNotFoundError

from .settings import BotSettings


class ResourceMissingError(GesalError):
    """Something the command needs is not installed or not reachable (exit code 3)."""


EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_MISSING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# the folder above the `bot` package: a clone of the repository when the bot runs from
# one (bench/ is there), site-packages when it is installed from a wheel
CHECKOUT = Path(__file__).resolve().parents[1]


def _model_args(p: argparse.ArgumentParser) -> None:
    """--model, --device and --dtype: the flags of GESAL_MODEL, GESAL_DEVICE and
    GESAL_DTYPE, with those variables' defaults, choices and descriptions."""
    for flag in ("model", "device", "dtype"):
        field = BotSettings.model_fields[f"gesal_{flag}"]
        choices = typing.get_args(field.annotation) if flag == "dtype" else None
        words = (field.description or "").replace("``", "")
        p.add_argument(f"--{flag}", default=field.default, choices=choices, help=words)


# the sampling settings `chat` takes, each the flag of its `SamplingConfig` field:
# --max-new-tokens, --temperature, --top-p
CHAT_SAMPLING = ("max_new_tokens", "temperature", "top_p")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """The `CHAT_SAMPLING` flags, with their fields' types, defaults and help texts, so
    the library and ``gesal-bot chat`` cannot disagree on them. Not `add_flags`: a field's
    ``flag`` is an option of ``gesal-bot eval``, which has a --max-new-tokens of its own."""
    for e in entries(SamplingConfig):
        name = e.path[-1]
        if name in CHAT_SAMPLING:
            flag = "--" + name.replace("_", "-")
            p.add_argument(flag, type=e.type, default=e.default, help=e.setting.help)


def cmd_chat(args: argparse.Namespace) -> int:
    from gesal_core.generate import build_prompt, generate
    from gesal_core.model import load_model

    question = " ".join(args.question).strip()
    if not question:
        raise GesalError('nothing to ask: pass a question, e.g. gesal-bot chat "What is Redis?"')
    sampling = SamplingConfig(**{name: getattr(args, name) for name in CHAT_SAMPLING})
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
    if svf.prepacked:
        print(f"weights packed for the CPU's products: {svf.packed_bytes() / 2**20:.0f} MiB")
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


# -- run -------------------------------------------------------------------------------------
def _settings(args: argparse.Namespace, **overrides: object):
    """Settings from the environment and .env, with command-line flags on top."""
    from .settings import load_settings

    flags = {
        "gesal_model": getattr(args, "model", None),
        "gesal_device": None if getattr(args, "device", "auto") == "auto" else args.device,
        "gesal_dtype": getattr(args, "dtype", None),
        **overrides,
    }
    return load_settings(".env", **{k: v for k, v in flags.items() if v is not None})


def cmd_run(args: argparse.Namespace) -> int:
    from .launch import choose_platforms, run_forever, serve
    from .logs import configure_logging
    from .ops_settings import load_ops_settings

    settings = _settings(args, gesal_playground_host=args.host, gesal_playground_port=args.port)
    ops = load_ops_settings(".env")
    secrets = [
        v.get_secret_value()
        for _, v in settings
        if hasattr(v, "get_secret_value") and v.get_secret_value()
    ]
    configure_logging(
        "DEBUG" if args.debug else ops.gesal_log_level.upper(), ops.gesal_log_format, secrets
    )
    platforms = choose_platforms(args.platform, settings)
    run_forever(lambda: serve(settings, ops, platforms))
    return EXIT_OK


# -- channel admin -------------------------------------------------------------------------
async def _with_store(args: argparse.Namespace, fn):
    """Open the store (REDIS_URL or the embedded Redis) and run ``fn`` on it: for admin
    commands that need no model (loading one costs seconds and gigabytes)."""
    from .runtime import open_store

    settings = _settings(args)
    store, close = await open_store(settings)
    try:
        return await fn(store)
    finally:
        await close()


async def _with_engine(args: argparse.Namespace, fn):
    """Open the store (REDIS_URL or the embedded Redis), load the engine, run ``fn``."""
    from gesal_core.engine import Engine

    from .runtime import open_store

    settings = _settings(args)
    store, close = await open_store(settings)
    engine = None
    try:
        engine = await asyncio.to_thread(
            Engine.load,
            settings.gesal_model,
            store,
            settings.engine_config(),
            None if settings.gesal_device == "auto" else settings.gesal_device,
            settings.gesal_dtype,
        )
        return await fn(engine)
    finally:
        if engine is not None:
            engine.close()
        await close()


def _need_yes(args: argparse.Namespace, what: str) -> None:
    if not args.yes:
        raise GesalError(f"{what}; pass --yes to confirm")


def cmd_export(args: argparse.Namespace) -> int:
    from gesal_core.engine import Engine

    async def go(engine) -> str:
        return Engine.dumps(await engine.export(args.channel))

    text = asyncio.run(_with_engine(args, go))
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"exported {args.channel} to {args.output}", file=sys.stderr)
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from gesal_core import snapshot

    path = Path(args.file)
    if not path.is_file():
        raise GesalError(f"no such file: {path}")
    try:  # the file's size and nesting are checked before it is parsed
        data = snapshot.loads(path.read_bytes())
    except GesalError as exc:
        raise GesalError(f"{path} is not an export that can be imported: {exc}") from None
    _need_yes(args, f"importing replaces the whole graph of {args.channel}")

    async def go(engine) -> dict:
        return await engine.import_graph(args.channel, data)

    counts = asyncio.run(_with_engine(args, go))
    print(f"imported {counts['nodes']} nodes and {counts['replies']} replies into {args.channel}")
    return EXIT_OK


def cmd_reset(args: argparse.Namespace) -> int:
    _need_yes(args, f"reset deletes everything {args.channel} has learned")

    async def go(store) -> None:
        await store.reset(args.channel)

    asyncio.run(_with_store(args, go))
    print(f"reset {args.channel}")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    from gesal_core.engine import channel_stats

    async def go(store):
        if args.channel:
            return await channel_stats(store, args.channel)
        return {ch: await channel_stats(store, ch) for ch in sorted(await store.channels())}

    result = asyncio.run(_with_store(args, go))
    if args.json:
        print(json.dumps(result, indent=1, default=str))
        return EXIT_OK
    rows = [result] if args.channel else list(result.values())
    if not rows:
        print("no channels yet")
    for s in rows:
        last = s["last_update"]
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(last)) if last else "never"
        drift = max((n["drift"] for n in s["node_list"]), default=0.0)
        print(
            f"{s['channel']}: {s['nodes']} nodes, {s['prompts']} prompts, {s['replies']} replies, "
            f"{s['votes_up']} up / {s['votes_down']} down, {s['corrections']} corrections, "
            f"{s['pending_feedback']} pending, {s['updates']} updates "
            f"({s['rollbacks']} rolled back), mean reward {s['mean_reward']:+.2f}, "
            f"largest drift |z-1| {drift:.2f}, last trained {when}"
            + (
                f"; training {'PARKED' if s['train_parked'] else 'failing'} after "
                f"{s['train_failures']} failed run(s): {s['train_error']}"
                if s["train_failures"]
                else ""
            )
            + ("; near a limit: " + "; ".join(s["near_caps"]) if s["near_caps"] else "")
        )
    return EXIT_OK


# -- eval and bench ------------------------------------------------------------------------
def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    from gesal_core import evaluation

    evaluation.add_arguments(p)


def cmd_eval(args: argparse.Namespace) -> int:
    from gesal_core import evaluation

    return evaluation.run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    """Runs ``python -m bench.run_all`` in the source checkout this bot runs from.

    The benchmarks are scripts of the checkout, not part of the installed bot, so they
    run in a process of their own, from the checkout's root."""
    if not (CHECKOUT / "bench" / "run_all.py").is_file():
        raise ResourceMissingError(
            "the benchmarks live in the source checkout (bench/run_all.py), which this "
            "installation has not got: run gesal-bot bench from a clone of the repository"
        )
    run = subprocess.run([sys.executable, "-m", "bench.run_all", *args.bench_args], cwd=CHECKOUT)
    return run.returncode


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends with an option's default, unless there is nothing to say (no default,
    a flag that is off) or the help already says it; a user deciding on `--budget` should
    not have to read the source to learn what they get without it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        unsaid = action.default is None or action.default is False  # 0 is a default to say
        if unsaid or action.default == argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every command's parser (subcommands inherit the class) shows defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsHelp)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gesal-bot",
        description="A Discord/Slack bot on a local LLM that learns from 👍/👎 reactions.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_chat, _add_model, _add_run, _add_channel_commands, _add_eval, _add_bench):
        add(sub)
    return parser


def _add_chat(sub: argparse._SubParsersAction) -> None:
    chat = sub.add_parser("chat", help="ask the model one question and print the answer")
    chat.add_argument("question", nargs="+", help="the question")
    _model_args(chat)
    chat.add_argument("--system", default=None, help="system prompt (default: the model's own)")
    _sampling_args(chat)
    chat.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    chat.add_argument("-v", "--verbose", action="store_true", help="print timing to stderr")
    chat.set_defaults(func=cmd_chat)


def _add_model(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="prepare or inspect the model")
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    prepare = msub.add_parser("prepare", help="convert the model and compute its SVD ahead of time")
    _model_args(prepare)
    prepare.add_argument("--targets", default="mlp", choices=["mlp", "attention", "all"])
    prepare.set_defaults(func=cmd_model_prepare)
    info = msub.add_parser("info", help="show what model would be used and what SVF would adapt")
    _model_args(info)
    info.set_defaults(func=cmd_model_info)


def _add_run(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run",
        help="run the bot: Discord and/or Slack when tokens are set, else the local playground",
        description="Run the bot. Default: every platform whose tokens are configured "
        "(DISCORD_TOKEN, SLACK_BOT_TOKEN), or the local web playground when none is.",
    )
    run.add_argument(
        "--platform",
        choices=["discord", "slack", "local", "all"],
        default=None,
        help="discord, slack, local (the playground) or all (every configured one + local)",
    )
    run.add_argument("--host", default=None, help="playground address (GESAL_PLAYGROUND_HOST)")
    run.add_argument(
        "--port", type=int, default=None, help="playground port (GESAL_PLAYGROUND_PORT)"
    )
    _model_args(run)
    run.set_defaults(func=cmd_run, dtype=None)


def _channel_parser(
    sub: argparse._SubParsersAction, name: str, help_text: str, optional: bool = False
) -> argparse.ArgumentParser:
    """A channel admin command: its channel key and the model flags (dtype unset: the
    configured one)."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument(
        "channel",
        nargs="?" if optional else None,
        help="channel key, e.g. discord:<guild>:<channel>, slack:<team>:<channel> "
        "or playground:local:general",
    )
    _model_args(p)
    p.set_defaults(dtype=None)
    return p


def _add_channel_commands(sub: argparse._SubParsersAction) -> None:
    export = _channel_parser(sub, "export", "write a channel's graph as versioned JSON")
    export.add_argument("-o", "--output", default=None, help="file (default: standard output)")
    export.set_defaults(func=cmd_export)
    imp = _channel_parser(sub, "import", "replace a channel's graph with an exported JSON file")
    imp.add_argument("file", help="the JSON file from gesal-bot export or /gesal export")
    imp.add_argument("--yes", action="store_true", help="confirm replacing the graph")
    imp.set_defaults(func=cmd_import)
    reset = _channel_parser(sub, "reset", "delete everything a channel has learned")
    reset.add_argument("--yes", action="store_true", help="confirm the reset")
    reset.set_defaults(func=cmd_reset)
    stats = _channel_parser(
        sub, "stats", "nodes, votes, rewards and updates (all channels if none given)", True
    )
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(func=cmd_stats)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval",
        help="simulated communities: learning curves of gesal vs baselines",
        description="Run the evaluation harness (gesal_core.evaluation) and write results.",
    )
    _add_eval_arguments(ev)
    ev.set_defaults(func=cmd_eval)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="run the performance benchmarks (from a source checkout)",
        description="Runs bench/run_all.py; arguments after `bench` are passed to it.",
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmarks")
    bench.set_defaults(func=cmd_bench)


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    """A store that cannot be reached is a missing resource (3), not bad usage (2)."""
    try:
        from gesal_core.store import StoreUnavailableError
    except ImportError:
        return ()
    return (StoreUnavailableError,)


def _parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Everything after ``bench`` goes to the benchmarks, options included: argparse's
    REMAINDER would read a leading ``--quick`` as an unknown option of gesal-bot."""
    argv = sys.argv[1:] if argv is None else argv
    i = next((k for k, a in enumerate(argv) if not a.startswith("-")), None)
    if i is not None and argv[i] == "bench" and argv[i + 1 : i + 2] not in (["-h"], ["--help"]):
        args = parser.parse_args(argv[: i + 1])
        args.bench_args = argv[i + 1 :]
        return args
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse_args(parser, argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ModelNotFoundError, ResourceMissingError, *_unavailable_errors()) as exc:
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
