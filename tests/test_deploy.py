"""Deployment files, checked offline: no Docker engine or cluster runs here.

Kubernetes manifests pass `kubernetes-validate --strict` against Kubernetes 1.30 (the
CUDA overlay after applying its patch); names, labels and ports agree across files;
every command line in them parses with the services' own argument parsers; the
compose file's health checks and dependencies are wired; the health-check command
works against a real server."""

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from expert_server.server import parse_args as expert_args
from gateway.server import parse_args as gateway_args
from moe_common.serving import pick_free_port
from predictor_service.cli import build_parser as predictor_parser
from tests.conftest import expert_servers

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
VALIDATE = Path(sys.executable).with_name("kubernetes-validate")


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base_resources() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return [d for name in kustomization["resources"] for d in docs(K8S / "base" / name)]


def apply_json_patch(doc: dict, ops: list[dict]) -> dict:
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if op["op"] == "add" and isinstance(node, list):
            node.append(op["value"]) if last == "-" else node.insert(int(last), op["value"])
        elif op["op"] in ("add", "replace"):
            node[last] = op["value"]
        else:
            raise ValueError(f"patch op {op['op']} not handled here")
    return doc


def validate(tmp_path: Path, resources: list[dict]) -> None:
    files = []
    for i, d in enumerate(resources):
        f = tmp_path / f"{i}-{d['kind']}.yaml"
        f.write_text(yaml.safe_dump(d))
        files.append(str(f))
    done = subprocess.run([str(VALIDATE), "--strict", "-k", "1.30.0", *files], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_manifests_are_valid_kubernetes(tmp_path):
    validate(tmp_path, base_resources())


def test_cuda_overlay_is_valid_and_asks_for_gpus(tmp_path):
    overlay = yaml.safe_load((K8S / "overlays" / "cuda" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../../base"]
    patched = []
    for d in base_resources():
        for patch in overlay["patches"]:
            if d["kind"] == patch["target"]["kind"] and d["metadata"]["name"] == patch["target"]["name"]:
                d = apply_json_patch(d, yaml.safe_load((K8S / "overlays" / "cuda" / patch["path"]).read_text()))
        patched.append(d)
    validate(tmp_path, patched)
    container = next(d for d in patched if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert expert_args(container["args"][1:]).device == "cuda"


def test_names_labels_and_ports_agree():
    resources = base_resources()
    services = {d["metadata"]["name"]: d for d in resources if d["kind"] == "Service"}
    workloads = {d["metadata"]["name"]: d for d in resources if d["kind"] in ("Deployment", "StatefulSet")}
    ports = {}
    for name, w in workloads.items():
        pod = w["spec"]["template"]
        assert w["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        container = pod["spec"]["containers"][0]
        args = container["args"]
        port = int(args[args.index("--port") + 1])
        assert args[args.index("--host") + 1] == "0.0.0.0"  # reachable from other pods
        assert [p["containerPort"] for p in container["ports"] if p["name"] != "metrics"] == [port]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, (name, probe)
        ports[name] = port
        service = services[name]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert [p["targetPort"] for p in service["spec"]["ports"]] == [port]
    experts = workloads["moe-expert"]
    assert experts["spec"]["serviceName"] == "moe-expert" and services["moe-expert"]["spec"]["clusterIP"] == "None"
    for kind in ("PodDisruptionBudget",):
        pdb = next(d for d in resources if d["kind"] == kind)
        assert pdb["spec"]["selector"]["matchLabels"] == experts["spec"]["selector"]["matchLabels"]
    hpa = next(d for d in resources if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "moe-expert"

    gateway = gateway_args(workloads["moe-gateway"]["spec"]["template"]["spec"]["containers"][0]["args"][1:])
    assert gateway.expert_discovery == f"moe-expert:{ports['moe-expert']}" and not gateway.expert_servers
    server = expert_args(experts["spec"]["template"]["spec"]["containers"][0]["args"][1:])
    assert experts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > server.drain_timeout_s
    assert gateway.predictor == f"moe-predictor:{ports['moe-predictor']}"


def test_every_command_parses():
    for d in base_resources():
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        program, *args = d["spec"]["template"]["spec"]["containers"][0]["args"]
        parse(program, args)
    compose = yaml.safe_load((ROOT / "deploy" / "docker" / "compose.yaml").read_text())
    for service in compose["services"].values():
        if "profiles" in service:
            continue  # not ours: the monitoring profile's Prometheus
        program, *args = service["command"]
        parse(program, args)
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    cmd = yaml.safe_load(dockerfile.split("\nCMD ", 1)[1].splitlines()[0])
    assert cmd[0] == "moe-serve" and "--host" in cmd


def parse(program: str, args: list[str]):
    if program == "moe-gateway":
        return gateway_args(args)
    if program == "moe-expert-server":
        return expert_args(args)
    if program == "moe-predictor":
        return predictor_parser().parse_args(args)
    raise AssertionError(f"unknown program {program}")


def test_compose_waits_on_health():
    compose = yaml.safe_load((ROOT / "deploy" / "docker" / "compose.yaml").read_text())
    services = {name: s for name, s in compose["services"].items() if "profiles" not in s}
    for name, service in services.items():
        test = service["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "moe_common.healthcheck"], name
        port = service["command"][service["command"].index("--port") + 1]
        assert test[4] == f"127.0.0.1:{port}"
    gateway = services["gateway"]
    assert set(gateway["depends_on"]) == {"expert", "predictor"}
    assert all(v == {"condition": "service_healthy"} for v in gateway["depends_on"].values())
    # Scalable with --scale expert=N: found by its service name, drained within the grace period.
    assert gateway_args(gateway["command"][1:]).expert_discovery == "expert:50061"
    server = expert_args(services["expert"]["command"][1:])
    assert int(services["expert"]["stop_grace_period"].rstrip("s")) > server.drain_timeout_s
    assert "container_name" not in services["expert"] and "ports" not in services["expert"]
    assert gateway["ports"] == ["127.0.0.1:50051:50051"]


def test_every_service_is_scraped():
    """Kubernetes: the pod annotations name the port given as --metrics-port, which the pod
    spec lists. Compose: the monitoring profile's Prometheus scrapes every service there."""
    for d in base_resources():
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = d["spec"]["template"]
        container = pod["spec"]["containers"][0]
        program, *args = container["args"]
        port = parse(program, args).metrics_port
        assert port > 0, d["metadata"]["name"]
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(port)
        assert {"name": "metrics", "containerPort": port} in container["ports"]
    compose = yaml.safe_load((ROOT / "deploy" / "docker" / "compose.yaml").read_text())
    prometheus = compose["services"]["prometheus"]
    assert prometheus["profiles"] == compose["services"]["grafana"]["profiles"] == ["monitoring"]
    # Grafana's provisioned data source is that Prometheus; its dashboard is ours.
    grafana = ROOT / "deploy" / "grafana"
    source = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    mounts = compose["services"]["grafana"]["volumes"]
    assert any(m.startswith("../grafana/moe-dashboard.json:") for m in mounts)
    assert all((ROOT / "deploy" / "docker" / m.split(":")[0]).exists() for m in mounts + prometheus["volumes"])
    config = yaml.safe_load((ROOT / "deploy" / "docker" / "prometheus.yml").read_text())
    targets = set()
    for job in config["scrape_configs"]:
        targets |= {t for c in job.get("static_configs", []) for t in c["targets"]}
        targets |= {f"{n}:{c['port']}" for c in job.get("dns_sd_configs", []) for n in c["names"]}
    for name, service in compose["services"].items():
        if "profiles" in service:
            continue
        program, *args = service["command"]
        assert f"{name}:{parse(program, args).metrics_port}" in targets, name
    promtool = shutil.which("promtool")  # comes with the prometheus package .ci/run installs
    if promtool:
        done = subprocess.run([promtool, "check", "config", str(ROOT / "deploy" / "docker" / "prometheus.yml")],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_healthcheck_command(tiny):
    check = [sys.executable, "-m", "moe_common.healthcheck"]
    with expert_servers(tiny, 1) as (addresses, _):
        assert subprocess.run([*check, addresses[0]], capture_output=True).returncode == 0
    free = f"127.0.0.1:{pick_free_port()}"
    done = subprocess.run([*check, free, "--timeout", "0.5"], capture_output=True, text=True)
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr


@pytest.mark.parametrize("script", ["local/run.sh", "quickstart.sh"])
def test_shell_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(ROOT / "deploy" / script)]).returncode == 0


def test_admin_port_stays_off_services_and_only_the_gateway_reaches_expert_servers():
    """README "Security": the admin port is on loopback and in no Service or published
    port; internal services require the cluster token; NetworkPolicies let only the
    gateway (and peer expert servers, for FetchExpert) reach expert servers."""
    resources = base_resources()
    workloads = {d["metadata"]["name"]: d for d in resources if d["kind"] in ("Deployment", "StatefulSet")}
    gw_args = workloads["moe-gateway"]["spec"]["template"]["spec"]["containers"][0]["args"]
    gateway = gateway_args(gw_args[1:])
    assert gateway.admin_host == "127.0.0.1" and gateway.admin_port
    assert gateway.public_status and gateway.api_keys_file is not None
    service_ports = {p["targetPort"] for d in resources if d["kind"] == "Service" for p in d["spec"]["ports"]}
    assert gateway.admin_port not in service_ports
    for name, w in workloads.items():
        program, *args = w["spec"]["template"]["spec"]["containers"][0]["args"]
        assert parse(program, args).cluster_token_file if program == "moe-predictor" else "--cluster-token-file" in args
    policies = {d["metadata"]["name"]: d["spec"] for d in resources if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {"moe-expert", "moe-predictor", "moe-gateway"}

    def sources(spec, port):
        return sorted(peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                      for rule in spec["ingress"] if [p["port"] for p in rule["ports"]] == [port]
                      for peer in rule.get("from", []))

    assert sources(policies["moe-expert"], 50061) == ["moe-expert", "moe-gateway"]
    assert sources(policies["moe-predictor"], 50071) == ["moe-gateway"]
    for spec in policies.values():  # /metrics: Prometheus only
        assert sources(spec, 9400) == ["prometheus"]
    assert sorted(p["port"] for rule in policies["moe-gateway"]["ingress"] for p in rule["ports"]) == sorted([gateway.port, 9400])
    assert "from" not in policies["moe-gateway"]["ingress"][0]  # the client port: from anywhere

    compose = yaml.safe_load((ROOT / "deploy" / "docker" / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        if "monitoring" in service.get("profiles", []):
            continue  # Prometheus and Grafana: they serve no model
        assert "--cluster-token-file" in service["command"] and service["secrets"] == ["cluster_token"], name
        assert "ports" not in service or name == "gateway"
    compose_gateway = gateway_args(compose["services"]["gateway"]["command"][1:])
    assert compose_gateway.admin_host == "127.0.0.1"
    assert all(f":{compose_gateway.admin_port}" not in p for p in compose["services"]["gateway"]["ports"])
