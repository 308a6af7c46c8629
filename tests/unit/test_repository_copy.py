"""repository_copy: what the Kubernetes init container runs to put a model image's repository into its pod's
volume (and what blip-export moves its result into place with): idempotent, never half a repository, never
somebody else's files replaced."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blip_server import repository_copy
from blip_server.repository_copy import MANIFEST, RepositoryCopyError, install, replace_directory


def _repository(path: Path, checkpoint: str, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps({"checkpoint_sha256": checkpoint}))
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_repository_is_installed_then_kept_when_installed_again(tmp_path):
    source = _repository(tmp_path / "image" / "repository", "a", {"m/config.pbtxt": "x", "m/1/model.onnx": "w"})
    target = tmp_path / "volume" / "repository"
    target.parent.mkdir()
    assert install(source, target) is True
    assert _tree(target) == _tree(source)
    stamp = (target / "m" / "1" / "model.onnx").stat().st_mtime_ns
    assert install(source, target) is False  # a pod sandbox restart finds its earlier copy: nothing to do
    assert (target / "m" / "1" / "model.onnx").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in target.parent.iterdir()) == ["repository"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_another_export_replaces_the_old_one_whole(tmp_path, monkeypatch, exchange):
    if not exchange:  # a kernel or file system without RENAME_EXCHANGE
        monkeypatch.setattr(repository_copy, "_exchange", lambda a, b: False)
    old = _repository(tmp_path / "old", "a", {"only_old.txt": "1", "shared.txt": "old"})
    new = _repository(tmp_path / "new", "b", {"shared.txt": "new"})
    target = tmp_path / "volume" / "repository"
    target.parent.mkdir()
    install(old, target)
    assert install(new, target) is True
    assert _tree(target) == _tree(new)  # nothing of the old one is left in it
    assert sorted(p.name for p in target.parent.iterdir()) == ["repository"]  # nor beside it


def test_the_exchange_is_one_step_on_this_kernel(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "which").write_text("a")
    (b / "which").write_text("b")
    assert repository_copy._exchange(a, b) is True
    assert ((a / "which").read_text(), (b / "which").read_text()) == ("b", "a")


def test_a_directory_holding_something_else_is_left_alone(tmp_path):
    source = _repository(tmp_path / "image", "a", {"f": "x"})
    target = tmp_path / "data"
    target.mkdir()
    (target / "precious.txt").write_text("keep")
    with pytest.raises(RepositoryCopyError, match="no blip_export.json: it is not a model repository"):
        install(source, target)
    assert _tree(target) == {"precious.txt": "keep"}
    with pytest.raises(RepositoryCopyError, match="not an exported model repository"):
        install(target, tmp_path / "elsewhere")


def test_a_failed_copy_leaves_the_old_repository_and_no_partial(tmp_path, monkeypatch):
    old = _repository(tmp_path / "old", "a", {"f": "old"})
    new = _repository(tmp_path / "new", "b", {"f": "new"})
    target = tmp_path / "volume" / "repository"
    target.parent.mkdir()
    install(old, target)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(repository_copy, "replace_directory", full_disk)
    with pytest.raises(OSError, match="No space left"):
        install(new, target)
    assert _tree(target) == _tree(old)
    assert sorted(p.name for p in target.parent.iterdir()) == ["repository"]


def test_replace_directory_into_a_new_place(tmp_path):
    new = _repository(tmp_path / "new", "a", {"f": "x"})
    replace_directory(new, tmp_path / "target")
    assert not new.exists() and (tmp_path / "target" / "f").read_text() == "x"


def test_the_command_line_as_the_init_container_runs_it(tmp_path):
    """The model image has Python and this one file: run it as a script, with nothing of the project importable."""
    source = _repository(tmp_path / "image", "a", {"f": "x"})
    script = Path(repository_copy.__file__)
    command = [sys.executable, "-I", str(script), str(source), str(tmp_path / "repository")]
    first = subprocess.run(command, capture_output=True, text=True, timeout=60)
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert (first.returncode, again.returncode) == (0, 0), first.stderr + again.stderr
    assert "installed from" in first.stdout and "already holds the export of" in again.stdout
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "x").write_text("y")
    refused = subprocess.run([*command[:-1], str(tmp_path / "occupied")], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "repository_copy: error:" in refused.stderr and "Traceback" not in refused.stderr
