"""--model resolution: exported repositories as given, checkpoints exported once and cached by content."""

from __future__ import annotations

import shutil

import pytest

from blip_server import model_store
from blip_server.errors import ModelNotFoundError
from blip_server.model_store import resolve_repository


def test_an_exported_repository_is_served_as_it_is(repositories, tmp_path):
    assert resolve_repository(repositories["standard"], tmp_path) == repositories["standard"]


def test_a_checkpoint_is_exported_once_and_reused(checkpoints, tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(checkpoints["standard"], checkpoint)
    first = resolve_repository(checkpoint, tmp_path / "cache")
    assert (first / "blip_caption" / "config.pbtxt").is_file() and first.parent == tmp_path / "cache" / "repositories"

    def no_second_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(model_store, "export_checkpoint", no_second_export)
    assert resolve_repository(checkpoint, tmp_path / "cache") == first

    # Same content elsewhere: same cache entry. Changed content: a new one.
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint, moved)
    assert resolve_repository(moved, tmp_path / "cache") == first
    monkeypatch.undo()
    (checkpoint / "config.json").write_text((checkpoint / "config.json").read_text().replace("\n", "\n "))
    assert resolve_repository(checkpoint, tmp_path / "cache") != first


def test_paths_that_are_neither_are_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_repository(tmp_path / "missing", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError,
                       match="no config.json.*checkpoint directory or an exported model repository"):
        resolve_repository(tmp_path / "empty", tmp_path)
