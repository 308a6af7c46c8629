"""Virtual environments with other versions of packages than this one's, built once and kept between runs.

A test that needs, say, the Pillow release NVIDIA's Triton image installs builds its environment here, keyed by
the exact requirements and this Python's version: a second run of the test suite finds it and downloads nothing.
The cache lives in `$XDG_CACHE_HOME/blip-caption/test-environments` (default `~/.cache`). An environment is
built in a directory of its own, `KEY.partial-PID`, and renamed to `KEY` once pip succeeded: an interrupted build
is never used (its leftovers are removed by the next build), and two test runs building the same environment at
once each finish their own and keep the first renamed. `rm -r` the directory to build afresh.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path


def cache_directory() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "blip-caption" / "test-environments"


def environment(packages: list[str], timeout: float = 900, log: Path | None = None) -> Path:
    """The python of an environment holding exactly `packages` (pinned requirements), built if needed. Its
    `bin/` has the packages' commands too. `log`: where pip's output goes (else it is kept for the error)."""
    key = hashlib.sha256(f"{sys.version_info[:2]}\n{sorted(packages)}".encode()).hexdigest()[:16]
    directory = cache_directory() / key
    if (directory / "requirements.txt").is_file():
        return directory / "bin" / "python"
    _remove_abandoned(directory)
    partial = directory.with_name(f"{key}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    venv.create(partial, with_pip=True)
    try:
        with open(log or partial / "pip.log", "wb") as output:
            code = subprocess.run([str(partial / "bin" / "python"), "-m", "pip", "install", "--quiet", *packages],
                                  stdout=output, stderr=subprocess.STDOUT, timeout=timeout).returncode
        if code != 0:
            text = (log or partial / "pip.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"could not build an environment with {' '.join(packages)}:\n{text}")
        _point_commands_at(partial, directory)
        (partial / "requirements.txt").write_text("\n".join(packages) + "\n")
        if directory.is_dir() and not (directory / "requirements.txt").is_file():  # a build in place, half done
            shutil.rmtree(directory, ignore_errors=True)
        try:
            partial.rename(directory)
        except OSError:  # another run renamed its build first: use that one
            if not (directory / "requirements.txt").is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return directory / "bin" / "python"


def _point_commands_at(partial: Path, final: Path) -> None:
    """pip writes each command's interpreter into it by absolute path (`#!PARTIAL/bin/python`, or an `exec` line
    for a long one): make them name the directory the environment is renamed to."""
    old, new = str(partial).encode(), str(final).encode()
    for command in (partial / "bin").iterdir():
        if command.is_symlink() or not command.is_file():
            continue
        text = command.read_bytes()
        if text.startswith(b"#!") and old in text[:1024]:
            command.write_bytes(text[:1024].replace(old, new) + text[1024:])


def _remove_abandoned(directory: Path) -> None:
    """Partial builds of this environment whose process is gone (interrupted, killed)."""
    for partial in directory.parent.glob(f"{directory.name}.partial-*"):
        try:
            os.kill(int(partial.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, PermissionError):
            continue
