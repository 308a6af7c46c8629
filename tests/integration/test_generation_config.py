"""A checkpoint's generation_config.json: what it sets and a request leaves unset behaves as in transformers
(`generate(generation_config=...)`), requests override it, GetModelInfo reports it; what the service cannot
honour is refused at export."""

from __future__ import annotations

import json
import shutil

import pytest
import tritonclient.grpc as grpcclient
from transformers import GenerationConfig

from blip_server.errors import ExportError
from blip_server.export import export_checkpoint
from support import images, reference
from support.triton_requests import caption_inputs, captions

KINDS = images.kinds(seed=95)


def _with_generation_config(checkpoints, tmp_path, settings: dict):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(checkpoints["standard"], checkpoint)
    path = checkpoint / "generation_config.json"
    base = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**base, **settings}))
    return checkpoint


@pytest.mark.parametrize("settings", [
    dict(num_beams=4, max_new_tokens=9, min_new_tokens=2, length_penalty=1.8, early_stopping=True),
    dict(num_beams=3, early_stopping="never", length_penalty=1.5, repetition_penalty=1.3, no_repeat_ngram_size=2),
    dict(num_beams=2, max_length=12, min_length=6),
], ids=["beams_lengths_early_stopping", "never", "total_lengths"])
def test_the_checkpoints_generation_config_is_honoured_and_overridable(checkpoints, tmp_path, start_triton, settings):
    checkpoint = _with_generation_config(checkpoints, tmp_path, settings)
    export_checkpoint(checkpoint, tmp_path / "repository")
    triton = start_triton(tmp_path / "repository")
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton.options.grpc_port}")
    config = GenerationConfig.from_pretrained(checkpoint)
    for kind, prompt, overrides in [("jpeg", None, {}), ("png", "a picture of", {}), ("webp", None, dict(num_beams=1)),
                                    ("bmp", "a picture of", dict(max_new_tokens=4, min_new_tokens=0))]:
        texts, scores = captions(client.infer("blip_caption", caption_inputs(KINDS[kind], prompt, **overrides)))[0]
        expected = reference.caption(str(checkpoint), KINDS[kind], prompt, generation_config=config, **overrides)
        assert texts == expected[0], (kind, prompt, overrides)
        assert scores == pytest.approx(expected[1], rel=1e-5, abs=1e-4)
    parameters = {k: v.string_value for k, v in client.get_model_config("preprocess").config.parameters.items()}
    assert parameters["default_num_beams"] == str(settings["num_beams"])
    assert parameters["default_early_stopping"] == str(settings.get("early_stopping", False)).lower()


def test_what_the_service_cannot_honour_is_refused_at_export(checkpoints, tmp_path):
    checkpoint = _with_generation_config(checkpoints, tmp_path, dict(num_beams=2, typical_p=0.5, num_beam_groups=2))
    with pytest.raises(ExportError,
                       match="sets num_beam_groups=2, typical_p=0.5, which the service does not implement"):
        export_checkpoint(checkpoint, tmp_path / "repository")
    limits = _with_generation_config(checkpoints, tmp_path / "second", dict(num_beams=12))
    with pytest.raises(ExportError, match="num_beams=12 is out of range: allowed 1 to 8"):
        export_checkpoint(limits, tmp_path / "second" / "repository")
