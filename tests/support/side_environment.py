"""Virtual environments with other versions of packages than this one's, built once and kept between runs.

A test that needs, say, the Pillow release NVIDIA's Triton image installs builds its environment here, keyed by
the exact requirements: a second run of the test suite finds it and downloads nothing. The cache lives in
`$XDG_CACHE_HOME/blip-caption/test-environments` (default `~/.cache`); a half-built environment is never used
(it counts as built once its `requirements.txt` is written, after pip succeeded).
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


def environment(packages: list[str], timeout: float = 900) -> Path:
    """The python of an environment holding exactly `packages` (pinned requirements), built if needed. Its
    `bin/` has the packages' commands too."""
    key = hashlib.sha256(f"{sys.version_info[:2]}\n{sorted(packages)}".encode()).hexdigest()[:16]
    directory = cache_directory() / key
    python, done = directory / "bin" / "python", directory / "requirements.txt"
    if done.is_file():
        return python
    # Built where it stays (its commands name their interpreter by absolute path); complete once `done` exists.
    shutil.rmtree(directory, ignore_errors=True)
    venv.create(directory, with_pip=True)
    result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages],
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"could not build an environment with {' '.join(packages)}:\n{result.stderr[-4000:]}")
    done.write_text("\n".join(packages) + "\n")
    return python
