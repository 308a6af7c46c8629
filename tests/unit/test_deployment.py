"""Deployment files, validated offline with the real tools (no Docker engine or cluster exists here):
the compose files against the Compose specification's schema (check-jsonschema), every kustomize overlay
rendered by kubectl's kustomize and validated by kubernetes-validate --strict (a warning fails), the Dockerfiles
by hadolint, and their contents against what the deployment needs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OVERLAYS = ("cpu", "gpu")


def _run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / command[0]), *command[1:]], capture_output=True, text=True, timeout=120, **kwargs)


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags (!reset, !override) read as their plain values."""


def _plain(loader: yaml.SafeLoader, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, _plain)


def _compose(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=_ComposeLoader)


# -- docker compose ----------------------------------------------------------------------------------------------


def test_the_compose_file_validates_against_the_compose_specification():
    run = _run("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml"))
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_cpu_override_validates_against_the_compose_specification(tmp_path):
    data = tmp_path / "docker-compose.cpu.json"  # the schema tool's YAML reader does not know Compose's tags
    data.write_text(json.dumps(_compose("docker-compose.cpu.yml")))
    run = _run("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(data))
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_schema_check_catches_a_broken_compose_file(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text((ROOT / "docker-compose.yml").read_text().replace("shm_size: 1gb", "shm_sise: 1gb"))
    assert _run("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(broken)).returncode != 0


def _size_bytes(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(text).lower()).groups()
    return int(number) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]


def _minutes(text: str) -> float:
    return sum(int(n) * {"h": 60, "m": 1, "s": 1 / 60}[u] for n, u in re.findall(r"(\d+)([hms])", text))


def test_compose_runs_triton_on_the_gpu_with_a_private_read_only_model_repository():
    triton = _compose("docker-compose.yml")["services"]["triton"]
    assert triton["build"]["context"] == "docker/triton"
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "--model-config-name=gpu" in triton["command"]
    assert _size_bytes(triton["shm_size"]) >= 1 << 30
    assert triton["ulimits"]["memlock"] == -1 and triton["ulimits"]["stack"] >= 64 << 20
    models = [v for v in triton["volumes"] if isinstance(v, dict) and v["target"] == "/models"]
    assert models and models[0]["read_only"] is True
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    assert _minutes(triton["healthcheck"]["start_period"]) >= 15  # TensorRT engine builds
    assert "ports" not in triton  # Triton stays on the compose network


def test_compose_publishes_only_the_gateway_which_balances_over_every_triton_replica():
    services = _compose("docker-compose.yml")["services"]
    assert {name for name, s in services.items() if "ports" in s} == {"gateway", "prometheus"}
    gateway = services["gateway"]
    assert [p.split(":")[-1] for p in gateway["ports"]] == ["50051", "9090"]
    assert gateway["command"][gateway["command"].index("--triton") + 1] == "dns:///triton:8001"
    assert gateway["depends_on"]["triton"]["condition"] == "service_healthy"
    assert gateway["healthcheck"]["test"][1:4] == ["python", "-m", "blip_server.gateway.probe"]
    assert "container_name" not in services["triton"]  # `--scale triton=N` needs unnamed containers


def test_compose_has_prometheus_under_a_profile_scraping_triton_and_the_gateway():
    services = _compose("docker-compose.yml")["services"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["export"]["profiles"] == ["export"]
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {(sd["names"][0], sd["port"]) for job in config["scrape_configs"] for sd in job["dns_sd_configs"]}
    assert targets == {("triton", 8002), ("gateway", 9090)}
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    exprs = " ".join(rule["expr"] for group in alerts["groups"] for rule in group["rules"])
    for metric in ("blip_gateway_requests_total", "blip_gateway_request_duration_seconds_bucket",
                   "blip_gateway_triton_replica_up", "nv_inference_queue_duration_us"):
        assert metric in exprs


def test_the_cpu_override_drops_the_gpu():
    triton = _compose("docker-compose.cpu.yml")["services"]["triton"]
    assert "!reset" in (ROOT / "docker-compose.cpu.yml").read_text() and triton["deploy"] == {}
    assert not any("model-config-name" in arg for arg in triton["command"])


# -- Kubernetes --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    out = {}
    for overlay in OVERLAYS:
        run = _run("kubectl", "kustomize", str(ROOT / "deploy/kubernetes/overlays" / overlay))
        assert run.returncode == 0, run.stderr
        path = tmp_path_factory.mktemp("k8s") / f"{overlay}.yaml"
        path.write_text(run.stdout)
        out[overlay] = (path, [d for d in yaml.safe_load_all(run.stdout) if d])
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_validates_strictly_without_warnings(rendered, overlay):
    path, documents = rendered[overlay]
    run = _run("kubernetes-validate", "--strict", str(path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WARN" not in run.stdout + run.stderr
    assert run.stdout.count("passed") == len(documents)


def test_strict_validation_catches_an_unknown_field(rendered, tmp_path):
    path, _ = rendered["cpu"]
    broken = tmp_path / "broken.yaml"
    broken.write_text(path.read_text().replace("terminationGracePeriodSeconds: 20",
                                               "terminationGracePeriodSeconds: 20\n      replicaz: 3"))
    assert _run("kubernetes-validate", "--strict", str(broken)).returncode != 0


def _find(documents, kind, name):
    (found,) = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_runs_with_probes_shared_memory_and_an_exported_repository(rendered, overlay):
    _, documents = rendered[overlay]
    pod = _find(documents, "Deployment", "blip-triton")["spec"]["template"]["spec"]
    (triton,) = pod["containers"]
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = [m for m in triton["volumeMounts"] if m["mountPath"] == "/dev/shm"][0]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    (export,) = pod["initContainers"]
    assert export["image"].startswith("blip-caption/export") and "triton-container" in export["args"]
    gpu = triton["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpu, "--model-config-name=gpu" in triton["args"]) == ((1, True) if overlay == "gpu" else (None, False))
    if overlay == "cpu":  # the models start a thread per core of the CPU limit (cpu_turns.available_cores)
        assert triton["resources"]["limits"]["cpu"] == triton["resources"]["requests"]["cpu"]


def test_the_gateway_balances_over_the_headless_triton_service_and_is_probed_over_grpc(rendered):
    _, documents = rendered["gpu"]
    service = _find(documents, "Service", "blip-triton")
    assert service["spec"]["clusterIP"] == "None"
    grpc_port = [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"][0]
    deployment = _find(documents, "Deployment", "blip-gateway")
    assert deployment["spec"]["replicas"] >= 2
    (gateway,) = deployment["spec"]["template"]["spec"]["containers"]
    assert gateway["args"][gateway["args"].index("--triton") + 1] == f"dns:///blip-triton:{grpc_port}"
    assert gateway["readinessProbe"]["grpc"]["service"] == "blip.caption.v1.CaptionService"
    assert gateway["livenessProbe"]["grpc"]["service"] == "liveness"
    assert _find(documents, "Service", "blip-gateway")["spec"]["ports"][0]["port"] == 50051


def test_autoscaling_disruption_budgets_and_the_network_policy(rendered):
    _, documents = rendered["gpu"]
    gateway_hpa = _find(documents, "HorizontalPodAutoscaler", "blip-gateway")
    assert gateway_hpa["apiVersion"] == "autoscaling/v2"
    assert gateway_hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    triton_hpa = _find(documents, "HorizontalPodAutoscaler", "blip-triton")
    metric = triton_hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = yaml.safe_load((ROOT / "deploy/kubernetes/prometheus-adapter/values.yaml").read_text())
    assert [rule["name"]["as"] for rule in adapter["rules"]["custom"]] == [metric]
    for name in ("blip-gateway", "blip-triton"):
        assert _find(documents, "PodDisruptionBudget", name)["spec"]["selector"]["matchLabels"] == {
            "app.kubernetes.io/name": name}
    policy = _find(documents, "NetworkPolicy", "blip-triton")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "blip-triton"}
    assert policy["policyTypes"] == ["Ingress"]
    gateway_rule = policy["ingress"][0]
    assert gateway_rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "blip-gateway"}}}]
    assert [p["port"] for p in gateway_rule["ports"]] == [8001]
    assert [p["port"] for rule in policy["ingress"][1:] for p in rule["ports"]] == [8002]  # metrics only


# -- images ------------------------------------------------------------------------------------------------------

DOCKERFILES = sorted((ROOT / "docker").glob("*/Dockerfile"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfiles_pass_hadolint(dockerfile):
    run = _run("hadolint", "--failure-threshold", "info", str(dockerfile))
    assert run.returncode == 0, run.stdout + run.stderr


def _pip_requirements(dockerfile: Path) -> list[str]:
    text = dockerfile.read_text().replace("\\\n", " ")
    return [r.strip('"') for line in re.findall(r"pip install ([^&\n]*)", text)
            for r in line.split() if not r.startswith("-") and "://" not in r and r not in (".", '"${TORCH_INDEX}"')]


def test_the_triton_image_extends_nvidias_and_installs_pinned_model_dependencies_only():
    dockerfile = ROOT / "docker/triton/Dockerfile"
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:24\.10-py3$", dockerfile.read_text(), re.M)
    requirements = _pip_requirements(dockerfile)
    assert {r.split("==")[0].lower() for r in requirements} == {"torch", "numpy", "tokenizers", "safetensors", "pillow"}
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.]+", r) for r in requirements), requirements
    assert "numpy==1.26.4" in requirements  # numpy < 2


def test_the_gateway_image_is_slim_non_root_and_runs_blip_gateway():
    text = (ROOT / "docker/gateway/Dockerfile").read_text()
    assert re.search(r"^FROM python:[\d.]+-slim", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert '"blip-gateway"' in re.search(r"^ENTRYPOINT (.*)$", text, re.M).group(1)
    assert "pip install --no-cache-dir --no-deps ." in text


def _pyproject_pins() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    return {re.sub(r"\[.*\]", "", m.group(1)).lower().replace("_", "-"): m.group(2)
            for m in re.finditer(r'"([A-Za-z0-9_.\-\[\]]+)==([^"]+)"', text)}


def test_the_gateway_images_pins_equal_the_projects():
    pins = _pyproject_pins()
    lines = [line for line in (ROOT / "docker/gateway/requirements.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    shared = 0
    for line in lines:
        name, version = line.split("==")
        name = re.sub(r"\[.*\]", "", name).lower().replace("_", "-")
        if name in pins:
            assert pins[name] == version, name
            shared += 1
    assert shared >= 7  # grpcio, its health and reflection, protobuf, tritonclient, prometheus-client, Pillow


def test_the_gateway_runs_without_the_models_libraries():
    """What the gateway image installs is enough: blip-gateway loads none of the model's libraries (it reads image
    headers with Pillow, which its image installs)."""
    blocked = ["torch", "transformers", "onnx", "onnxruntime", "tokenizers", "safetensors", "pytriton"]
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        f"    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}: raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from blip_server.gateway.command import main\n"
        "import blip_server.gateway.probe\n"
        "sys.exit(main(['--help']))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "--triton" in run.stdout


# -- the model repository runs on the container's Python 3.10 ------------------------------------------------------


def test_the_model_repository_needs_nothing_newer_than_python_3_10():
    run = _run("vermin", "-t=3.10-", "--violations", "--no-tips", "--eval-annotations", str(ROOT / "model_repository"))
    assert run.returncode == 0, run.stdout + run.stderr
    import ast

    for path in (ROOT / "model_repository").rglob("*.py"):
        ast.parse(path.read_text(), str(path), feature_version=(3, 10))


def test_vermin_would_catch_python_3_11_code(tmp_path):
    (tmp_path / "newer.py").write_text("import tomllib\n")
    assert _run("vermin", "-t=3.10-", "--violations", "--no-tips", str(tmp_path)).returncode != 0
