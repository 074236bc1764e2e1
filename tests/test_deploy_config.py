"""The configuration reference (README), .env.example and the deploy files' variables
are checked against the settings models, so none of them can drift from the code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import config_reference as ref  # noqa: E402

from bot.ops_settings import load_ops_settings  # noqa: E402
from bot.settings import load_settings  # noqa: E402

NAMES = {v.name for v in ref.variables()}


def test_every_variable_is_described():
    missing = [v.name for v in ref.variables() if not v.description.strip()]
    assert not missing, f"describe these settings (Field(description=...)): {missing}"


def test_readme_reference_is_generated_from_the_models():
    readme = (ROOT / "README.md").read_text()
    assert ref.BEGIN in readme and ref.END in readme
    section = readme.split(ref.BEGIN, 1)[1].split(ref.END, 1)[0].strip() + "\n"
    assert section == ref.markdown(), "run: python scripts/config_reference.py markdown"


def test_env_example_is_generated_and_loads(monkeypatch):
    text = (ROOT / ".env.example").read_text()
    assert text == ref.env_example(), "run: python scripts/config_reference.py env > .env.example"
    for name in list(os.environ):
        if name in NAMES:
            monkeypatch.delenv(name, raising=False)
    settings = load_settings(ROOT / ".env.example")
    assert settings.platforms() == []  # as shipped, `gesal-bot run` opens the playground
    assert settings.redis_url is None
    load_ops_settings(str(ROOT / ".env.example"))


def test_deploy_files_only_use_known_variables():
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    used = set(compose["services"]["bot"]["environment"])
    for name in ("configmap.yaml", "secret.example.yaml"):
        doc = yaml.safe_load((ROOT / "deploy" / "k8s" / name).read_text())
        used |= set(doc.get("data") or doc.get("stringData"))
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    used |= {n for n in NAMES if f"{n}=" in dockerfile}
    unknown = used - NAMES - {"GESAL_CACHE_DIR", "GESAL_DATA_DIR"}  # read by gesal_core.paths
    assert not unknown, f"not settings: {sorted(unknown)}"
    assert {"DISCORD_TOKEN", "SLACK_BOT_TOKEN", "REDIS_URL"} <= used
