"""Session fixtures shared by both tiers: random checkpoints and their exported model repositories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blip_demo.random_checkpoint import build
from blip_server.export import export_checkpoint
from support.checkpoints import SPECS

# The models the tests run in process are tiny: one thread is fastest for them, and more threads only fight the
# tritonserver processes (and anything else busy on the machine) for the cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: build(spec, root / name) for name, spec in SPECS.items()}


@pytest.fixture(scope="session")
def repositories(checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("repositories")
    for name, path in checkpoints.items():
        export_checkpoint(path, root / name)
    return {name: root / name for name in checkpoints}
