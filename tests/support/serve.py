"""`blip-serve` run as a user runs it: a subprocess on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from blip_server.ports import free_ports


class _Process:
    """A command of ours run as a user runs it, its stderr kept for test reports, ready when it says so."""

    triton_log: Path | None = None

    def __init__(self, command: str, args: list[str]):
        self.command = command
        self.stderr = tempfile.NamedTemporaryFile(prefix=f"{command}-", suffix=".log", delete=False)
        self.process = subprocess.Popen([str(Path(sys.executable).parent / command), *args],
                                        stdout=subprocess.PIPE, stderr=self.stderr, text=True)

    def log(self) -> str:
        return Path(self.stderr.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = 180) -> str:
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
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.ports['gateway_metrics']}/metrics", timeout=5).read()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text.decode()) for s in family.samples}


class ServeProcess(_Process):
    COMMAND = str(Path(sys.executable).parent / "blip-serve")

    def __init__(self, *args: str, cache: Path):
        self.ports = dict(zip(("gateway", "grpc", "http", "metrics", "gateway_metrics"), free_ports(5)))
        self.triton_log = Path(tempfile.mkstemp(prefix="blip-serve-", suffix=".triton.log")[1])
        super().__init__("blip-serve", [
            *args, "--cache-dir", str(cache), "--port", str(self.ports["gateway"]),
            "--triton-grpc-port", str(self.ports["grpc"]), "--triton-http-port", str(self.ports["http"]),
            "--triton-metrics-port", str(self.ports["metrics"]), "--triton-log", str(self.triton_log),
            "--metrics-port", str(self.ports["gateway_metrics"]),
        ])
        self.address = f"127.0.0.1:{self.ports['gateway']}"

    def triton_log_text(self) -> str:
        return self.triton_log.read_text(errors="replace") if self.triton_log.exists() else ""

    def triton_log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.triton_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no Triton log)"

    def children(self) -> list[int]:
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == self.process.pid]


class GatewayProcess(_Process):
    """`blip-gateway` over the given Triton endpoints, on free loopback ports, metrics served."""

    def __init__(self, *args: str):
        self.ports = dict(zip(("gateway", "gateway_metrics"), free_ports(2)))
        super().__init__("blip-gateway", [*args, "--port", str(self.ports["gateway"]),
                                          "--metrics-port", str(self.ports["gateway_metrics"])])
        self.address = f"127.0.0.1:{self.ports['gateway']}"


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def wait_gone(pgid: int, timeout: float = 30) -> bool:
    """Wait for a process group to be gone entirely (the process and any children it left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return True
        time.sleep(0.2)
    return False
