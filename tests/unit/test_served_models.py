"""Several models side by side (issue 23) without a server: `--model NAME=PATH` parsing, the combined model
repository blip-serve serves, the gateway's reading of the served models, and `blip-caption --model`. (One
blip-serve serving two checkpoints: tests/integration/test_several_models.py.)"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from blip_client import cli
from blip_server import ensemble
from blip_server.config import ServeConfig, parse_command_line
from blip_server.gateway import captioner as captioner_module
from blip_server.gateway.captioner import Captioner, GatewayLimits
from blip_server.gateway.messages import ServedModel
from blip_server.gateway.replicas import ReplicaPool
from blip_server.gateway.status_mapping import NotFound
from blip_server.repository import MODELS, parse_config
from blip_server.served_models import (
    ModelArgument,
    combine,
    main,
    parse_model_argument,
    parse_model_arguments,
    triton_name,
)
from support.fake_captioner import IMAGE, FakeCaptioner
from support.gateway import BackgroundGateway


def test_a_model_is_name_equals_path_or_a_path_named_after_its_folder(tmp_path):
    assert parse_model_argument("large=/ckpt/a") == ModelArgument("large", Path("/ckpt/a"))
    assert parse_model_argument("/ckpt/blip-image-captioning-large/") == ModelArgument(
        "blip-image-captioning-large", Path("/ckpt/blip-image-captioning-large/"))
    assert parse_model_argument("/data/a=b/ckpt") == ModelArgument("ckpt", Path("/data/a=b/ckpt"))  # no name there
    assert parse_model_arguments([]) == [ModelArgument("blip-demo", None)]  # nothing given: the demo
    with pytest.raises(ValueError, match="named 'a'"):
        parse_model_arguments(["a=/x", "/y/a"])
    with pytest.raises(ValueError, match="give NAME=PATH"):
        parse_model_argument("/ckpt/with space")
    with pytest.raises(ValueError, match="after a="):
        parse_model_argument("a=")
    config = parse_command_line(ServeConfig, ["--model", "a=/x", "--model", "/y/b"], prog="blip-serve",
                                description="", environ={"BLIP_MODEL": "ignored"})
    assert config.model == ("a=/x", "/y/b")
    assert parse_command_line(ServeConfig, [], prog="blip-serve", description="",
                              environ={"BLIP_MODEL": "a=/x,/y/b"}).model == ("a=/x", "/y/b")


def test_triton_names_of_different_models_never_meet():
    names = ["a", "a.b", "a.preprocess", "blip_caption", "x-y_z.1"]
    served = [triton_name(name, model, default=i == 0) for i, name in enumerate(names) for model in MODELS]
    assert len(set(served)) == len(served)
    assert [triton_name("a", m, default=True) for m in MODELS] == list(MODELS)  # the default keeps an export's


@pytest.mark.parametrize("copy", [False, True], ids=["linked", "copied"])
def test_the_combined_repository_serves_each_export_under_its_names(repositories, tmp_path, copy):
    output = tmp_path / "combined"
    catalog = combine([("first", repositories["standard"]), ("second", repositories["unusual"])], output, copy=copy)
    assert catalog == [
        {"name": "first", "ensemble": "blip_caption", "cached_ensemble": "blip_caption_cached",
         "preprocess": "preprocess"},
        {"name": "second", "ensemble": "second.blip_caption", "cached_ensemble": "second.blip_caption_cached",
         "preprocess": "second.preprocess"}]
    for name, prefix, source in (("first", "", repositories["standard"]),
                                 ("second", "second.", repositories["unusual"])):
        for model in MODELS:
            directory = output / f"{prefix}{model}"
            config = parse_config(directory / "config.pbtxt")
            assert config.name == f"{prefix}{model}", name
            for version in (source / model).iterdir():
                if version.name.isdigit():  # the weights and code: the export's own, linked or copied
                    served = directory / version.name
                    assert served.is_symlink() != copy
                    # Python's bytecode caches aside: an earlier test may have imported the export's modules.
                    assert sorted(p.name for p in served.iterdir() if p.name != "__pycache__") == sorted(
                        p.name for p in version.iterdir() if p.name != "__pycache__")
            for gpu in (source / model / "configs").glob("*.pbtxt"):
                assert parse_config(directory / "configs" / gpu.name).name == f"{prefix}{model}"
        for ensemble_name in ("blip_caption", "blip_caption_cached"):
            steps = parse_config(output / f"{prefix}{ensemble_name}" / "config.pbtxt").ensemble_scheduling.step
            assert [s.model_name for s in steps] == [f"{prefix}preprocess", f"{prefix}vision_encoder",
                                                      f"{prefix}text_decoder"]
    listed = parse_config(output / "blip_caption" / "config.pbtxt").parameters[ensemble.CATALOG_PARAMETER]
    assert json.loads(listed.string_value) == catalog
    assert ensemble.CATALOG_PARAMETER not in parse_config(output / "second.blip_caption" / "config.pbtxt").parameters
    with pytest.raises(ValueError, match="not empty"):
        combine([("first", repositories["standard"])], output)


def test_the_command_combines_exports_and_refuses_what_is_not_one(repositories, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["--model", f"a={repositories['standard']}", "--model", str(repositories["unusual"]),
                 "--output", str(output), "--copy"]) == 0
    assert (output / "unusual.blip_caption" / "config.pbtxt").is_file()
    assert main(["--model", f"a={tmp_path}", "--output", str(tmp_path / "other")]) == 2
    assert "is not an exported model repository" in capsys.readouterr().err


def test_an_export_without_the_cached_ensemble_is_refused_with_what_to_do(repositories, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(repositories["standard"], older, symlinks=True)
    shutil.rmtree(older / "blip_caption_cached")
    with pytest.raises(ValueError, match="lacks blip_caption_cached: it was exported by an older blip-export"):
        combine([("a", older)], tmp_path / "combined")


class _Configs(Captioner):
    """A captioner whose replica's model configs are given."""

    def __init__(self, configs, served=()):
        super().__init__(ReplicaPool(("127.0.0.1:1",)), GatewayLimits())
        self.configs = configs
        self.served = set(configs) | set(served)  # the Triton models in the replica's repository index
        self.reads = 0

    async def _config(self, model, deadline=None):
        self.reads += 1
        return self.configs[model]

    async def _serves(self, model, deadline=None):
        return model in self.served


def _parameters(**values):
    return {"parameters": {key: {"string_value": value} for key, value in values.items()}}


def test_the_gateway_reads_the_served_models_from_the_default_ensemble(monkeypatch):
    catalog = [{"name": "demo", "ensemble": "blip_caption", "preprocess": "preprocess"}]
    configs = {"blip_caption": _parameters(served_models=json.dumps(catalog))}
    captioner = _Configs(configs)
    assert asyncio.run(captioner.models()) == [ServedModel("demo", "blip_caption", "preprocess", default=True)]
    assert asyncio.run(captioner.model("")).name == "demo"
    with pytest.raises(NotFound):
        asyncio.run(captioner.model("large"))  # just read: not read again
    assert captioner.reads == 1
    # A rollout adds a model: a request that names it has the list read again (at most every CATALOG_REFRESH s).
    catalog.append({"name": "large", "ensemble": "large.blip_caption", "preprocess": "large.preprocess"})
    configs["blip_caption"] = _parameters(served_models=json.dumps(catalog))
    monkeypatch.setattr(captioner_module, "CATALOG_REFRESH", 0.0)
    assert asyncio.run(captioner.model("large")) == ServedModel("large", "large.blip_caption", "large.preprocess")


def test_one_export_served_as_exported_is_named_after_its_checkpoint_folder():
    configs = {"blip_caption": _parameters(),
               "preprocess": _parameters(source_checkpoint="/ckpt/blip-image-captioning-large")}
    captioner = _Configs(configs, served={"blip_caption_cached"})
    assert asyncio.run(captioner.models()) == [ServedModel("blip-image-captioning-large", "blip_caption", "preprocess",
                                                           default=True, cached_ensemble="blip_caption_cached")]
    # Exported before the cached ensemble existed: none to send deterministic requests to.
    assert asyncio.run(_Configs(configs).models()) == [
        ServedModel("blip-image-captioning-large", "blip_caption", "preprocess", default=True)]


def test_deterministic_requests_go_to_the_cached_ensemble_and_unseeded_samples_to_the_plain_one():
    model = ServedModel("m", "m.blip_caption", "m.preprocess", cached_ensemble="m.blip_caption_cached")
    assert model.ensemble_for(deterministic=True) == "m.blip_caption_cached"
    assert model.ensemble_for(deterministic=False) == "m.blip_caption"
    older = ServedModel("m", "blip_caption", "preprocess")  # a catalog written before the cached ensembles
    assert older.ensemble_for(deterministic=True) == older.ensemble_for(deterministic=False) == "blip_caption"


def test_blip_caption_passes_the_model_it_is_given(tmp_path, capsys):
    image = tmp_path / "image.png"
    image.write_bytes(IMAGE)
    gateway = BackgroundGateway(FakeCaptioner())
    try:
        assert cli.main([str(image), "--server", gateway.address, "--model", "other", "--json", "--prompt", "p"]) == 0
        assert json.loads(capsys.readouterr().out)["captions"][0]["text"] == "other.blip_caption: p []"
        assert cli.main([str(image), "--server", gateway.address, "--model", "missing", "--json"]) == 1
        assert json.loads(capsys.readouterr().out)["error"]["code"] == "NOT_FOUND"
    finally:
        gateway.stop()
