"""The embedded Triton Inference Server: the `tritonserver` binary carried by the `nvidia-pytriton` wheel.

Only the binary, its Python backend and its shared libraries are used, not PyTriton's Python API. The server
runs in its own process group (so its Python-backend stubs can be stopped with it), dies with this process
(PR_SET_PDEATHSIG) and writes its log to a file whose tail is shown when something goes wrong.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from blip_server import procfs
from blip_server.errors import TritonStartError
from blip_server.shared.cpu_turns import PREFIX as TURNS_PREFIX
from blip_server.shared.cpu_turns import available_cores, turns_directory, turns_path
from blip_server.triton_command import ENVIRONMENT, EXIT_TIMEOUT_SECONDS, RESPONSE_CACHE_MB, server_flags

_PR_SET_PDEATHSIG = 1
log = logging.getLogger(__name__)
_SHM_PREFIX = "triton_python_backend_shm_region_"
# Where Triton's Python backend puts its regions; only those no process maps are removed (see below).
_SHM_DIRECTORY = Path("/dev/shm")  # nosec B108


def remove_orphaned_shared_memory(directory: Path = _SHM_DIRECTORY, min_age: float = 120.0) -> list[str]:
    """Remove Python-backend regions that no process maps and that are older than `min_age` seconds: what a
    Triton killed with its parent (blip-serve killed -9, or by the OOM killer) left behind, 256 MiB or more each.
    A live region is always mapped by its Triton; the age keeps one being created right now. Returns the names."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split(None, 5)[5].strip() for line in maps.read_text().splitlines()
                          if _SHM_PREFIX in line and len(line.split(None, 5)) == 6)
        except OSError:  # gone, or not ours to read
            continue
    removed = []
    for path in directory.glob(_SHM_PREFIX + "*"):
        try:
            if str(path) not in mapped and time.time() - path.stat().st_mtime > min_age:
                path.unlink()
                removed.append(path.name)
        except OSError:
            continue
    if removed:
        log.info("removed %d shared-memory regions left by Triton servers that were killed", len(removed))
    return removed


def remove_stale_turn_files(directory: Path | None = None) -> list[str]:
    """Remove the files of CPU turns (`cpu_turns.py`) whose Triton server is gone: one empty file per server."""
    directory = directory or turns_directory()
    removed = []
    for path in directory.glob(TURNS_PREFIX + "*"):
        pid = path.name[len(TURNS_PREFIX):]
        try:
            alive = pid.isdigit() and Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver"
        except OSError:
            alive = False
        if not alive:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


# Error-level lines every start on a machine without a GPU prints; they say nothing about a failure.
_BENIGN_WITHOUT_GPU = ("CudaDriverHelper has not been initialized", "CUDA driver version is insufficient")


@dataclass(frozen=True, kw_only=True)
class TritonOptions:
    """How to run tritonserver.

    model_repository: the exported repository to serve.
    host: address HTTP, gRPC and metrics bind to (loopback unless the operator opens it up).
    grpc_port, http_port, metrics_port: where Triton listens.
    startup_timeout: seconds to wait for readiness (models load then).
    exit_timeout: seconds Triton may take to finish in-flight requests on shutdown.
    log_verbose: Triton's --log-verbose level.
    log_path: where Triton's log goes (default: a file in the server's temporary work directory).
    model_config_name: load `<model>/configs/<name>.pbtxt` where a model has one (`gpu`), else `config.pbtxt`.
    environment: variables set for the server and its Python-backend stubs (the models read BLIP_* limits).
    response_cache_mb: MiB of Triton's response cache (`triton_command.RESPONSE_CACHE_MB`); 0: none.
    """

    model_repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    startup_timeout: float = 300.0
    exit_timeout: int = EXIT_TIMEOUT_SECONDS
    log_verbose: int = 0
    log_path: Path | None = None
    model_config_name: str = ""
    environment: dict[str, str] = field(default_factory=dict)
    response_cache_mb: float = RESPONSE_CACHE_MB


def _wheel_paths() -> tuple[Path, Path, Path]:
    """(tritonserver binary, python backend dir, the wheel's shared libraries)."""
    try:
        import pytriton
    except ImportError as exc:
        raise TritonStartError("the nvidia-pytriton wheel, which carries tritonserver, is not installed") from exc
    root = Path(pytriton.__file__).parent / "tritonserver"
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    return root / "bin" / "tritonserver", root / "backends" / "python", libs


def _stub(python_version: str) -> Path:
    import pytriton

    stub = Path(pytriton.__file__).parent / "tritonserver" / "python_backend_stubs" / python_version
    stub = stub / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonStartError(f"the nvidia-pytriton wheel has no Python backend stub for Python {python_version}")
    return stub


# tritonserver is started through this one-line Python program: it asks the kernel to SIGKILL it when its parent
# dies (PR_SET_PDEATHSIG survives exec), then becomes tritonserver. Doing that in a `preexec_fn` would force
# subprocess to fork() rather than vfork(), and fork() runs gRPC's fork handlers in the child, which abort while
# the parent's gRPC threads are busy (the gateway serves calls while Triton restarts).
_EXEC_DYING_WITH_PARENT = (
    "import ctypes, os, sys; "
    f"ctypes.CDLL('libc.so.6', use_errno=True).prctl({_PR_SET_PDEATHSIG}, {int(signal.SIGKILL)}); "
    "os.getppid() == int(sys.argv[1]) or sys.exit(70); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


class EmbeddedTriton:
    """Start, supervise and stop one tritonserver process.

    Use as a context manager, or call start() / wait_ready() / stop().
    """

    def __init__(self, options: TritonOptions):
        self.options = options
        self._process: subprocess.Popen | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="blip-triton-"))
        self._admin_key = secrets.token_hex(16)
        self._shm_regions: set[str] = set()
        self._shm_lock = threading.Lock()  # kill() may run in two threads at once (a second signal during stop)
        self.log_path = Path(options.log_path) if options.log_path else self._workdir / "tritonserver.log"

    def __enter__(self) -> EmbeddedTriton:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def command(self) -> list[str]:
        o = self.options
        binary, _, _ = _wheel_paths()
        return [
            str(binary),
            f"--model-repository={Path(o.model_repository).resolve()}",
            f"--backend-directory={self._workdir / 'backends'}",
            *server_flags(self._admin_key, available_cores(), o.exit_timeout, o.response_cache_mb),
            # The wheel's caches (its local response cache), not /opt/tritonserver/caches, Triton's default.
            *([f"--cache-directory={binary.parent.parent / 'caches'}"] if o.response_cache_mb else []),
            f"--grpc-address={o.host}",
            f"--grpc-port={o.grpc_port}",
            f"--http-address={o.host}",
            f"--http-port={o.http_port}",
            f"--metrics-address={o.host}",
            f"--metrics-port={o.metrics_port}",
            f"--log-verbose={o.log_verbose}",
            *([f"--model-config-name={o.model_config_name}"] if o.model_config_name else []),
        ]

    def _environment(self) -> dict[str, str]:
        _, _, libs = _wheel_paths()
        env = {**os.environ, **ENVIRONMENT, **self.options.environment}
        library_path = [sysconfig.get_config_var("LIBDIR"), str(libs)]
        if env.get("LD_LIBRARY_PATH"):
            library_path.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(library_path)
        # The stub embeds the interpreter it finds first on PATH: this environment's.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def start(self) -> None:
        remove_orphaned_shared_memory()
        remove_stale_turn_files()
        _, backend, _ = _wheel_paths()
        python_backend = self._workdir / "backends" / "python"
        shutil.copytree(backend, python_backend, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        shutil.copy2(_stub(f"{sys.version_info.major}.{sys.version_info.minor}"), python_backend)
        log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [sys.executable, "-c", _EXEC_DYING_WITH_PARENT, str(os.getpid()), *self.command()],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._environment(),
            cwd=self._workdir,
            start_new_session=True,
        )
        log.close()

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process else None

    def is_ready(self, timeout: float = 2.0) -> bool:
        url = f"http://{connect_host(self.options.host)}:{self.options.http_port}/v2/health/ready"
        try:
            # An http:// URL built above, not a caller's.
            with urllib.request.urlopen(url, timeout=timeout) as response:  # nosec B310
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.options.startup_timeout
        while time.monotonic() < deadline:
            if not self.is_running():
                code = self._process.returncode if self._process else None
                raise TritonStartError(f"tritonserver exited with status {code} while starting:\n{self.log_tail()}")
            if self.is_ready():
                self._note_shared_memory()
                return
            time.sleep(0.05)  # a restart waits on this: ready sooner, for a cheap local HTTP request
        self.stop()
        raise TritonStartError(
            f"tritonserver was not ready after {self.options.startup_timeout:.0f} s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        """Triton's error lines (its status tables push them out of any tail), then the last `lines` lines."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errors = [
            line for line in text[:-lines]
            if line.startswith("E") and line[1:5].isdigit() and not any(b in line for b in _BENIGN_WITHOUT_GPU)
        ]
        return "\n".join(errors + text[-lines:])

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (Triton finishes in-flight requests), then SIGKILL the whole process group if it lingers.
        Returns once the server and every stub of its process group are gone."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout if timeout is not None else self.options.exit_timeout + 10)
        return self.kill()

    def kill(self) -> int | None:
        """SIGKILL the server and its stubs (also when stopped: SIGTERM would wait for a SIGCONT) and wait for them."""
        process = self._process
        if process is None:
            return None
        self._note_shared_memory()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        _wait_group_gone(process.pid)
        turns_path(process.pid).unlink(missing_ok=True)  # its stubs are gone: nobody takes its turns any more
        self._remove_shared_memory()
        return process.returncode

    def _note_shared_memory(self) -> None:
        """Remember the shared-memory regions of the Python-backend stubs (the stubs' last argument names them)."""
        if self._process is not None:
            for command in procfs.children(self._process.pid).values():
                with self._shm_lock:
                    self._shm_regions.update(w for w in command.split() if w.startswith(_SHM_PREFIX))

    def _remove_shared_memory(self) -> None:
        """A killed Triton leaves its regions in /dev/shm, where they hold memory until removed: remove them."""
        with self._shm_lock:
            regions, self._shm_regions = self._shm_regions, set()
        for name in regions:
            (_SHM_DIRECTORY / name).unlink(missing_ok=True)

    def cleanup(self) -> None:
        shutil.rmtree(self._workdir, ignore_errors=True)


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """Wait until no process of the group is left (stubs die a moment after the server they belonged to)."""
    deadline = time.monotonic() + timeout
    while procfs.group_members(pgid) and time.monotonic() < deadline:
        if os.getpid() == 1:  # in a container without an init, orphaned stubs are ours to reap
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-1, os.WNOHANG)
        time.sleep(0.05)


def connect_host(host: str) -> str:
    """Where to reach a server bound to `host` from this machine."""
    # "0.0.0.0" is compared with here, not bound to.
    return "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)  # nosec B104
