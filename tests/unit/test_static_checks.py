"""The static checkers run with the tests, so that a finding fails the README's test command (and CI).

ruff over the whole repository (its rules in pyproject.toml), mypy --strict over the client SDK (a typed library
that ships `py.typed`) and the gateway, bandit over the server for medium- and high-severity findings. Each prints
what it found.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing():
    result = _run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("package", ["client/blip_client", "server/blip_server/gateway"])
def test_mypy_strict_finds_nothing(package, tmp_path):
    result = _run("mypy", "--strict", "--cache-dir", str(tmp_path), package)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_client_ships_its_type_marker():
    assert (ROOT / "client" / "blip_client" / "py.typed").is_file()


def test_bandit_finds_no_medium_or_high_severity_issue_in_the_server():
    # Each finding reviewed and accepted is marked `# nosec <test id>` with its reason on the line or just above.
    result = _run("bandit", "--quiet", "--recursive", "--severity-level", "medium", "server")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_checkers_fail_on_a_finding(tmp_path):
    """The checks above can fail: each tool exits non-zero on a file with a finding of its kind."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nimport subprocess\n\n\n"
                   "def f(x):\n    subprocess.call(x, shell=True)\n    return undefined\n")
    assert _run("ruff", "check", "--no-cache", "--isolated", "--select", "F", str(bad)).returncode != 0
    assert _run("mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), str(bad)).returncode != 0
    assert _run("bandit", "--quiet", "--severity-level", "medium", str(bad)).returncode != 0
