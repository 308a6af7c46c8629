"""Deployment files, validated offline with the real tools (no Docker engine or cluster exists here): the compose
files against the Compose specification's schema (check-jsonschema), every kustomize overlay rendered by kubectl's
kustomize and validated by kubernetes-validate --strict (a warning fails), the Dockerfiles by hadolint, everything
by checkov (0 failed checks; each skip inline, with its reason), and their contents against what the deployment
needs. tests/container runs the images and Compose for real (podman)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from blip_server.repository import SHARED_MODULES
from support import side_environment
from support.deployment import BIN, ROOT, compose, find, kustomize

OVERLAYS = ("cpu", "gpu")
KUBERNETES = ROOT / "deploy" / "kubernetes"
CHECKOV = "checkov==3.3.30"


def _run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / command[0]), *command[1:]], capture_output=True, text=True, timeout=120, **kwargs)


def _dockerfile(name: str) -> str:
    return (ROOT / "docker" / name / "Dockerfile").read_text()


# -- docker compose ----------------------------------------------------------------------------------------------


def test_the_compose_file_validates_against_the_compose_specification():
    run = _run("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml"))
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_cpu_override_validates_against_the_compose_specification(tmp_path):
    data = tmp_path / "docker-compose.cpu.json"  # the schema tool's YAML reader does not know Compose's tags
    data.write_text(json.dumps(compose("docker-compose.cpu.yml")))
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


def _volumes(service: dict) -> list[dict]:
    """A service's volumes in the long syntax (the short one, "[SOURCE:]TARGET[:MODE]", converted)."""
    volumes = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
            volume = {"type": "bind" if source and source.startswith((".", "/")) else "volume", "target": target,
                      **({"source": source} if source else {}), **({"read_only": True} if parts[2:] == ["ro"] else {})}
        volumes.append(volume)
    return volumes


def _volume(service: dict, target: str) -> dict:
    (volume,) = [v for v in _volumes(service) if v["target"] == target]
    return volume


def test_compose_runs_triton_on_the_gpu_with_a_private_read_only_model_repository():
    triton = compose("docker-compose.yml")["services"]["triton"]
    assert triton["build"]["dockerfile"] == "docker/triton/Dockerfile"
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert _size_bytes(triton["shm_size"]) >= 1 << 30
    assert triton["ulimits"]["memlock"] == -1 and triton["ulimits"]["stack"] >= 64 << 20
    assert _volume(triton, "/models")["read_only"] is True
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    assert _minutes(triton["healthcheck"]["start_period"]) >= 15  # TensorRT engine builds
    assert "ports" not in triton  # Triton stays on the compose network


def test_compose_gives_each_triton_replica_a_tensorrt_cache_of_its_own():
    """An anonymous volume: `--scale triton=N` gives each replica its own, so no two write one engine file."""
    services = compose("docker-compose.yml")
    cache = _volume(services["services"]["triton"], "/cache/tensorrt")
    assert cache["type"] == "volume" and "source" not in cache
    assert "tensorrt-cache" not in (services.get("volumes") or {})


def test_compose_publishes_only_the_gateway_which_balances_over_every_triton_replica():
    services = compose("docker-compose.yml")["services"]
    assert {name for name, s in services.items() if "ports" in s} == {"gateway", "prometheus"}
    gateway = services["gateway"]
    assert [p.split(":")[-1] for p in gateway["ports"]] == ["50051", "9090"]
    assert gateway["command"][gateway["command"].index("--triton") + 1] == "dns:///triton:8001"
    assert gateway["depends_on"]["triton"]["condition"] == "service_healthy"
    assert gateway["healthcheck"]["test"][1:4] == ["python", "-m", "blip_server.gateway.probe"]
    assert "container_name" not in services["triton"]  # `--scale triton=N` needs unnamed containers


def test_compose_has_prometheus_under_a_profile_scraping_triton_and_the_gateway():
    services = compose("docker-compose.yml")["services"]
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
    triton = compose("docker-compose.cpu.yml")["services"]["triton"]
    assert "!reset" in (ROOT / "docker-compose.cpu.yml").read_text() and triton["deploy"] == {}
    assert not any("model-config-name" in arg for arg in triton["command"])


@pytest.mark.parametrize("name", ["export", "triton", "gateway"])
def test_compose_services_run_hardened(name):
    service = compose("docker-compose.yml")["services"][name]
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]


# -- what the containers write: it exists in the image and belongs to its user -------------------------------------

# image -> (the user it runs as, the paths it writes besides /tmp and /dev/shm)
WRITES = {"export": ("10001", ["/models"]), "triton": ("1000", ["/cache/tensorrt"]), "gateway": ("10001", [])}
COMPOSE_SERVICE = {"export": "export", "triton": "triton", "gateway": "gateway"}


@pytest.mark.parametrize("image", sorted(WRITES))
def test_every_path_a_container_writes_exists_in_its_image_and_belongs_to_its_user(image):
    text = _dockerfile(image)
    user, paths = WRITES[image]
    assert re.findall(r"^USER (\S+)$", text, re.M)[-1] == user
    for path in paths:
        assert re.search(rf"mkdir -p [^&\n]*{re.escape(path)}\b", text), f"{image}: {path} is not created"
        assert re.search(rf"chown {user}:{user} [^&\n]*{re.escape(path)}\b", text), f"{image}: {path} is not {user}'s"
    # Compose mounts a volume on each (the root file system is read-only), and a tmpfs on /tmp.
    service = compose("docker-compose.yml")["services"][COMPOSE_SERVICE[image]]
    mounted = {v["target"] for v in _volumes(service)}
    assert set(paths) <= mounted
    if image != "gateway":
        assert _volume(service, "/tmp")["type"] == "tmpfs"


# -- Kubernetes --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    out = {}
    for overlay in OVERLAYS:
        text, documents = kustomize(KUBERNETES / "overlays" / overlay)
        path = tmp_path_factory.mktemp("k8s") / f"{overlay}.yaml"
        path.write_text(text)
        out[overlay] = (path, documents)
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_runs_with_probes_shared_memory_and_its_repository_from_a_model_image(rendered, overlay):
    _, documents = rendered[overlay]
    pod = find(documents, "Deployment", "blip-triton")["spec"]["template"]["spec"]
    (triton,) = pod["containers"]
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in triton["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    # No shared file system: the model image's init container copies the repository into the pod's own volume.
    assert all("persistentVolumeClaim" not in v for v in volumes.values())
    (model,) = pod["initContainers"]
    assert model["image"].startswith("blip-caption/model:") and model["args"] == ["/models/repository"]
    (init_mount,) = model["volumeMounts"]
    assert (init_mount["mountPath"], init_mount["name"]) == ("/models", mounts["/models"]["name"])
    assert mounts["/models"]["readOnly"] is True
    gpu = triton["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpu, "--model-config-name=gpu" in triton["args"]) == ((1, True) if overlay == "gpu" else (None, False))
    if overlay == "cpu":  # the models start a thread per core of the CPU limit (cpu_turns.available_cores)
        assert triton["resources"]["limits"]["cpu"] == triton["resources"]["requests"]["cpu"]


def test_the_model_images_entrypoint_is_the_idempotent_copy():
    text = _dockerfile("model")
    assert 'ENTRYPOINT ["python3", "-I", "/opt/blip/repository_copy.py", "/opt/model/repository"]' in text
    assert "COPY --from=export /opt/blip/server/blip_server/repository_copy.py" in text
    assert re.search(r"blip-export --model /checkpoint --output /models/repository", text)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_restricted_and_bounded(rendered, overlay):
    """The restricted Pod Security Standard the namespace enforces, and requests and limits for every resource a
    pod uses (each Triton pod writes a copy of the repository and TensorRT engines: ephemeral storage)."""
    _, documents = rendered[overlay]
    namespace = find(documents, "Namespace", "blip-caption")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for deployment in (d for d in documents if d["kind"] == "Deployment"):
        assert deployment["metadata"]["namespace"] == "blip-caption"
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
            assert context["readOnlyRootFilesystem"] is True
            for kind in ("requests", "limits"):
                assert {"cpu", "memory", "ephemeral-storage"} <= set(container["resources"][kind]), container["name"]
            assert container["imagePullPolicy"] == "Always"
    triton = find(documents, "Deployment", "blip-triton")["spec"]["template"]["spec"]
    assert triton["securityContext"]["fsGroup"] == 1000  # an engine cache on a PersistentVolume is writable
    writable = {m["mountPath"] for m in triton["containers"][0]["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/cache/tensorrt", "/dev/shm", "/tmp"}


def test_no_deployment_managed_by_an_hpa_pins_its_replicas(rendered):
    for overlay in OVERLAYS:
        _, documents = rendered[overlay]
        scaled = {h["spec"]["scaleTargetRef"]["name"] for h in documents if h["kind"] == "HorizontalPodAutoscaler"}
        assert scaled == {"blip-gateway", "blip-triton"}
        for name in scaled:
            assert "replicas" not in find(documents, "Deployment", name)["spec"], (overlay, name)


def test_the_gateway_balances_over_the_headless_triton_service_and_is_probed_over_grpc(rendered):
    _, documents = rendered["gpu"]
    service = find(documents, "Service", "blip-triton")
    assert service["spec"]["clusterIP"] == "None"
    grpc_port = [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"][0]
    deployment = find(documents, "Deployment", "blip-gateway")
    assert find(documents, "HorizontalPodAutoscaler", "blip-gateway")["spec"]["minReplicas"] >= 2
    (gateway,) = deployment["spec"]["template"]["spec"]["containers"]
    assert gateway["args"][gateway["args"].index("--triton") + 1] == f"dns:///blip-triton:{grpc_port}"
    assert gateway["readinessProbe"]["grpc"]["service"] == "blip.caption.v1.CaptionService"
    assert gateway["livenessProbe"]["grpc"]["service"] == "liveness"
    assert find(documents, "Service", "blip-gateway")["spec"]["ports"][0]["port"] == 50051


def test_autoscaling_disruption_budgets_and_network_policies(rendered):
    _, documents = rendered["gpu"]
    gateway_hpa = find(documents, "HorizontalPodAutoscaler", "blip-gateway")
    assert gateway_hpa["apiVersion"] == "autoscaling/v2"
    assert gateway_hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    triton_hpa = find(documents, "HorizontalPodAutoscaler", "blip-triton")
    metric = triton_hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = yaml.safe_load((KUBERNETES / "prometheus-adapter/values.yaml").read_text())
    assert [rule["name"]["as"] for rule in adapter["rules"]["custom"]] == [metric]
    for name in ("blip-gateway", "blip-triton"):
        budget = find(documents, "PodDisruptionBudget", name)["spec"]
        assert budget["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        # A drain never evicts the last ready replica (maxUnavailable 1 let it take the only Triton pod).
        assert budget["minAvailable"] == 1 and "maxUnavailable" not in budget
        assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    policy = find(documents, "NetworkPolicy", "blip-triton")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "blip-triton"}
    assert policy["policyTypes"] == ["Ingress"]
    gateway_rule = policy["ingress"][0]
    assert gateway_rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "blip-gateway"}}}]
    assert [p["port"] for p in gateway_rule["ports"]] == [8001]
    assert [p["port"] for rule in policy["ingress"][1:] for p in rule["ports"]] == [8002]  # metrics only
    gateway = find(documents, "NetworkPolicy", "blip-gateway")["spec"]
    assert [[p["port"] for p in rule["ports"]] for rule in gateway["ingress"]] == [[50051], [9090]]
    assert "from" not in gateway["ingress"][0]  # the API is public


def test_a_pod_monitor_selects_the_pods_the_triton_hpas_metric_comes_from(rendered):
    """kube-prometheus-stack scrapes what PodMonitors select (it ignores prometheus.io annotations): the Triton
    HPA's metric exists only if one selects the pods of its Deployment, on the port serving nv_inference_*."""
    _, documents = rendered["gpu"]
    _, monitors = kustomize(KUBERNETES / "monitoring")
    hpa = find(documents, "HorizontalPodAutoscaler", "blip-triton")
    target = find(documents, hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
    labels = target["spec"]["template"]["metadata"]["labels"]
    (triton,) = target["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    selecting = [m for m in monitors if m["kind"] == "PodMonitor"
                 and m["metadata"]["namespace"] == target["metadata"]["namespace"]
                 and m["spec"]["selector"]["matchLabels"].items() <= labels.items()]
    assert selecting, "no PodMonitor selects the Triton pods"
    (endpoint,) = selecting[0]["spec"]["podMetricsEndpoints"]
    assert ports[endpoint["port"]] == 8002  # Triton's metrics port
    # The adapter's rule needs the namespace and pod labels a PodMonitor's targets carry.
    adapter = yaml.safe_load((KUBERNETES / "prometheus-adapter/values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert "prometheus.io/scrape" not in json.dumps(documents)  # nothing pretends annotations are scraped


def test_images_are_renamed_in_one_documented_command(tmp_path):
    """deploy/images.py writes an overlay whose every image comes from the registry given (the manifests' names,
    blip-caption/*, resolve to no registry anyone serves)."""
    output = tmp_path / "mine"
    run = subprocess.run([sys.executable, str(ROOT / "deploy" / "images.py"), "--registry", "registry.example.com/team",
                          "--tag", "1.2.3", "--overlay", "gpu", "--no-build", "--output", str(output)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    _, documents = kustomize(output)
    images = [c["image"] for d in documents if d["kind"] == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"]
              + d["spec"]["template"]["spec"].get("initContainers", [])]
    assert sorted(images) == ["registry.example.com/team/blip-caption-gateway:1.2.3",
                              "registry.example.com/team/blip-caption-model:1.2.3",
                              "registry.example.com/team/blip-caption-triton:1.2.3"]
    assert "deploy/images.py" in (ROOT / "README.md").read_text()


def test_the_image_command_builds_every_image_from_its_dockerfile_and_pushes_what_pods_run(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "deploy" / "images.py"), "--registry", "r.example/t",
                          "--checkpoint", str(tmp_path), "--precision", "fp16", "--push", "--builder", "podman",
                          "--output", str(tmp_path / "o"), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    commands = [line[2:].split() for line in run.stdout.splitlines() if line.startswith("+ ")]
    builds = {c[c.index("-t") + 1]: c for c in commands if c[1] == "build"}
    assert sorted(builds) == [f"r.example/t/blip-caption-{n}:0.1.0" for n in ("export", "gateway", "model", "triton")]
    for tag, command in builds.items():
        name = tag.split("blip-caption-")[1].split(":")[0]
        assert command[command.index("-f") + 1] == str(ROOT / "docker" / name / "Dockerfile")
    model = builds["r.example/t/blip-caption-model:0.1.0"]
    assert model[-1] == str(tmp_path) and "--build-arg=PRECISION=fp16" in model
    assert "--build-arg=EXPORT_IMAGE=r.example/t/blip-caption-export:0.1.0" in model
    assert sorted(c[2] for c in commands if c[1] == "push") == [
        f"r.example/t/blip-caption-{n}:0.1.0" for n in ("gateway", "model", "triton")]
    assert not (tmp_path / "o").exists()  # a dry run changes nothing


# -- images ------------------------------------------------------------------------------------------------------

DOCKERFILES = sorted((ROOT / "docker").glob("*/Dockerfile"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfiles_pass_hadolint(dockerfile):
    run = _run("hadolint", "--failure-threshold", "info", str(dockerfile))
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfiles_take_their_base_and_pip_options_as_build_arguments(dockerfile):
    """So that the same steps build offline from stand-in bases (tests/container), defaulting to the real ones."""
    text = dockerfile.read_text()
    bases = re.findall(r"^FROM \$\{(\w+)\}", text, re.M)
    assert bases, "the base image is not a build argument"
    for base in bases:
        default = re.search(rf"^ARG {base}=(\S+)$", text, re.M).group(1)
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", default), default  # a tagged default
    for line in re.findall(r"pip install [^\n]*", text):
        assert "${PIP_OPTIONS}" in line, line


def _pyproject_pins() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    return {re.sub(r"\[.*\]", "", m.group(1)).lower().replace("_", "-"): m.group(2)
            for m in re.finditer(r'"([A-Za-z0-9_.\-\[\]]+)==([^"]+)"', text)}


def _requirements(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {re.sub(r"\[.*\]", "", name).lower().replace("_", "-"): version
            for name, version in (line.split("==") for line in lines)}


def test_the_triton_image_extends_nvidias_and_installs_pinned_model_dependencies_only():
    text = _dockerfile("triton")
    assert re.search(r"^ARG TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:24\.10-py3$", text, re.M)
    # torch: the last PyPI release built for CUDA 12.6, the image's CUDA (2.13.0's is CUDA 13: driver 580+).
    assert re.search(r'^ARG TORCH_REQUIREMENT="torch==2\.7\.1"$', text, re.M)
    requirements = _requirements(ROOT / "docker" / "triton" / "requirements.txt")
    assert set(requirements) == {"numpy", "tokenizers", "safetensors", "pillow"}
    pins = _pyproject_pins()
    for name in ("tokenizers", "safetensors"):
        assert requirements[name] == pins[name], name
    # Pillow 13 has no Python 3.10 wheels: 12.3.0, whose pixels tests/integration/test_container_pillow.py holds
    # equal to 13.0.0's. numpy: within the project's range (below 2, for nvidia-pytriton).
    assert requirements["pillow"] == "12.3.0"
    assert requirements["numpy"] == "1.26.4" and '"numpy>=1.26,<2"' in (ROOT / "pyproject.toml").read_text()


def test_the_gateway_image_is_slim_non_root_and_runs_blip_gateway():
    text = _dockerfile("gateway")
    assert re.search(r"^ARG PYTHON_IMAGE=python:[\d.]+-slim", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert '"blip-gateway"' in re.search(r"^ENTRYPOINT (.*)$", text, re.M).group(1)
    assert "--no-deps ." in text


def test_the_gateway_images_pins_equal_the_projects():
    pins = _pyproject_pins()
    requirements = _requirements(ROOT / "docker" / "gateway" / "requirements.txt")
    shared = [name for name in requirements if name in pins]
    for name in shared:
        assert pins[name] == requirements[name], name
    assert len(shared) >= 7  # grpcio, its health and reflection, protobuf, tritonclient, prometheus-client, Pillow


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
        "from blip_server.gateway.main import main\n"
        "import blip_server.gateway.probe\n"
        "sys.exit(main(['--help']))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "--triton" in run.stdout


# Hosts of package registries: pip's default index needs no URL, and nothing here may depend on one by name.
REGISTRY_HOSTS = ("pypi.org", "pythonhosted.org", "download.pytorch.org", "pypi.nvidia.com", "pypi.ngc.nvidia.com",
                  "registry.npmjs.org", "deb.debian.org", "security.debian.org", "conda.anaconda.org")


def test_no_package_registry_host_is_named_in_the_repository():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    named = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.suffix in (".safetensors", ".png", ".jpg", ".onnx"):
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        named += [f"{name}: {host}" for host in REGISTRY_HOSTS
                  if host in text and name != Path(__file__).relative_to(ROOT).as_posix()]
    assert named == []


# -- static analysis: checkov ------------------------------------------------------------------------------------


def test_checkov_finds_nothing_in_the_deployment_files():
    """checkov (in an environment of its own: its dependencies conflict with this project's pins) on the
    repository's Kubernetes manifests, kustomize overlays and Dockerfiles: 0 failed checks. Each check skipped is
    skipped inline where it applies, with the reason (`checkov.io/skip*` annotations, `# checkov:skip=` lines)."""
    python = side_environment.environment([CHECKOV])
    run = subprocess.run([str(python.parent / "checkov"), "--directory", str(ROOT), "--framework", "kubernetes",
                          "kustomize", "dockerfile", "--skip-download", "--output", "json"],
                         capture_output=True, text=True, timeout=600,
                         env={"PATH": f"{BIN}:/usr/bin:/bin", "BC_SKIP_MAPPING": "TRUE", "HOME": str(Path.home())})
    reports = json.loads(run.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    frameworks = {r["check_type"]: r for r in reports}
    assert set(frameworks) == {"kubernetes", "kustomize", "dockerfile"}, run.stderr[-2000:]
    failed = [f"{r['check_type']}: {c['check_id']} {c['resource']} ({c['file_path']})"
              for r in reports for c in r["results"]["failed_checks"]]
    assert failed == []
    for report in reports:
        assert report["summary"]["passed"] > 0 and report["summary"]["failed"] == 0
        for check in report["results"]["skipped_checks"]:
            assert len(check["check_result"].get("suppress_comment", "")) > 20, check["check_id"]  # a reason


# -- what runs on NGC's Python 3.10 -------------------------------------------------------------------------------

# The model repository, the shared modules blip-export copies into every repository (SHARED_MODULES, named one by
# one so that a module renamed or moved out of shared/ fails here instead of going unchecked, and the rest of
# shared/), and blip-tritonserver's files.
SHARED = ROOT / "server" / "blip_server" / "shared"
PYTHON_3_10 = [ROOT / "model_repository", *(SHARED / module for module in SHARED_MODULES), SHARED,
               ROOT / "server" / "blip_server" / "triton_command.py", ROOT / "server" / "blip_server" / "memory.py"]


def test_what_runs_in_the_triton_image_needs_nothing_newer_than_python_3_10():
    assert SHARED_MODULES and all(path.is_file() for path in PYTHON_3_10 if path.suffix == ".py")
    run = _run("vermin", "-t=3.10-", "--violations", "--no-tips", "--eval-annotations", *map(str, PYTHON_3_10))
    assert run.returncode == 0, run.stdout + run.stderr
    import ast

    for path in PYTHON_3_10:
        for file in [path] if path.is_file() else path.rglob("*.py"):
            ast.parse(file.read_text(), str(file), feature_version=(3, 10))
    copied = re.search(r"^COPY (server/\S+triton_command\.py .*) /opt/blip/$", _dockerfile("triton"), re.M).group(1)
    for source in copied.split():  # everything the image copies is checked above
        assert any(ROOT / source == p or p in (ROOT / source).parents for p in PYTHON_3_10), source


def test_vermin_would_catch_python_3_11_code(tmp_path):
    (tmp_path / "newer.py").write_text("import tomllib\n")
    assert _run("vermin", "-t=3.10-", "--violations", "--no-tips", str(tmp_path)).returncode != 0


def test_the_gateways_api_keys_come_from_a_mounted_secret_its_user_can_read(rendered):
    """A file, not an environment variable (which child processes inherit and crash reports show); a Secret that
    is not there keeps the pod from starting rather than the API from requiring keys."""
    _, documents = rendered["gpu"]
    pod = find(documents, "Deployment", "blip-gateway")["spec"]["template"]["spec"]
    (gateway,) = pod["containers"]
    assert "env" not in gateway
    path = gateway["args"][gateway["args"].index("--api-keys-file") + 1]
    (mount,) = [m for m in gateway["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "blip-api-keys" and not volume["secret"].get("optional", False)
    assert volume["secret"]["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == 10001
    assert path.rsplit("/", 1)[1] == "keys"
