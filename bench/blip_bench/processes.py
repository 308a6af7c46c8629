"""`blip-serve` and `blip-gateway` run as a user runs them: subprocesses on free loopback ports.

One helper for everything that starts the stack (the tests, `blip-demo-evaluate`, `blip-bench`): the command
line, the ports, waiting for the ready line, the gateway's metrics, the server processes, their memory and CPU time.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from blip_server import procfs
from blip_server.ports import free_ports


class CommandProcess:
    """One of our commands in a subprocess; its stderr goes to a file (kept for reports) unless `show_log`."""

    triton_log: Path | None = None
    ports: dict[str, int]

    def __init__(self, command: str, args: list[str], show_log: bool = False):
        self.command = command
        self.stderr = None
        with contextlib.ExitStack() as stack:  # the child keeps its own copy of the log file open
            if not show_log:
                self.stderr = stack.enter_context(
                    tempfile.NamedTemporaryFile(prefix=f"{command}-", suffix=".log", delete=False))
            self.process = subprocess.Popen([str(Path(sys.executable).parent / command), *args],
                                            stdout=subprocess.PIPE, stderr=self.stderr, text=True)

    def log(self) -> str:
        return Path(self.stderr.name).read_text(errors="replace") if self.stderr else ""

    def wait_ready(self, timeout: float = 180) -> str:
        """The ready line, once the command printed it; AssertionError if it exits or times out first."""
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline and "ready" not in line:
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None:
                raise AssertionError(f"{self.command} exited {self.process.returncode}:\n{self.log()}")
        assert "ready" in line, f"no ready line:\n{self.log()}"
        return line

    def stop(self, signum=signal.SIGTERM, timeout: float = 60) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        self.process.communicate(timeout=timeout)
        return self.process.returncode, self.log()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """The gateway's Prometheus samples: (name, sorted labels) -> value."""
        return scrape(self.ports["gateway_metrics"])

    def children(self) -> list[int]:
        return list(procfs.children(self.process.pid))

    def memory(self) -> dict[str, int]:
        """Memory (PSS: shared pages counted once) of this process and every process under it, by a short name
        (e.g. `stub preprocess (1234)`)."""
        return {name: procfs.pss_bytes(pid) for name, pid in self._processes().items()}

    def memory_kinds(self) -> dict[str, dict[str, int]]:
        """The same processes' PSS split into anonymous, shared (/dev/shm) and file-backed memory."""
        return {name: procfs.memory_kinds(pid) for name, pid in self._processes().items()}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by this process and every process under it, by the names of `memory()`."""
        return {name: procfs.cpu_seconds(pid) for name, pid in self._processes().items()}

    def _processes(self) -> dict[str, int]:
        processes = {self.process.pid: self.command, **procfs.descendants(self.process.pid)}
        return {process_name(command, pid): pid for pid, command in processes.items()}


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """The Prometheus samples served on a loopback port's /metrics: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


DECODER_COUNTERS = {"blip_decoder_steps": "steps", "blip_decoder_rows": "rows", "blip_decoder_step_seconds": "seconds"}


def decoder_counters(port: int) -> dict[str, float]:
    """The text decoder's own counters on Triton's metrics port (steps, rows summed over steps, the steps'
    seconds): its execute() only queues requests for its decode loop, so Triton's statistics say nothing of the
    decoding."""
    found = dict.fromkeys(DECODER_COUNTERS.values(), 0.0)
    for (name, _), value in scrape(port).items():
        if name.removesuffix("_total") in DECODER_COUNTERS:
            found[DECODER_COUNTERS[name.removesuffix("_total")]] += value
    return found


def process_name(command: str, pid: int) -> str:
    """How `memory()` and `cpu_seconds()` name a process: `tritonserver (1234)`, `stub preprocess (1240)`, ..."""
    return f"{short_name(command)} ({pid})"


def short_name(command: str) -> str:
    """`tritonserver`, `stub preprocess`, ...: the program, or the model a Python-backend stub runs."""
    parts = command.split()
    if not parts:
        return "?"
    if "triton_python_backend_stub" in parts[0] and len(parts) > 1:
        return "stub " + Path(parts[1]).parent.parent.name  # <model>/1/model.py
    return Path(parts[0]).name


class ServeProcess(CommandProcess):
    """`blip-serve` on free ports, its Triton log in a file of its own and its gateway's metrics served."""

    COMMAND = str(Path(sys.executable).parent / "blip-serve")

    def __init__(self, *args: str, cache: Path | None = None, show_log: bool = False):
        """`cache`: where exported checkpoints are kept (None: blip-serve's default)."""
        self.ports = dict(zip(("gateway", "grpc", "http", "metrics", "gateway_metrics"), free_ports(5), strict=True))
        self.triton_log = Path(tempfile.mkstemp(prefix="blip-serve-", suffix=".triton.log")[1])
        super().__init__("blip-serve", [
            *args, *(["--cache-dir", str(cache)] if cache else []), "--port", str(self.ports["gateway"]),
            "--triton-grpc-port", str(self.ports["grpc"]), "--triton-http-port", str(self.ports["http"]),
            "--triton-metrics-port", str(self.ports["metrics"]), "--triton-log", str(self.triton_log),
            "--metrics-port", str(self.ports["gateway_metrics"]),
        ], show_log=show_log)
        self.address = f"127.0.0.1:{self.ports['gateway']}"
        self.triton_address = f"127.0.0.1:{self.ports['grpc']}"

    def triton_log_text(self) -> str:
        return self.triton_log.read_text(errors="replace") if self.triton_log.exists() else ""

    def triton_log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.triton_log_text().splitlines()[-lines:]) or "(no Triton log)"


class GatewayProcess(CommandProcess):
    """`blip-gateway` over the given Triton endpoints, on free loopback ports, metrics served."""

    def __init__(self, *args: str, show_log: bool = False):
        self.ports = dict(zip(("gateway", "gateway_metrics"), free_ports(2), strict=True))
        super().__init__("blip-gateway", [*args, "--port", str(self.ports["gateway"]),
                                          "--metrics-port", str(self.ports["gateway_metrics"])], show_log=show_log)
        self.address = f"127.0.0.1:{self.ports['gateway']}"
