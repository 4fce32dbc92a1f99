"""deploy/ holds files that work: the Kubernetes manifests pass the Kubernetes API schema
(kubernetes-validate, offline), the systemd unit passes ``systemd-analyze verify``, and
the ``bitserve serve`` command lines in both parse with the real CLI. (The nginx
configuration is run for real by the cluster tests.)"""

from __future__ import annotations

import configparser
import shlex
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from bitserve.api.serve import settings_from_args
from bitserve.cli import build_parser
from bitserve.cluster.nginx import render_config, shipped_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES_VERSION = "1.30"  # the oldest release still maintained when this was written


def manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


def serve_settings(args: list[str]) -> Any:
    """``bitserve <args>`` parsed by the real parser into the server's settings."""
    assert args[0] == "serve"
    return settings_from_args(build_parser("serve").parse_args(args))


@pytest.mark.parametrize(("name", "doc"), manifests(), ids=[n for n, _ in manifests()])
def test_kubernetes_manifests_pass_the_api_schema(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_deployment_reads_the_database_from_the_secret_and_is_ready_on_health() -> None:
    docs = dict(manifests())
    deployment = docs["deployment.yaml:Deployment/bitserve"]
    secret = docs["secret.example.yaml:Secret/bitserve-db"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    ref = env["BITSERVE_DB"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], "url")
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health" and probe["port"] == container["ports"][0]["name"]
    settings = serve_settings(container["args"])
    assert settings.port == container["ports"][0]["containerPort"]
    assert settings.host == "0.0.0.0" and "*" in settings.allowed_hosts
    for service in ("service.yaml:Service/bitserve", "service.yaml:Service/bitserve-headless"):
        selector = docs[service]["spec"]["selector"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_serve_reads_the_database_and_replica_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BITSERVE_DB", "postgresql://u:p@db/bitserve")
    monkeypatch.setenv("BITSERVE_REPLICA_ID", "bitserve-7d9f-x2")
    settings = serve_settings(["serve"])
    assert (settings.db_path, settings.replica) == (
        "postgresql://u:p@db/bitserve",
        "bitserve-7d9f-x2",
    )


def test_the_systemd_unit_verifies_and_its_command_parses(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "bitserve.service").read_text()
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(unit)
    command = shlex.split(parser["Service"]["ExecStart"].replace("\\\n", " "))
    assert command[0] == "/opt/bitserve/bin/bitserve"
    settings = serve_settings(command[1:])
    assert settings.port == 8081 and "chat.example.com" in settings.allowed_hosts
    # systemd checks the executable exists: point it at this environment's bitserve
    bitserve = Path(subprocess.check_output(["which", "bitserve"], text=True).strip())
    local = tmp_path / "bitserve.service"
    local.write_text(unit.replace(command[0], str(bitserve)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_the_nginx_config_in_deploy_is_the_one_the_cluster_runs() -> None:
    assert (DEPLOY / "nginx" / "bitserve.conf").read_text() == shipped_config()
    rendered = render_config(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], 9, Path("/x.log"))
    assert rendered.count("server 127.0.0.1:2 max_fails=0;") == 2
    assert "hash $bitserve_conversation consistent;" in rendered
    assert "10.0.0.11" not in rendered and "listen 127.0.0.1:9;" in rendered


def test_three_replicas_at_default_flags_fit_postgresql_default_connections() -> None:
    """Each replica keeps a fixed pool of PostgreSQL connections; at the default flags
    three replicas must fit PostgreSQL's default max_connections (100, 3 of them reserved
    for superusers). It was --max-queue + --max-batch + 4 = 36 each: 108."""
    default = serve_settings(["serve", "--db", "postgresql://u:p@db/bitserve"])
    assert 3 * default.db_connections <= 100 - 3
    assert serve_settings(["serve", "--max-batch", "8"]).db_connections == 8 + 4
    assert serve_settings(["serve", "--db-pool-size", "5"]).db_connections == 5
