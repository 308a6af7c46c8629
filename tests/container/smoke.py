"""Container smoke test: the production images built from their Dockerfiles and run the Compose way, here.

No Docker engine and no image registry exist on these machines, so Podman (Debian's) runs the containers as root
and podman-compose 1.6.0 runs docker-compose.yml with docker-compose.cpu.yml, over stand-ins for the two base
images, built from Debian 12 with debootstrap:

- the Python image (python:3.11.14-slim-bookworm): bookworm's Python 3.11 with pip, `python` and `pip` on PATH,
  pip allowed to install system-wide;
- NVIDIA's Triton image (nvcr.io/nvidia/tritonserver:24.10-py3): the same tritonserver 2.51 and Python backend
  that blip-serve embeds (the nvidia-pytriton wheel's), laid out as NGC lays them out (tests/container/
  triton-standin).

Packages come from wheels downloaded on the host into a cache and mounted into the builds (the Dockerfiles' own
`pip install` steps run, with PIP_OPTIONS="--no-index --find-links /wheels"); torch is the CPU build of 2.13.0.

What it runs and checks, in order (it stops at the first failure, prints the containers' logs, and always removes
every container, volume, network and image it made):

 1. reference captions of examples/*.jpg from `blip-serve` on the host;
 2. builds the images: the stand-ins, then triton, gateway and export through `podman-compose build` (the
    Compose files' build sections and arguments), then docker/model/Dockerfile's model image (the checkpoint as
    build context, `--target embedded`);
 3. `podman-compose --profile export run --rm export` (models/blip-demo, BLIP_EXPORT_TARGET=embedded) into the
    fresh named volume: the volume takes the image's /models ownership (uid 10001), every file is readable by
    Triton's user (uid 1000); a second run keeps the export;
 4. `podman-compose up -d` with the CPU override; runs both health checks (the Compose files' own commands, with
    `podman healthcheck run`: Podman's timers need systemd, which these machines lack) until healthy;
 5. captions through the gateway's published port (127.0.0.1, a free port) with the SDK, equal to the host's;
 6. what the containers run as: users, PID 1's command line and environment (NGC's entrypoint -> blip-tritonserver
    -> tritonserver with the project's flags), read-only root, no capabilities, no-new-privileges, the tmpfs and
    volumes writable or not as meant, Triton's shared memory and ulimits;
 7. `up -d --scale triton=2`: the service name resolves to both replicas, the gateway reports both up, and calls
    reach both (each replica's own inference statistics);
 8. runs the model image twice into one volume as the Kubernetes init container would (uid 1000, fsGroup 1000,
    read-only, no capabilities): the first run copies, the second keeps the copy untouched.

`--show-a846359-bug` also builds the export image as it was at commit a846359 (no /models in the image) and runs
it into a fresh named volume, printing the failure that the issue reports (not counted as a test failure).

Run it through tests/container/run.sh (installs Podman, debootstrap and podman-compose when missing). Needs root.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("BLIP_CONTAINER_TEST_CACHE") or Path.home() / ".cache/blip-caption/container-test")
PODMAN_COMPOSE = os.environ.get("PODMAN_COMPOSE", "podman-compose")
MIRROR = os.environ.get("BLIP_CONTAINER_TEST_MIRROR", "")  # empty: debootstrap's default Debian mirror
TIME_LIMIT_S = 12 * 60  # the checks; cleanup gets up to 2 more minutes (the whole run must stay under 15)

# The base root file system of both stand-ins (cached as a tar file, keyed by this recipe).
ROOTFS_RECIPE = {
    "suite": "bookworm",
    "variant": "minbase",
    "mirror": MIRROR,
    "packages": ["python3", "python3-pip", "libpython3.11"],
    # python:*-slim has `python` and `pip` and lets pip install system-wide; so does NGC's image.
    "setup": "ln -sf python3 /usr/bin/python && ln -sf pip3 /usr/bin/pip"
             " && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED && apt-get clean && rm -rf /var/lib/apt/lists/*",
}
TORCH_REQUIREMENT = "torch==2.13.0"  # the Triton image's build argument (the CPU wheel is the one in the cache)
TORCH_CPU = "torch==2.13.0+cpu"  # what the host downloads: only the local CPU wheel matches, never PyPI's CUDA one
EXTRA_REQUIREMENTS = "onnxruntime==1.32.0"  # the embedded target's encoder is a Python model running ONNX Runtime
PIP_OPTIONS = "--no-index --find-links /wheels"
EXPORT_UID, TRITON_UID = 10001, 1000

COMPOSE_IMAGES = ("blip-caption/triton:24.10", "blip-caption/gateway:0.1.0", "blip-caption/export:0.1.0")


class Failure(Exception):
    """A check failed: the message says what, with the evidence."""


class Stop(BaseException):
    """SIGTERM or SIGHUP: clean up and leave."""


def _on_signal(signum, _frame):
    raise Stop(f"signal {signum}")


class Runner:
    """Runs commands, logging each with its output to a log file; prints what it runs."""

    def __init__(self, log_path: Path, deadline: float, verbose: bool):
        self.log = log_path.open("a")
        self.deadline = deadline
        self.verbose = verbose
        self.started = time.monotonic()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def __call__(self, cmd: list[str], *, check: bool = True, timeout: float = 600, env: dict | None = None,
                 cwd: Path = ROOT, quiet: bool = False, merge: bool = True) -> subprocess.CompletedProcess:
        """Run `cmd`; its stdout (with its stderr where `merge`, else stderr apart, for output to be parsed)."""
        shown = " ".join(cmd)
        if not quiet:
            self.say(f"+ {shown}")
        self.log.write(f"$ {shown}\n")
        self.log.flush()
        limit = max(5.0, min(timeout, self.remaining()))
        try:
            result = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT if merge else subprocess.PIPE, text=True,
                                    errors="replace", timeout=limit)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
            self.log.write(out + f"\n(timed out after {limit:.0f} s)\n")
            raise Failure(f"timed out after {limit:.0f} s: {shown}\n{tail(out)}") from None
        output = result.stdout + (result.stderr or "")
        self.log.write(output + f"(exit {result.returncode})\n")
        self.log.flush()
        if self.verbose and not quiet:
            print(output, end="", flush=True)
        if check and result.returncode != 0:
            raise Failure(f"exit {result.returncode}: {shown}\n{tail(output)}")
        return result


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def sha(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def requirements(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


# ---- cached inputs: root file system and wheels ------------------------------------------------------------------

def cached_rootfs(run: Runner) -> Path:
    """A tar of a bookworm minbase root with Python 3.11 and pip (debootstrap, about 2 minutes once)."""
    tar = CACHE / f"rootfs-bookworm-python-{sha(ROOTFS_RECIPE)}.tar"
    if tar.exists():
        run.say(f"root file system: cached {tar}")
        return tar
    CACHE.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
    try:
        root = build / "root"
        r = ROOTFS_RECIPE
        mirror = [r["mirror"]] if r["mirror"] else []
        run(["debootstrap", f"--variant={r['variant']}", r["suite"], str(root), *mirror], timeout=420)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["chroot", str(root), "apt-get", "update", "-qq"], env=env, timeout=300)
        run(["chroot", str(root), "apt-get", "install", "-y", "-qq", "--no-install-recommends", *r["packages"]],
            env=env, timeout=420)
        run(["chroot", str(root), "sh", "-c", r["setup"]], env=env)
        partial = build / "rootfs.tar"
        run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], timeout=300)
        partial.rename(tar)
        prune("rootfs-bookworm-python-", keep=tar)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return tar


def prune(prefix: str, keep: Path) -> None:
    """Remove the cache's older entries of one kind (made for other pins or recipes)."""
    for old in CACHE.glob(f"{prefix}*"):
        if old != keep:
            shutil.rmtree(old) if old.is_dir() else old.unlink()


def wheel_sets() -> dict[str, list[str]]:
    """What each image's pip installs, as the host downloads it (torch: the local CPU wheel)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dependencies = [TORCH_CPU if d == TORCH_REQUIREMENT else d for d in project["project"]["dependencies"]]
    if TORCH_CPU not in dependencies:
        raise Failure(f"pyproject.toml no longer depends on {TORCH_REQUIREMENT}: update tests/container/smoke.py")
    return {
        "build": list(project["build-system"]["requires"]),  # pip's isolated builds of the project
        "gateway": requirements(ROOT / "docker/gateway/requirements.txt"),
        "triton": [TORCH_CPU, *requirements(ROOT / "docker/triton/requirements.txt"), EXTRA_REQUIREMENTS],
        "export": dependencies,
    }


def cached_wheels(run: Runner) -> Path:
    """Every wheel the images install, for CPython 3.11 on Linux x86-64, downloaded once per set of pins."""
    if sys.version_info[:2] != (3, 11):
        raise Failure("the wheels are downloaded for the images' Python 3.11: run this with a Python 3.11 .venv")
    sets = wheel_sets()
    folder = CACHE / f"wheels-cp311-{sha(sets)}"
    if (folder / ".complete").exists():
        run.say(f"wheels: cached {folder}")
        return folder
    partial = CACHE / f".{folder.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for reqs in sets.values():
        run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
             "--dest", str(partial), *reqs], timeout=600)
    torches = sorted(p.name for p in partial.glob("torch-*.whl"))
    if len(torches) != 1 or "+cpu" not in torches[0]:
        raise Failure(f"expected exactly the CPU torch wheel, got {torches}")
    (partial / ".complete").write_text(json.dumps(sets, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    prune("wheels-cp311-", keep=folder)
    return folder


# ---- podman helpers ----------------------------------------------------------------------------------------------

def podman_objects(run: Runner) -> dict[str, set[str]]:
    """Every container, pod, volume, network and image that exists now (to remove exactly what this run made)."""
    lists = {
        "container": ["podman", "ps", "-a", "-q", "--no-trunc"],
        "pod": ["podman", "pod", "ps", "-q", "--no-trunc"],
        "volume": ["podman", "volume", "ls", "-q"],
        "network": ["podman", "network", "ls", "-q", "--format", "{{.Name}}"],
        "image": ["podman", "images", "-a", "-q", "--no-trunc"],
    }
    return {kind: set(run(cmd, quiet=True, merge=False).stdout.split()) for kind, cmd in lists.items()}


def inspect(run: Runner, name: str, fmt: str | None = None):
    out = run(["podman", "inspect", name, *(["--format", fmt] if fmt else [])], quiet=True, merge=False).stdout
    return out.strip() if fmt else json.loads(out)[0]


def container_python(run: Runner, name: str, code: str, check: bool = True) -> str:
    """Run Python in a running container (as its own user) and return what it printed."""
    return run(["podman", "exec", name, "python3", "-c", code], quiet=True, check=check, timeout=60,
               merge=False).stdout.strip()


# ---- the test ----------------------------------------------------------------------------------------------------

class SmokeTest:
    def __init__(self, run: Runner, work: Path):
        self.run = run
        self.work = work
        self.id = secrets.token_hex(3)
        self.project = f"blipsmoke{self.id}"
        self.python_image = f"localhost/blip-smoke-{self.id}/python:3.11-bookworm"
        self.triton_base = f"localhost/blip-smoke-{self.id}/tritonserver:24.10-standin"
        self.model_image = f"localhost/blip-smoke-{self.id}/model:demo"
        from blip_server.ports import free_ports

        self.port, self.metrics_port = free_ports(2)
        self.rootfs: Path | None = None
        self.wheels: Path | None = None
        self.memlock = resource.RLIM_INFINITY  # Triton's, as docker-compose.yml asks
        self.override: Path | None = None  # a Compose file of this run's own, where this machine needs one
        self.reference: dict[str, tuple[str, float]] = {}
        self.export_manifest: dict | None = None

    # compose ------------------------------------------------------------------------------------------------
    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        env = {
            **os.environ,
            "BLIP_PYTHON_IMAGE": self.python_image,
            "BLIP_TRITON_IMAGE": self.triton_base,
            "BLIP_PIP_OPTIONS": PIP_OPTIONS,
            "BLIP_TORCH_REQUIREMENT": TORCH_REQUIREMENT,
            "BLIP_EXTRA_REQUIREMENTS": EXTRA_REQUIREMENTS,
            "BLIP_CHECKPOINT": str(ROOT / "models/blip-demo"),
            "BLIP_EXPORT_TARGET": "embedded",
            "BLIP_PRECISION": "fp32",
            "BLIP_PUBLISH_ADDRESS": "127.0.0.1",
            "BLIP_PORT": str(self.port),
            "BLIP_METRICS_PORT": str(self.metrics_port),
        }
        # Builds see the wheels and no network (everything they install comes from the wheels).
        cmd = [PODMAN_COMPOSE, f"--podman-build-args=--network=none --volume={self.wheels}:/wheels:ro",
               "-p", self.project,
               "-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml",
               *(["-f", str(self.override)] if self.override else []), *args]
        return self.run(cmd, env=env, timeout=timeout, check=check)

    def containers(self, service: str | None = None) -> list[str]:
        out = self.run(["podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={self.project}",
                        "--format", "json"], quiet=True, merge=False).stdout
        found = []
        for c in json.loads(out or "[]"):
            if service is None or c.get("Labels", {}).get("com.docker.compose.service") == service:
                found.append(c["Names"][0])
        return sorted(found)

    # steps --------------------------------------------------------------------------------------------------
    def host_reference(self) -> None:
        """Captions of the examples from blip-serve on the host: what the containers must answer."""
        from blip_bench.processes import ServeProcess
        from blip_client import CaptionClient

        self.run.say("reference: blip-serve on the host")
        serve = ServeProcess()
        try:
            serve.wait_ready(timeout=min(180, self.run.remaining()))
            with CaptionClient(serve.address, timeout=60) as client:
                for path in self.examples():
                    result = client.caption(str(path))
                    self.reference[path.name] = (result.captions[0].text, result.captions[0].score)
                prompted = client.caption(str(self.examples()[0]), prompt="a picture of")
                self.reference["prompt"] = (prompted.captions[0].text, prompted.captions[0].score)
        finally:
            serve.stop()
            for log in (serve.triton_log, Path(serve.stderr.name) if serve.stderr else None):
                if log is not None:
                    log.unlink(missing_ok=True)
        for name, (text, score) in self.reference.items():
            self.run.say(f"  host: {name}: {text!r} ({score:.4f})")

    @staticmethod
    def examples() -> list[Path]:
        return sorted((ROOT / "examples").glob("*.jpg"))

    def inputs(self) -> None:
        self.rootfs = cached_rootfs(self.run)
        self.wheels = cached_wheels(self.run)

    def base_images(self) -> None:
        self.run(["podman", "import", "--change", "ENV LANG=C.UTF-8",
                  "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                  "--change", 'CMD ["python3"]', str(self.rootfs), self.python_image], timeout=300)
        import pytriton

        wheel = Path(pytriton.__file__).parent
        context = self.work / "triton-standin"
        server = context / "tritonserver"
        shutil.copytree(wheel / "tritonserver/bin", server / "bin")
        shutil.copytree(wheel / "tritonserver/caches", server / "caches")
        shutil.copytree(wheel / "tritonserver/backends/python", server / "backends/python",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(wheel / "tritonserver/python_backend_stubs/3.11/triton_python_backend_stub",
                     server / "backends/python")
        shutil.copytree(wheel.parent / "nvidia_pytriton.libs", server / "lib")
        shutil.copy2(HERE / "triton-standin/nvidia_entrypoint.sh", context)
        self.run(["podman", "build", "--network=none", "-f", str(HERE / "triton-standin/Containerfile"),
                  "--build-arg", f"BASE_IMAGE={self.python_image}", "-t", self.triton_base, str(context)],
                 timeout=300)
        shutil.rmtree(context)
        self.limits()

    def limits(self) -> None:
        """docker-compose.yml gives Triton unlimited locked memory and a 64 MiB stack, and Podman then raises the
        open-files and processes limits too (to 1048576). Where containers cannot have that (root without
        CAP_SYS_RESOURCE, as on these machines: "error setting rlimit type 7/6/8: operation not permitted"), a
        Compose override of this run's own gives Triton the hard limits a container gets here instead."""
        probe = ["podman", "run", "--rm", "--network=none", "--ulimit", "memlock=-1:-1",
                 "--ulimit", "stack=67108864:67108864", self.python_image, "true"]
        if self.run(probe, check=False, quiet=True, timeout=60).returncode == 0:
            return
        text = self.run(["podman", "run", "--rm", "--network=none", self.python_image, "cat", "/proc/self/limits"],
                        quiet=True, timeout=60, merge=False).stdout
        hard = {}
        for line in text.splitlines():
            for key, label in (("memlock", "Max locked memory"), ("nofile", "Max open files"),
                               ("nproc", "Max processes")):
                if line.startswith(label):
                    hard[key] = line[len(label):].split()[1]
        if len(hard) != 3:
            raise Failure(f"cannot read a container's limits:\n{text}")
        self.memlock = resource.RLIM_INFINITY if hard["memlock"] == "unlimited" else int(hard["memlock"])
        values = {k: -1 if v == "unlimited" else int(v) for k, v in hard.items()}
        self.override = self.work / "compose.limits.yml"
        self.override.write_text("services:\n  triton:\n    ulimits:\n"
                                 + "".join(f"      {k}: {v}\n" for k, v in values.items()))
        self.run.say(f"containers cannot raise hard limits here: Triton gets {values} ({self.override.name}; "
                     "docker-compose.yml: memlock unlimited)")

    def build(self) -> None:
        self.compose("--profile", "export", "build", "export", "triton", "gateway", timeout=900)
        for image in COMPOSE_IMAGES:
            self.run(["podman", "image", "exists", image], quiet=True)
        # The model image: the checkpoint is the build context; EXPORT_IMAGE keeps its default, the export image
        # just built.
        self.run(["podman", "build", "--network=none", "-f", str(ROOT / "docker/model/Dockerfile"),
                  "--build-arg", f"PYTHON_IMAGE={self.python_image}", "--build-arg", "TARGET=embedded",
                  "--build-arg", "PRECISION=fp32", "-t", self.model_image, str(ROOT / "models/blip-demo")],
                 timeout=600)

    def volume_path(self, volume: str) -> Path:
        return Path(self.run(["podman", "volume", "inspect", volume, "--format", "{{.Mountpoint}}"],
                             quiet=True, merge=False).stdout.strip())

    def model_image_twice(self) -> None:
        """The init container of deploy/kubernetes: pod runAsUser/runAsGroup/fsGroup 1000, an emptyDir at
        /models, read-only root, no capabilities, no privilege escalation. Run twice: the second keeps the copy."""
        volume = f"{self.project}-init-models"
        self.run(["podman", "volume", "create", volume], quiet=True)
        path = self.volume_path(volume)
        os.chown(path, 0, 1000)  # what the kubelet does to an emptyDir (mode 0777) for fsGroup 1000
        os.chmod(path, 0o2777)
        manifest = path / "repository/blip_export.json"
        seen = []
        for attempt in (1, 2):
            out = self.run(["podman", "run", "--rm", "--user", "1000:1000", "--read-only", "--cap-drop=ALL",
                            "--security-opt=no-new-privileges", "--network=none", "-v", f"{volume}:/models",
                            self.model_image], timeout=120).stdout.strip()
            self.run.say(f"  model image, run {attempt}: {out}")
            want = "installed from" if attempt == 1 else "already holds the export of"
            if want not in out:
                raise Failure(f"model image run {attempt}: expected {want!r}, got:\n{out}")
            st = manifest.stat()
            seen.append((st.st_ino, st.st_mtime_ns, (path / "repository").stat().st_ino))
        if seen[0] != seen[1]:
            raise Failure(f"the second init run replaced the copy (inode, mtime before/after: {seen})")
        if not (path / "repository/blip_caption/config.pbtxt").exists():
            raise Failure("the init container's copy has no blip_caption/config.pbtxt")
        same = json.loads(manifest.read_text()) == self.export_manifest
        self.run.say(f"  the model image's export has the export service's manifest: {same}")
        self.run(["podman", "volume", "rm", volume], quiet=True)

    def export(self) -> None:
        out = self.compose("--profile", "export", "run", "--rm", "export", timeout=300).stdout
        volume = f"{self.project}_model-repository"
        path = self.volume_path(volume)
        st = path.stat()
        self.run.say(f"  volume {volume}: owner {st.st_uid}:{st.st_gid} mode {oct(st.st_mode & 0o7777)}")
        # Docker and Podman give a fresh volume the ownership of the image's directory (Podman, where the image
        # has none, chowns it to the container's user and group instead: 10001:999 here).
        image_dir = self.run(["podman", "run", "--rm", "--network=none", "--entrypoint", "stat",
                              "blip-caption/export:0.1.0", "-c", "%u:%g", "/models"], quiet=True,
                             merge=False).stdout.strip()
        if image_dir != f"{EXPORT_UID}:{EXPORT_UID}" or f"{st.st_uid}:{st.st_gid}" != image_dir:
            raise Failure(f"the export image's /models is {image_dir}, the fresh volume {st.st_uid}:{st.st_gid}; "
                          f"expected both {EXPORT_UID}:{EXPORT_UID}")
        repository = path / "repository"
        for model in ("blip_caption", "blip_caption_cached", "preprocess", "vision_encoder", "text_decoder"):
            if not (repository / model / "config.pbtxt").exists():
                raise Failure(f"the export wrote no {model}/config.pbtxt:\n{tail(out)}")
        if any(p.stat().st_uid != EXPORT_UID for p in repository.rglob("*")):
            raise Failure("files in the export not owned by the export's user")
        # Triton reads the repository as another user (NGC's triton-server, uid 1000).
        private = unreadable_by_others(repository)
        if private:
            raise Failure(f"the export (uid {EXPORT_UID}) wrote files that Triton's user (uid {TRITON_UID}) cannot "
                          f"read: {', '.join(private)}")
        self.export_manifest = json.loads((repository / "blip_export.json").read_text())
        before = (repository.stat().st_ino, (repository / "blip_export.json").stat().st_mtime_ns)
        out = self.compose("--profile", "export", "run", "--rm", "export", timeout=300).stdout
        after = (repository.stat().st_ino, (repository / "blip_export.json").stat().st_mtime_ns)
        if "kept" not in out or before != after:
            raise Failure(f"the second export did not keep the first ({before} -> {after}):\n{tail(out)}")
        self.run.say("  second export run: kept")

    def wait_healthy(self, names: list[str], timeout: float) -> None:
        """Run each container's health check (the Compose file's command) until all report healthy. Podman runs
        health checks from systemd timers; without systemd nothing runs them, so this does."""
        pending = set(names)
        deadline = time.monotonic() + min(timeout, self.run.remaining())
        while pending:
            for name in sorted(pending):
                state, restarts = inspect(self.run, name, "{{.State.Status}} {{.RestartCount}}").split()
                if state not in ("running", "created", "configured") or restarts != "0":
                    raise Failure(f"{name} is {state}, restarted {restarts} times, while waiting for it to be "
                                  "healthy")
                if self.run(["podman", "healthcheck", "run", name], quiet=True, check=False).returncode == 0:
                    status = inspect(self.run, name, "{{.State.Health.Status}}")
                    if status == "healthy":
                        self.run.say(f"  {name}: healthy")
                        pending.discard(name)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise Failure(f"not healthy after {timeout:.0f} s: {sorted(pending)}")
            time.sleep(2)

    def up(self) -> None:
        out = self.compose("up", "-d", timeout=300).stdout
        # What podman-compose and Podman say about the health checks here (notes, not failures).
        notes = {re.sub(r'^time="[^"]*" ', "", line.strip())[:200] for line in out.splitlines()
                 if "condition check" in line or "systemd connection to start healthchecks" in line}
        for line in sorted(notes):
            self.run.say(f"  note: {line}")
        triton, gateway = self.containers("triton"), self.containers("gateway")
        if len(triton) != 1 or len(gateway) != 1:
            raise Failure(f"expected one triton and one gateway container, got {triton} {gateway}")
        self.wait_healthy(triton + gateway, timeout=300)

    def captions(self, label: str) -> None:
        from blip_client import CaptionClient

        with CaptionClient(f"127.0.0.1:{self.port}", timeout=60) as client:
            got = {p.name: client.caption(str(p)).captions[0] for p in self.examples()}
            prompted = client.caption(str(self.examples()[0]), prompt="a picture of").captions[0]
        got = {name: (c.text, c.score) for name, c in got.items()} | {"prompt": (prompted.text, prompted.score)}
        for name, (text, score) in got.items():
            want_text, want_score = self.reference[name]
            self.run.say(f"  {label}: {name}: {text!r} ({score:.4f})")
            if text != want_text or abs(score - want_score) > 1e-3:
                raise Failure(f"{name}: the containers answer {text!r} ({score}), the host {want_text!r} "
                              f"({want_score})")

    def hardening(self) -> None:
        """What the containers run as and may write."""
        probe = r"""
import json, os, resource
def writable(path):
    try:
        with open(os.path.join(path, ".blip-smoke-probe"), "w"):
            pass
        os.unlink(os.path.join(path, ".blip-smoke-probe"))
        return True
    except OSError:
        return False
status = dict(l.split(":", 1) for l in open("/proc/1/status").read().splitlines() if ":" in l)
shm = os.statvfs("/dev/shm")
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(),
    "pid1": open("/proc/1/cmdline").read().split("\0")[:-1],
    "pid1_env": dict(v.split("=", 1) for v in open("/proc/1/environ").read().split("\0") if "=" in v),
    "cap_eff": status["CapEff"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
    "root_writable": writable("/"), "tmp_writable": writable("/tmp"),
    "models_writable": writable("/models") if os.path.isdir("/models") else None,
    "cache_writable": writable("/cache/tensorrt") if os.path.isdir("/cache/tensorrt") else None,
    "shm_bytes": shm.f_frsize * shm.f_blocks,
    "memlock": resource.getrlimit(resource.RLIMIT_MEMLOCK)[0], "stack": resource.getrlimit(resource.RLIMIT_STACK)[0],
}))
"""
        problems = []
        for service, uid in (("triton", TRITON_UID), ("gateway", EXPORT_UID)):
            name = self.containers(service)[0]
            details = inspect(self.run, name)
            config, created = details["HostConfig"], details["Config"].get("CreateCommand") or []
            self.run.say(f"  {name}: ReadonlyRootfs {config.get('ReadonlyRootfs')}, CapDrop "
                         f"{len(config.get('CapDrop') or [])} capabilities, SecurityOpt {config.get('SecurityOpt')}")
            # Triton's /tmp is a tmpfs of the Compose file's (the gateway has none: it writes nothing). Podman mounts
            # one at /tmp of any read-only container by itself (Docker does not), so the check is that
            # podman-compose passed the Compose file's on.
            # Adjacent pairs of arguments: the shifted copy is one shorter, so truncating is intended.
            tmpfs = any(a == "--tmpfs" and b == "/tmp" for a, b in zip(created, created[1:], strict=False))
            if tmpfs != (service == "triton"):
                problems.append(f"{name}: --tmpfs /tmp {'passed' if tmpfs else 'not passed'}: {created}")
            facts = json.loads(container_python(self.run, name, probe))
            shown = {k: v for k, v in facts.items() if k != "pid1_env"}
            self.run.say(f"  {name}: {json.dumps(shown)}")
            expect = {"uid": uid, "cap_eff": "0000000000000000", "no_new_privs": "1", "root_writable": False}
            if service == "triton":
                expect |= {"tmp_writable": True, "models_writable": False, "cache_writable": True,
                           "memlock": self.memlock, "stack": 67108864}
                pid1 = facts["pid1"]
                if not pid1 or not pid1[0].endswith("/tritonserver"):
                    problems.append(f"{name}: PID 1 is not tritonserver: {pid1}")
                for flag in ("--model-repository=/models/repository", "--model-control-mode=none",
                             "--grpc-infer-allocation-pool-size=0", "--disable-auto-complete-config"):
                    if flag not in pid1:
                        problems.append(f"{name}: tritonserver runs without {flag}: {pid1}")
                if any(a.startswith("--model-config-name") for a in pid1):
                    problems.append(f"{name}: the CPU override still passes --model-config-name: {pid1}")
                if not any(a.startswith("--grpc-restricted-protocol=") for a in pid1):
                    problems.append(f"{name}: no --grpc-restricted-protocol: {pid1}")
                if facts["pid1_env"].get("NVIDIA_TF32_OVERRIDE") != "0":
                    problems.append(f"{name}: tritonserver's environment lacks NVIDIA_TF32_OVERRIDE=0")
                if facts["shm_bytes"] < 1 << 30:
                    problems.append(f"{name}: /dev/shm is {facts['shm_bytes']} bytes, not the 1 GB of shm_size")
            else:
                pid1 = facts["pid1"]
                if not any(a.endswith("blip-gateway") for a in pid1[:2]):
                    problems.append(f"{name}: PID 1 is not blip-gateway: {pid1}")
            for key, value in expect.items():
                if facts[key] != value:
                    problems.append(f"{name}: {key} is {facts[key]!r}, expected {value!r}")
        if problems:
            raise Failure("\n".join(problems))

    def replica_stats(self, name: str) -> int:
        """Calls the replica answered: the gateway sends these (deterministic) to the cached ensemble, whose
        successes count its cache's hits too."""
        code = ("import json, urllib.request as u; s = json.load(u.urlopen("
                "'http://127.0.0.1:8000/v2/models/blip_caption_cached/stats', timeout=5)); "
                "print(s['model_stats'][0]['inference_stats']['success']['count'])")
        return int(container_python(self.run, name, code))

    def gateway_replicas(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return {s.labels["endpoint"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "blip_gateway_triton_replica_up"}

    def scale(self) -> None:
        self.compose("up", "-d", "--scale", "triton=2", timeout=300)
        triton, gateway = self.containers("triton"), self.containers("gateway")
        if len(triton) != 2 or len(gateway) != 1:
            raise Failure(f"expected two triton containers and one gateway, got {triton} {gateway}")
        self.wait_healthy(triton + gateway, timeout=300)
        addresses = {}
        for name in triton:
            networks = inspect(self.run, name)["NetworkSettings"]["Networks"]
            addresses[name] = sorted(n["IPAddress"] for n in networks.values())
        self.run.say(f"  triton replicas: {addresses}")
        caches = {name: [m.get("Name") for m in inspect(self.run, name)["Mounts"]
                         if m.get("Destination") == "/cache/tensorrt"] for name in triton}
        shared = len({tuple(v) for v in caches.values()}) < len(caches)
        self.run.say(f"  /cache/tensorrt volumes: {caches}"
                     + (" (note: one volume for both replicas: podman-compose names a service's anonymous volume "
                        "after the service)" if shared else ""))
        # The network's DNS learns of the new replica as it joins, and may fail a lookup meanwhile (seen once:
        # "Temporary failure in name resolution" right after the scale, in the gateway's log too): wait for it.
        lookup = ("import json, socket\ntry:\n    print(json.dumps(sorted({a[4][0] for a in "
                  "socket.getaddrinfo('triton', 8001, type=socket.SOCK_STREAM)})))\n"
                  "except OSError as exc:\n    print(json.dumps(str(exc)))")
        replicas = sorted(a for v in addresses.values() for a in v)
        deadline = time.monotonic() + 60
        while (resolved := json.loads(container_python(self.run, gateway[0], lookup))) != replicas:
            if time.monotonic() > deadline:
                raise Failure(f"the service name resolves to {resolved}, the replicas have {addresses}")
            time.sleep(1)
        self.run.say(f"  'triton' resolves in the gateway to {resolved}")
        deadline = time.monotonic() + 60
        while True:
            up = self.gateway_replicas()
            if len(up) == 2 and all(v == 1 for v in up.values()):
                break
            if time.monotonic() > deadline:
                raise Failure(f"the gateway does not report both replicas up: {up}")
            time.sleep(2)
        self.run.say(f"  gateway's blip_gateway_triton_replica_up: {up}")
        before = {name: self.replica_stats(name) for name in triton}
        from blip_client import CaptionClient

        calls = 16
        images = [str(p) for p in self.examples()] * 6
        with CaptionClient(f"127.0.0.1:{self.port}", timeout=60) as client:
            results = client.caption_many(images[:calls], concurrency=4)
        texts = {r.captions[0].text for r in results}
        expected = {self.reference[p.name][0] for p in self.examples()}
        if texts != expected:
            raise Failure(f"captions under scale: {texts}, expected {expected}")
        after = {name: self.replica_stats(name) for name in triton}
        served = {name: after[name] - before[name] for name in triton}
        self.run.say(f"  {calls} calls through the gateway, blip_caption_cached successes per replica: {served}")
        if sum(served.values()) != calls or min(served.values()) == 0:
            raise Failure(f"calls did not reach both replicas: {served} of {calls}")
        self.captions("scaled")

    def a846359_bug(self) -> None:
        """The export image as it was at a846359 (no /models in the image) against a fresh named volume."""
        context = self.work / "a846359"
        context.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "a846359"], stdout=subprocess.PIPE, check=True)
        subprocess.run(["tar", "-x", "-C", str(context)], input=archive.stdout, check=True)
        dockerfile = context / "docker/export/Dockerfile"
        text = dockerfile.read_text()
        # Its base and its package index (PyTorch's CPU wheels) replaced by the stand-in and the wheels.
        substitutions = {
            r"FROM python:3\.11\.14-slim-bookworm": f"FROM {self.python_image}",
            r"--index-url \S+ torch==2\.13\.0": f"{PIP_OPTIONS} torch==2.13.0",
            r"pip install --no-cache-dir -e \.": f"pip install --no-cache-dir {PIP_OPTIONS} -e .",
        }
        for old, new in substitutions.items():
            text, count = re.subn(old, new, text)
            if count != 1:
                raise Failure(f"a846359's export Dockerfile has {count} matches of {old!r}")
        dockerfile.write_text(text)
        image = f"localhost/blip-smoke-{self.id}/export:a846359"
        self.run(["podman", "build", "--network=none", f"--volume={self.wheels}:/wheels:ro", "-f", str(dockerfile),
                  "-t", image, str(context)], timeout=600)
        # As a846359's docker-compose.yml ran it: the checkpoint read-only, the named volume at /models. Twice:
        # a fresh Podman volume (Podman chowns a new volume to the container's user where the image has no such
        # directory), and a fresh volume owned by root, as Docker creates it for a path the image lacks.
        for label, options in (("a fresh Podman volume", []), ("a fresh root-owned volume, as Docker makes it",
                                                                ["--opt", "o=uid=0,gid=0"])):
            volume = f"{self.project}-a846359-models"
            self.run(["podman", "volume", "create", *options, volume], quiet=True)
            result = self.run(["podman", "run", "--rm", "--network=none",
                               "-v", f"{ROOT / 'models/blip-demo'}:/checkpoint:ro", "-v", f"{volume}:/models", image,
                               "--model", "/checkpoint", "--output", "/models/repository", "--target",
                               "triton-container", "--precision", "fp32"], check=False, timeout=300)
            st = self.volume_path(volume).stat()
            print(f"\n==== a846359's export image into {label} (volume root then {st.st_uid}:{st.st_gid} "
                  f"{oct(st.st_mode & 0o7777)}): exit {result.returncode}\n{tail(result.stdout, 40)}\n====\n",
                  flush=True)
            self.run(["podman", "volume", "rm", volume], quiet=True)

    def dump_logs(self) -> None:
        for name in self.containers():
            print(f"\n---- podman logs {name} (last 150 lines) ----", flush=True)
            out = self.run(["podman", "logs", "--tail", "150", name], quiet=True, check=False, timeout=30).stdout
            print(out, flush=True)
            health = self.run(["podman", "inspect", name, "--format", "{{json .State.Health}}"], quiet=True,
                              check=False, timeout=30).stdout
            print(f"---- health of {name}: {tail(health, 20)}", flush=True)


def unreadable_by_others(root: Path) -> list[str]:
    """Files that another user cannot read, and folders it cannot enter, under `root` (with their modes)."""
    found = []
    for p in [root, *sorted(root.rglob("*"))]:
        need = 0o005 if p.is_dir() else 0o004
        if p.stat().st_mode & need != need:
            found.append(f"{p.relative_to(root.parent)} ({oct(p.stat().st_mode & 0o777)}, "
                         f"owner {p.stat().st_uid})")
    return found


def containers_conf() -> str:
    """Podman's settings for this run: no default ulimits (root here lacks CAP_SYS_RESOURCE, and Podman's defaults
    raise the open-files and processes limits: "error setting rlimit type 7/6: operation not permitted"); runc,
    which handles these machines' hybrid cgroups (crun refuses: "cgroups in hybrid mode not supported, drop all
    controllers from cgroupv2")."""
    return '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n'


def cleanup(run: Runner, smoke: SmokeTest, before: dict[str, set[str]]) -> list[str]:
    """Remove what this run made: the Compose project, then every container, pod, volume, network and image that
    did not exist before it started."""
    errors = []
    run.deadline = max(run.deadline, time.monotonic() + 120)  # cleanup gets its time even after a time-out
    smoke.compose("--profile", "export", "down", "-v", "-t", "5", timeout=120, check=False)
    now = podman_objects(run)
    steps = [("container", ["podman", "rm", "-f", "-v"]), ("pod", ["podman", "pod", "rm", "-f"]),
             ("volume", ["podman", "volume", "rm", "-f"]), ("network", ["podman", "network", "rm", "-f"]),
             ("image", ["podman", "rmi", "-f"])]
    for kind, cmd in steps:
        new = sorted(now[kind] - before[kind] - {"podman"})  # "podman": Podman's default network, always listed
        if new:
            result = run([*cmd, *new], check=False, quiet=True, timeout=300)
            if result.returncode != 0:
                errors.append(f"podman {kind} removal: {tail(result.stdout, 10)}")
    left = {kind: sorted(ids - before[kind] - {"podman"}) for kind, ids in podman_objects(run).items()
            if ids - before[kind] - {"podman"}}
    if left:
        errors.append(f"left behind: {left}")
    run.say(f"cleanup: removed what this run made{'; ' + '; '.join(errors) if errors else ''}")
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--show-a846359-bug", action="store_true",
                        help="also build a846359's export image and show its failure on a fresh named volume")
    parser.add_argument("--verbose", action="store_true", help="print every command's output")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("tests/container/smoke.py: needs root", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="blip-container-test-"))
    conf = work / "containers.conf"
    conf.write_text(containers_conf())
    os.environ["CONTAINERS_CONF"] = str(conf)
    log_path = CACHE / "last-run.log"
    log_path.unlink(missing_ok=True)
    run = Runner(log_path, time.monotonic() + TIME_LIMIT_S, args.verbose)
    run.say(f"container smoke test; commands and their output in {log_path}")
    for image in COMPOSE_IMAGES:
        if run(["podman", "image", "exists", image], check=False, quiet=True).returncode == 0:
            print(f"{image} exists already: this test builds and then removes it; remove it first "
                  f"(podman rmi {image})", file=sys.stderr)
            return 2
    before = podman_objects(run)
    smoke = SmokeTest(run, work)
    steps = [
        ("reference captions: blip-serve on the host", smoke.host_reference),
        ("inputs: root file system and wheels (cached)", smoke.inputs),
        ("stand-in base images", smoke.base_images),
        ("images: podman-compose build (export, triton, gateway), then the model image", smoke.build),
        *([("a846359's export image (shown, not checked)", smoke.a846359_bug)] if args.show_a846359_bug else []),
        ("export service into the named volume", smoke.export),
        ("up: triton and gateway (CPU override), health checks", smoke.up),
        ("captions through the gateway's published port", lambda: smoke.captions("containers")),
        ("users, entrypoints, read-only roots, capabilities, volumes", smoke.hardening),
        ("scale triton to 2: DNS, both replicas up and serving", smoke.scale),
        ("model image twice into one volume (the Kubernetes init container)", smoke.model_image_twice),
    ]
    passed = 0
    try:
        for label, step in steps:
            run.say(label)
            step()
            passed += 1
    except Failure as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr, flush=True)
    except (Stop, KeyboardInterrupt) as exc:
        print(f"\nSTOPPED: {exc}", file=sys.stderr, flush=True)
    except Exception:  # a bug here, or an error the checks did not expect: still clean up and show the logs
        traceback.print_exc()
    finally:
        ok = passed == len(steps)
        if not ok:
            try:
                smoke.dump_logs()
            except Failure as exc:
                print(f"(could not read the logs: {exc})", file=sys.stderr)
        errors = cleanup(run, smoke, before)
        shutil.rmtree(work, ignore_errors=True)
    ok = ok and not errors
    run.say(f"container smoke test {'passed' if ok else 'FAILED'} in {time.monotonic() - run.started:.0f} s")
    print(f"smoke: {passed if ok else min(passed, len(steps) - 1)} passed, {0 if ok else 1} failed", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
