"""deploy/k8s, the Kubernetes base: rendered as `kubectl apply -k` renders it, valid against the Kubernetes schemas,
and true to the code it runs (commands, ports, probe paths, shutdown timing, settings, the image's user)."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask

from services.queue_processor.app import QueueProcessor
from shared.core.config import Settings, load_settings
from shared.observability.sentry import HEALTH_PATH
from tests.deploy.grace import http_stop_seconds, queue_processor_stop_seconds
from tests.support.components import components
from tests.support.processes import REPO

BASE = REPO / "deploy" / "k8s"
SECRET_TEMPLATE = BASE / "secrets.env.example"
SECRET_NAME = "callflow-secrets"
# The oldest release the base supports (preStop's `sleep` action is on by default from 1.30) and the newest the
# validator ships.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
GUNICORN_SERVICES = ("call-initiator", "webhook-receiver")
QUEUE_PROCESSOR = "queue-processor"
# Credentials and signing keys: they belong in the Secret, never in the ConfigMap.
SECRET_SETTINGS = frozenset({"DATABASE_URL", "RABBITMQ_URL", "BOLNA_API_KEY", "WEBHOOK_SECRET", "SENTRY_DSN"})
OPTIONAL_SECRET_SETTINGS = frozenset({"WEBHOOK_SIGNING_SECRET"})
SETTING_NAMES = frozenset(name.upper() for name in Settings.model_fields)
POD_TEMPLATE_KINDS = frozenset({"Deployment", "Job"})


# A renderer for the part of kustomize the base keeps to, so the suite needs no kubectl. What it cannot render, it
# refuses by name; test_renders_as_kubectl_kustomize_does compares it with kubectl where kubectl is installed.

RENDERED_KEYS = frozenset({"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator"})
CONFIG_MAP_REFERENCES = ("configMapRef", "configMapKeyRef", "configMap")


def render(base: Path) -> list[dict[str, Any]]:
    """The documents `kubectl kustomize base` prints, for a kustomization of resource files, a namespace, labels
    and ConfigMaps generated from env files."""
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - RENDERED_KEYS
    if unsupported:
        raise ValueError(f"{base}/kustomization.yaml uses {sorted(unsupported)}, which this renderer does not apply")
    documents = [
        document
        for resource in kustomization.get("resources", [])
        for document in yaml.safe_load_all((base / resource).read_text())
        if document
    ]
    generated = {spec["name"]: _generate_config_map(base, spec) for spec in kustomization.get("configMapGenerator", [])}
    for document in documents:
        _rename_config_map_references(document, {name: cm["metadata"]["name"] for name, cm in generated.items()})
    documents = [*generated.values(), *documents]
    for labels in kustomization.get("labels", []):
        _add_labels(documents, labels)
    if "namespace" in kustomization:
        for document in documents:
            document["metadata"]["namespace"] = kustomization["namespace"]
    return documents


def read_env_file(path: Path) -> dict[str, str]:
    """`NAME=value` lines, as kustomize and `kubectl create secret --from-env-file` read them."""
    entries = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, separator, value = line.partition("=")
        if not separator:
            raise ValueError(f"{path}:{number}: not NAME=value (a bare name would be read from the environment)")
        entries[name] = value
    return entries


def _generate_config_map(base: Path, spec: dict[str, Any]) -> dict[str, Any]:
    if set(spec) != {"name", "envs"}:
        raise ValueError(f"configMapGenerator {spec.get('name')!r}: only `name` and `envs` are rendered, not {spec}")
    data = {name: value for env_file in spec["envs"] for name, value in read_env_file(base / env_file).items()}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{spec['name']}-{_content_hash(data)}"},
        "data": data,
    }


def _content_hash(data: dict[str, str]) -> str:
    """kustomize's name suffix: the SHA-256 of the ConfigMap as Go's json.Marshal encodes it (keys sorted, HTML
    characters escaped), its first ten hex digits with some swapped for letters. kustomize looks the name up as one
    key called `metadata/name`, finds none, and so hashes an empty name."""
    encoded = json.dumps({"data": data, "kind": "ConfigMap", "name": ""}, separators=(",", ":"), sort_keys=True)
    encoded = encoded.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _rename_config_map_references(node: Any, names: dict[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in CONFIG_MAP_REFERENCES and isinstance(value, dict) and value.get("name") in names:
                value["name"] = names[value["name"]]
            else:
                _rename_config_map_references(value, names)
    elif isinstance(node, list):
        for item in node:
            _rename_config_map_references(item, names)


def _add_labels(documents: list[dict[str, Any]], labels: dict[str, Any]) -> None:
    if labels.get("includeSelectors") or set(labels) - {"pairs", "includeSelectors", "includeTemplates"}:
        raise ValueError(f"labels {labels}: only `pairs` and `includeTemplates` are rendered")
    for document in documents:
        document["metadata"].setdefault("labels", {}).update(labels["pairs"])
        if labels.get("includeTemplates") and document["kind"] in POD_TEMPLATE_KINDS:
            document["spec"]["template"].setdefault("metadata", {}).setdefault("labels", {}).update(labels["pairs"])


# What the rendered base holds.


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render(BASE)


def _of_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {document["metadata"]["name"]: document for document in documents if document["kind"] == kind}


def _pod_specs(documents: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for document in documents:
        if document["kind"] in POD_TEMPLATE_KINDS:
            yield f"{document['kind']}/{document['metadata']['name']}", document["spec"]["template"]["spec"]


def _only_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {variable["name"]: variable["value"] for variable in container.get("env", [])}


def _container_port(container: dict[str, Any], port: int | str) -> int:
    """The container port a probe or a Service's targetPort names, by number or by name."""
    for declared in container.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            return declared["containerPort"]
    raise AssertionError(f"{container['name']} declares no port {port!r}")


def _selects(selector: dict[str, str], deployment: dict[str, Any]) -> bool:
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    return all(pod_labels.get(key) == value for key, value in selector.items())


def _served_app(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Flask:
    """The Flask app the container's `python -m services.<name>` serves, built by that service's composition root
    with components that connect to nothing until used."""
    python, flag, module = container["command"]
    assert (python, flag) == ("python", "-m"), container["command"]
    composition_root = importlib.import_module(f"{module}.bootstrap")
    monkeypatch.setattr(composition_root, "start_service", lambda *_, **__: components())
    built = composition_root.bootstrap(load_settings())
    return built.health_app if isinstance(built, QueueProcessor) else built


def _dockerfile_user() -> tuple[int, int]:
    users = re.findall(r"^USER\s+(\S+)", (REPO / "deploy" / "Dockerfile").read_text(), re.MULTILINE)
    numeric = re.fullmatch(r"(\d+):(\d+)", users[-1]) if users else None
    assert numeric, f"deploy/Dockerfile's last USER must be numeric UID:GID for runAsNonRoot, not {users}"
    return int(numeric.group(1)), int(numeric.group(2))


# The tests.


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_document_is_valid_kubernetes(rendered, version):
    stream = yaml.safe_dump_all(rendered, sort_keys=False)
    validator = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run(
        [str(validator), "--strict", "--kubernetes-version", version, "-"],
        input=stream,
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    # A kind the validator has no schema for is only a warning: every document must have been checked.
    assert report.count(" passed for resource ") == len(rendered), report


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_renders_as_kubectl_kustomize_does(rendered):
    printed = subprocess.run(
        ["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, check=True, timeout=60
    ).stdout

    def by_name(documents):
        return {(document["kind"], document["metadata"]["name"]): document for document in documents}

    assert by_name(rendered) == by_name(yaml.safe_load_all(printed))


def test_the_renderer_refuses_what_it_does_not_apply(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\npatches: []\n")
    with pytest.raises(ValueError, match="patches"):
        render(tmp_path)


def test_each_service_has_its_deployment_and_the_http_ones_autoscale(rendered):
    deployments = _of_kind(rendered, "Deployment")
    assert set(deployments) == {*GUNICORN_SERVICES, QUEUE_PROCESSOR}
    autoscaled = {
        hpa["spec"]["scaleTargetRef"]["name"] for hpa in _of_kind(rendered, "HorizontalPodAutoscaler").values()
    }
    assert autoscaled == set(GUNICORN_SERVICES)
    for name in GUNICORN_SERVICES:
        assert "replicas" not in deployments[name]["spec"], f"{name}: an apply would reset the autoscaler's count"
    budgets = _of_kind(rendered, "PodDisruptionBudget").values()
    for name, deployment in deployments.items():
        assert any(_selects(pdb["spec"]["selector"]["matchLabels"], deployment) for pdb in budgets), name


def test_probes_hit_the_health_endpoints_each_service_serves(rendered, monkeypatch):
    for name, deployment in _of_kind(rendered, "Deployment").items():
        container = _only_container(deployment)
        app = _served_app(container, monkeypatch)
        routes = app.url_map.bind("localhost")
        expected = {
            "startupProbe": f"{HEALTH_PATH}/live",
            "livenessProbe": f"{HEALTH_PATH}/live",  # the process alone: a dependency down must not restart pods
            "readinessProbe": f"{HEALTH_PATH}/ready",
        }
        for probe, path in expected.items():
            get = container[probe]["httpGet"]
            assert get["path"] == path, f"{name} {probe}"
            routes.match(get["path"], method="GET")  # raises NotFound when the service does not serve it
            assert _container_port(container, get["port"]) == int(_env(container)["PORT"]), f"{name} {probe}"
        assert app.test_client().get(container["livenessProbe"]["httpGet"]["path"]).status_code == 200, name


def test_container_ports_are_the_port_each_service_listens_on(rendered):
    for name, deployment in _of_kind(rendered, "Deployment").items():
        container = _only_container(deployment)
        (port,) = container["ports"]
        assert port["containerPort"] == int(_env(container)["PORT"]), name


def test_each_service_selects_the_pods_of_one_deployment_on_their_port(rendered):
    deployments = _of_kind(rendered, "Deployment")
    for name, service in _of_kind(rendered, "Service").items():
        selected = [d for d in deployments.values() if _selects(service["spec"]["selector"], d)]
        assert [d["metadata"]["name"] for d in selected] == [name], f"Service {name} selects {selected}"
        container = _only_container(selected[0])
        for port in service["spec"]["ports"]:
            assert _container_port(container, port["targetPort"]) == int(_env(container)["PORT"]), name


def test_termination_grace_outlasts_the_preStop_pause_and_the_graceful_stop(rendered):
    (config_map,) = _of_kind(rendered, "ConfigMap").values()
    deployments = _of_kind(rendered, "Deployment")
    assert set(deployments) == {*GUNICORN_SERVICES, QUEUE_PROCESSOR}
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        container = _only_container(deployment)
        pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        if name == QUEUE_PROCESSOR:
            configured = {key.lower(): value for key, value in {**config_map["data"], **_env(container)}.items()}
            # The secret comes from the Secret; production refuses a weak one.
            settings = Settings.model_validate({**configured, "webhook_secret": "w" * 32})
            stop = queue_processor_stop_seconds(settings, pause)
        else:
            assert pause > 0, f"{name}: no preStop pause, so it may stop while still among the Service's endpoints"
            stop = http_stop_seconds(pause)
        assert pod["terminationGracePeriodSeconds"] > stop, f"{name}: terminationGracePeriodSeconds within {stop}s"


def test_the_migrations_job_runs_docker_compose_migrate_command_then_declares_the_topology(rendered):
    # docker-compose's broker loads the topology from deploy/rabbitmq/definitions.json at boot; a RabbitMQ cluster
    # run elsewhere does not, so the Job declares it before the services start.
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    migrate = shlex.join(compose["services"]["migrate"]["command"])
    (job,) = _of_kind(rendered, "Job").values()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["sh", "-c", f"{migrate} && callctl mq declare"]


def test_every_container_reads_the_config_map_and_the_secret(rendered):
    (config_map_name,) = _of_kind(rendered, "ConfigMap")
    assert f"create secret generic {SECRET_NAME}" in SECRET_TEMPLATE.read_text()
    for where, pod in _pod_specs(rendered):
        for container in pod["containers"]:
            sources = [next(iter(source.items())) for source in container["envFrom"]]
            expected = [("configMapRef", {"name": config_map_name}), ("secretRef", {"name": SECRET_NAME})]
            assert sources == expected, where


def test_configured_names_are_settings_and_their_values_are_valid(rendered):
    (config_map,) = _of_kind(rendered, "ConfigMap").values()
    configured = config_map["data"]
    secrets = read_env_file(SECRET_TEMPLATE)
    explicit = {name for _, pod in _pod_specs(rendered) for c in pod["containers"] for name in _env(c)}
    for name in {*configured, *secrets, *explicit}:
        assert name in SETTING_NAMES, f"{name} is not a setting of shared/core/config.py"
    assert not SECRET_SETTINGS & set(configured), "credentials go in the Secret"
    assert SECRET_SETTINGS <= set(secrets) <= SECRET_SETTINGS | OPTIONAL_SECRET_SETTINGS
    # The ConfigMap's values load as the services load them (production requires a strong WEBHOOK_SECRET).
    Settings.model_validate({**{name.lower(): value for name, value in configured.items()}, "webhook_secret": "w" * 32})


def test_every_pod_runs_unprivileged_as_the_images_user_with_a_read_only_root(rendered):
    uid, gid = _dockerfile_user()
    for where, pod in _pod_specs(rendered):
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, where
        assert (security["runAsUser"], security["runAsGroup"]) == (uid, gid), where
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["automountServiceAccountToken"] is False, where
        scratch = {volume["name"] for volume in pod["volumes"] if "emptyDir" in volume}
        for container in pod["containers"]:
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }, where
            mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
            assert mounts.get("/tmp") in scratch, f"{where}: /tmp must be a writable emptyDir"
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), where
            assert "memory" in resources["limits"], where
