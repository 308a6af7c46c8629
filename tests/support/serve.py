"""`blip-serve` run as a user runs it: a subprocess on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blip_server.ports import free_ports


class ServeProcess:
    COMMAND = str(Path(sys.executable).parent / "blip-serve")

    def __init__(self, *args: str, cache: Path):
        self.ports = dict(zip(("gateway", "grpc", "http", "metrics"), free_ports(4)))
        self.stderr = tempfile.NamedTemporaryFile(prefix="blip-serve-", suffix=".log", delete=False)
        self.triton_log = Path(self.stderr.name).with_suffix(".triton.log")
        self.process = subprocess.Popen(
            [self.COMMAND, *args, "--cache-dir", str(cache), "--port", str(self.ports["gateway"]),
             "--triton-grpc-port", str(self.ports["grpc"]), "--triton-http-port", str(self.ports["http"]),
             "--triton-metrics-port", str(self.ports["metrics"]), "--triton-log", str(self.triton_log)],
            stdout=subprocess.PIPE, stderr=self.stderr, text=True,
        )
        self.address = f"127.0.0.1:{self.ports['gateway']}"

    def log(self) -> str:
        return Path(self.stderr.name).read_text(errors="replace")

    def triton_log_text(self) -> str:
        return self.triton_log.read_text(errors="replace") if self.triton_log.exists() else ""

    def triton_log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.triton_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no Triton log)"

    def wait_ready(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline and "ready" not in line:
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None:
                raise AssertionError(f"blip-serve exited {self.process.returncode}:\n{self.log()}")
        assert "ready" in line, f"no ready line:\n{self.log()}"
        return line

    def children(self) -> list[int]:
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == self.process.pid]

    def stop(self, signum=signal.SIGTERM, timeout: float = 60) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        self.process.communicate(timeout=timeout)
        return self.process.returncode, self.log()


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
