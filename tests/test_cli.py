"""`gesal-bot` commands: help everywhere, exit codes, platform choice, channel admin.

Channel admin commands run for real against a store and an engine; the model loader is
pointed at a tiny Llama saved to a folder (a real `--model <folder>` load), so they
take seconds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from bot import cli
from bot.launch import choose_platforms
from bot.settings import load_settings
from gesal_core.errors import GesalError

from .conftest import make_tiny_llama


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("DISCORD_", "SLACK_", "REDIS_URL")) or (
            name.startswith("GESAL_") and name != "GESAL_CACHE_DIR"
        ):
            monkeypatch.delenv(name, raising=False)


def _subcommands(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for inner, subsub in _subcommands(sub):
                    yield f"{name} {inner}", subsub


def test_every_command_has_help(capsys):
    names = [n for n, _ in _subcommands(cli.build_parser())]
    expected = {"chat", "model", "model prepare", "model info", "run", "export", "import"}
    assert expected | {"reset", "stats", "eval", "bench"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as exc:
            cli.main([*name.split(), "--help"])
        assert exc.value.code == 0
        assert "usage: gesal-bot " + name in capsys.readouterr().out


def test_help_says_each_options_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert "votes per run (default: 64)" in text
    assert "they vote down (default: 0)" in text  # a default of 0 is said too
    assert "(default: False)" not in text and "(default: None)" not in text  # flags, unset
    assert "per channel. (-1 to 1) (default: 0.15) --round" in text  # said once, not twice
    assert "--lr LR" in text and "(above 0, at most 0.1) (default: 0.003)" in text


def test_bad_usage_exits_2_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "bot.cli", "run", "--platform", "irc"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_platform_choice(clean_env, monkeypatch):
    none = load_settings(None)
    assert choose_platforms(None, none) == ["local"]
    assert choose_platforms("all", none) == ["local"]
    with pytest.raises(GesalError, match="DISCORD_TOKEN"):
        choose_platforms("discord", none)
    monkeypatch.setenv("DISCORD_TOKEN", "abc.def")
    both = load_settings(None)
    assert choose_platforms(None, both) == ["discord"]
    assert choose_platforms("all", both) == ["discord", "local"]
    assert choose_platforms("local", both) == ["local"]


def test_missing_token_is_a_clear_usage_error(clean_env, capsys):
    assert cli.main(["run", "--platform", "slack"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: --platform slack needs SLACK_BOT_TOKEN")


def test_invalid_setting_names_the_variable(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("GESAL_THRESHOLD", "2")
    assert cli.main(["run"]) == cli.EXIT_USAGE
    assert "GESAL_THRESHOLD" in capsys.readouterr().err


def test_bench_outside_a_checkout_is_a_missing_resource(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "CHECKOUT", tmp_path)  # as when installed from a wheel
    assert cli.main(["bench"]) == cli.EXIT_MISSING
    assert "source checkout" in capsys.readouterr().err


def test_bench_runs_the_checkouts_benchmarks_in_a_process_of_their_own(monkeypatch):
    ran = []

    def run(cmd, cwd):
        ran.append((cmd, cwd))
        return subprocess.CompletedProcess(cmd, 4)

    monkeypatch.setattr(cli.subprocess, "run", run)
    assert cli.main(["bench", "--quick", "--only", "decode"]) == 4  # its exit code
    args = ["--quick", "--only", "decode"]
    assert ran == [([sys.executable, "-m", "bench.run_all", *args], cli.CHECKOUT)]


def test_destructive_commands_need_yes(clean_env, capsys):
    assert cli.main(["reset", "discord:1:2"]) == cli.EXIT_USAGE
    assert "--yes" in capsys.readouterr().err


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    folder = tmp_path / "tiny-model"
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_export_import_reset_stats_round_trip(
    clean_env, monkeypatch, capsys, tmp_path, tiny_model_dir
):
    """Seed a channel through the engine, then drive the admin commands from the CLI."""
    import asyncio

    from gesal_core.engine import Engine

    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("GESAL_MODEL", str(tiny_model_dir))
    store_file = tmp_path / "seed.json"

    async def seed():
        eng = Engine.load(str(tiny_model_dir))
        try:
            out = await eng.respond("discord:1:2", [{"role": "user", "content": "hello world"}])
            await eng.vote("discord:1:2", out.reply_id, "ann", 1)
            store_file.write_text(Engine.dumps(await eng.export("discord:1:2")))
        finally:
            eng.close()

    asyncio.run(seed())
    # each command opens the embedded Redis under GESAL_DATA_DIR: state persists between them
    monkeypatch.setenv("GESAL_DATA_DIR", str(tmp_path / "data"))
    code = cli.main(["import", "discord:9:9", str(store_file)])
    assert code == cli.EXIT_USAGE  # without --yes nothing is replaced
    assert cli.main(["import", "discord:9:9", str(store_file), "--yes"]) == cli.EXIT_OK
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli.main(["import", "discord:9:9", str(bad), "--yes"]) == cli.EXIT_USAGE
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "something-else"}))
    assert cli.main(["import", "discord:9:9", str(wrong), "--yes"]) == cli.EXIT_USAGE
    capsys.readouterr()
    monkeypatch.setenv("GESAL_MODEL", str(tmp_path / "no-such-model"))  # stats needs none
    assert cli.main(["stats", "discord:9:9"]) == cli.EXIT_OK
    monkeypatch.setenv("GESAL_MODEL", str(tiny_model_dir))
    line = capsys.readouterr().out
    assert line.startswith("discord:9:9: 1 nodes, 1 prompts, 1 replies, 1 up / 0 down")
    assert "largest drift |z-1| 0.00" in line  # imported, never trained: z is the base
    copy = tmp_path / "copy.json"
    assert cli.main(["export", "discord:9:9", "-o", str(copy)]) == cli.EXIT_OK
    original = json.loads(store_file.read_text())
    exported = json.loads(copy.read_text())
    assert exported["nodes"] == original["nodes"] and exported["replies"] == original["replies"]
    assert cli.main(["stats", "--json"]) == cli.EXIT_OK
    assert set(json.loads(capsys.readouterr().out)) == {"discord:9:9"}
    assert cli.main(["reset", "discord:9:9", "--yes"]) == cli.EXIT_OK
    out = tmp_path / "out.json"
    assert cli.main(["export", "discord:9:9", "-o", str(out)]) == cli.EXIT_OK
    assert json.loads(out.read_text())["nodes"] == []  # the reset is durable


def test_unreachable_redis_is_a_missing_resource(clean_env, monkeypatch, capsys, tiny_model_dir):
    monkeypatch.setenv("GESAL_MODEL", str(tiny_model_dir))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    monkeypatch.setenv("REDIS_URL", f"redis://:hunter2@127.0.0.1:{port}/0")
    assert cli.main(["stats"]) == cli.EXIT_MISSING
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "not reachable" in last
    assert "hunter2" not in err and "Traceback" not in err
