"""The deployment files are checked, not just written: the Dockerfile linted with
hadolint, the Kubernetes manifests validated offline against the API schemas
(kubernetes-validate), and the compose stack's mounts and ports read back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dlqproc.config import Config, load, parse_duration

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in _docs(DEPLOY / "k8s" / "dlqproc.yaml")}


def test_hadolint_passes_the_dockerfile() -> None:
    out = subprocess.run(
        [str(BIN / "hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_is_not_blind() -> None:
    # The same linter on a Dockerfile with known faults must complain.
    bad = "FROM debian\nRUN apt-get install curl\n"
    out = subprocess.run([str(BIN / "hadolint"), "-"], input=bad, capture_output=True, text=True)
    assert out.returncode != 0 and "DL3006" in out.stdout, out.stdout


@pytest.mark.parametrize("doc", _docs(DEPLOY / "k8s" / "dlqproc.yaml"), ids=lambda d: d["kind"])
def test_manifests_are_valid_kubernetes(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_the_validator_refuses_a_broken_manifest() -> None:
    deployment = _manifests()["Deployment"]
    broken = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30.0", strict=True)


def test_the_deployment_fits_dlqproc() -> None:
    docs = _manifests()
    pod = docs["Deployment"]["spec"]["template"]
    spec = pod["spec"]
    [container] = spec["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    cfg = load(environ=env)
    port = container["ports"][0]["containerPort"]
    assert port == cfg.server.port == Config().server.port
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    # Past the shutdown grace, with room for the NAKs and closing after it.
    assert spec["terminationGracePeriodSeconds"] > cfg.nats.shutdown_grace + 10
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert spec["securityContext"]["runAsNonRoot"]
    assert spec["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    assert "USER 10001:10001" in (ROOT / "Dockerfile").read_text()
    # The temp dir (workers' metrics files) is the writable mount.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    # Secrets come from the Secret, not the manifest's env.
    secret = docs["Secret"]
    assert {"POSTGRES_DSN", "NATS_PASSWORD"} <= set(secret["stringData"])
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    assert not {"POSTGRES_DSN", "NATS_PASSWORD", "NATS_TOKEN"} & set(env)
    load(environ={**env, **secret["stringData"]})  # every key is one dlqproc knows
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    # Memory from bench/README.md: supervisor peaks ~166 MB, a worker ~53 MB.
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi") and int(limit[:-2]) >= 166 + 53 * cfg.nats.dlq_workers
    pdb = docs["PodDisruptionBudget"]["spec"]
    assert pdb["selector"] == docs["Deployment"]["spec"]["selector"]
    assert docs["Deployment"]["spec"]["replicas"] > pdb["maxUnavailable"]


def test_the_podmonitor_selects_the_pods_on_the_metrics_port() -> None:
    [monitor] = _docs(DEPLOY / "k8s" / "podmonitor.yaml")
    deployment = _manifests()["Deployment"]
    assert monitor["spec"]["selector"] == deployment["spec"]["selector"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert endpoint["port"] in {p["name"] for p in container["ports"]}
    assert endpoint["path"] == "/metrics"


def test_the_compose_stack_mounts_files_that_exist_and_dlqprocs_port() -> None:
    path = DEPLOY / "compose" / "compose.yaml"
    stack = yaml.safe_load(path.read_text())
    services = stack["services"]
    assert {"nats", "postgres", "dlqproc", "prometheus", "grafana"} <= set(services)
    assert "-js" in services["nats"]["command"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (path.parent / source).resolve().is_file(), (name, source)
    build = services["dlqproc"]["build"]
    assert (path.parent / build["context"] / "Dockerfile").resolve().is_file()
    env = services["dlqproc"]["environment"]
    cfg = load(environ=env)
    assert f"{cfg.server.port}:{cfg.server.port}" in services["dlqproc"]["ports"]
    assert services["dlqproc"]["read_only"] and "/tmp" in services["dlqproc"]["tmpfs"]
    grace = services["dlqproc"]["stop_grace_period"]
    assert parse_duration(grace) > cfg.nats.shutdown_grace
    # Prometheus scrapes dlqproc where compose runs it, and loads the rules.
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in prom["scrape_configs"] if j["job_name"] == "dlqproc"]
    assert f"dlqproc:{cfg.server.port}" in job["static_configs"][0]["targets"]
    mounted = {v.split(":")[1] for v in services["prometheus"]["volumes"]}
    for rules in prom["rule_files"]:
        assert f"/etc/prometheus/{rules}" in mounted
    # Grafana: the provider's folder holds the dashboard.
    provider = yaml.safe_load((path.parent / "grafana" / "dashboards.yaml").read_text())
    folder = provider["providers"][0]["options"]["path"]
    assert any(v.split(":")[1].startswith(folder + "/") for v in services["grafana"]["volumes"])
