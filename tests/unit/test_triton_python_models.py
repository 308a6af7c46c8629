"""The `text_decoder` and `preprocess` Triton models as Triton runs them, on an exported repository: the decoder's
own cancellation (a request its client cancelled, one whose deadline passed) through its decode loop's thread, and
preprocess's per-request answers. Triton's Python API (`triton_python_backend_utils`, which only a backend stub
provides) is stood in for by the few calls the models make; the served models are tested end to end elsewhere."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import json_format

from blip_server.repository import parse_config
from support import images, python_backend
from support.python_backend import Tensor, TritonError

TEMPLATE = Path(__file__).parents[2] / "model_repository"


class _Sender:
    def __init__(self):
        self.responses, self.answered = [], threading.Event()

    def send(self, response, flags=None):
        self.responses.append((response, flags))
        self.answered.set()


class _Request:
    """A Triton request: its input arrays, whether its client cancelled it, its parameters (JSON)."""

    def __init__(self, inputs, cancelled_after=None, parameters=None):
        """cancelled_after: its client cancels it once Triton has been asked that many times (None: never)."""
        self.inputs, self.cancelled_after, self._parameters = inputs, cancelled_after, json.dumps(parameters or {})
        self.asked = 0
        self.sender = _Sender()

    def get_response_sender(self):
        return self.sender

    def parameters(self):
        return self._parameters

    def is_cancelled(self):
        self.asked += 1
        return self.cancelled_after is not None and self.asked > self.cancelled_after


def _load(monkeypatch, repository: Path, model: str, **module_settings):
    module = python_backend.load_model_module(
        monkeypatch, TEMPLATE / model / "1" / "model.py", f"{model}_model",
        lambda request, name: Tensor(name, request.inputs[name]) if name in request.inputs else None)
    for name, value in module_settings.items():
        setattr(module, name, value)
    directory = repository / model
    config = json_format.MessageToDict(parse_config(directory / "config.pbtxt"), preserving_proto_field_name=True)
    instance = module.TritonPythonModel()
    instance.initialize({"model_config": json.dumps(config), "model_repository": str(directory),
                         "model_version": "1", "model_instance_kind": "CPU", "model_instance_device_id": "0"})
    return instance


# -- text_decoder: cancellation through the model's own loop ---------------------------------------------------


def test_the_decoder_answers_cancelled_and_expired_requests_cancelled_and_the_others_as_alone(repositories,
                                                                                                monkeypatch):
    from caption_generation import generate
    from generation_options import GenerationOptions

    # Triton is asked about cancellations before every step (every 0.1 s when served), so that the tiny model's
    # caption cannot finish between two questions.
    model = _load(monkeypatch, repositories["standard"], "text_decoder", _CANCELLATION_CHECK_SECONDS=0.0)
    try:
        config = model.decoder.config
        embeds = torch.randn(4, 6, config.encoder_hidden_size, generator=torch.Generator().manual_seed(3))
        options = GenerationOptions(num_beams=2, min_new_tokens=12, max_new_tokens=12)

        def request(i, **kwargs):
            return _Request({"IMAGE_EMBEDS": embeds[i : i + 1].numpy(),
                             "PROMPT_IDS": np.array([[config.bos_token_id]], dtype=np.int64),
                             "GENERATION_OPTIONS": np.array([[options.to_json().encode()]], dtype=np.object_)},
                            **kwargs)

        kept, cancelled = request(0), request(1, cancelled_after=3)  # cancelled mid-way, after a step or more
        expired = request(2, parameters={"deadline_unix_ms": int(time.time() * 1000) - 1000})
        bad = request(3)
        bad.inputs["GENERATION_OPTIONS"] = np.array([[b'{"num_beams": 99}']], dtype=np.object_)
        assert model.execute([kept, cancelled, expired, bad]) is None  # queued: answered by the loop's thread
        for r in (kept, cancelled, expired, bad):
            assert r.sender.answered.wait(60)
            assert len(r.sender.responses) == 1 and r.sender.responses[0][1] == 1  # one final response each

        def error(r):
            return r.sender.responses[0][0].error

        assert error(bad).code == TritonError.INVALID_ARG and "num_beams=99 is out of range" in str(error(bad))
        for r in (cancelled, expired):
            assert error(r).code == TritonError.CANCELLED
            assert "cancelled or its deadline passed" in str(error(r))
        assert cancelled.asked == 4  # dropped when it was first said to be cancelled, never asked again
        answer = kept.sender.responses[0][0]
        assert answer.error is None
        alone = generate(model.decoder, embeds[:1], [[config.bos_token_id]], [options])[0]
        assert [c.decode() for c in answer.outputs["CAPTIONS"][0]] == model.texts([h.tokens for h in alone])
        assert answer.outputs["SCORES"][0].tolist() == pytest.approx([h.score for h in alone], rel=1e-6)
        assert len(model.loop) == 0 and not model.pending
    finally:
        model.finalize()


def test_a_loop_emptied_by_cancellation_reports_its_steps_and_nothing_in_flight(repositories, monkeypatch):
    from generation_options import GenerationOptions

    # No step follows the cancellation that empties the loop: the counts must be handed over all the same.
    model = _load(monkeypatch, repositories["standard"], "text_decoder", _CANCELLATION_CHECK_SECONDS=0.0,
                  _METRICS_SECONDS=3600.0)
    try:
        config = model.decoder.config
        options = GenerationOptions(num_beams=2, min_new_tokens=12, max_new_tokens=12)
        request = _Request({"IMAGE_EMBEDS": torch.randn(1, 6, config.encoder_hidden_size).numpy(),
                            "PROMPT_IDS": np.array([[config.bos_token_id]], dtype=np.int64),
                            "GENERATION_OPTIONS": np.array([[options.to_json().encode()]], dtype=np.object_)},
                           cancelled_after=3)
        model.execute([request])
        assert request.sender.answered.wait(60)
        assert request.sender.responses[0][0].error.code == TritonError.CANCELLED
        metrics = python_backend.MetricFamily.metrics
        deadline = time.monotonic() + 30  # the loop's thread hands them over just after it answers
        while metrics["blip_decoder_steps"].value == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert 1 <= metrics["blip_decoder_steps"].value < 12
        assert metrics["blip_decoder_requests_in_flight"].value == 0
    finally:
        model.finalize()


# -- preprocess: one request per execution, each answered on its own ------------------------------------------


def test_preprocess_answers_each_request_on_its_own(repositories, monkeypatch):
    from generation_options import GenerationOptions

    model = _load(monkeypatch, repositories["standard"], "preprocess")
    try:
        image = images.encode(images.rgb(40, 30), "PNG")

        def request(**inputs):
            return {"IMAGE": np.array([[image]], dtype=np.object_), **inputs}

        good = request(PROMPT=np.array([[b"a picture of"]], dtype=np.object_),
                       NUM_BEAMS=np.array([[1]], dtype=np.int32), DO_SAMPLE=np.array([[True]], dtype=np.bool_),
                       SEED=np.array([[7]], dtype=np.int64))
        bad_option = request(TOP_P=np.array([[1.5]], dtype=np.float32))
        bad_image = {"IMAGE": np.array([[b"not an image"]], dtype=np.object_)}
        responses = model.execute([_Request(r) for r in (good, bad_option, bad_image)])
        assert len(responses) == 3
        ok, refused_option, refused_image = responses
        assert ok.error is None
        resolved = GenerationOptions.from_json(bytes(ok.outputs["GENERATION_OPTIONS"][0][0]))
        assert resolved == GenerationOptions(num_beams=1, do_sample=True, seed=7)
        assert ok.outputs["PIXEL_VALUES"].shape[:2] == (1, 3) and ok.outputs["PROMPT_IDS"].shape[0] == 1
        assert refused_option.error.code == TritonError.INVALID_ARG and "top_p=1.5" in str(refused_option.error)
        assert refused_image.error.code == TritonError.INVALID_ARG
    finally:
        model.finalize()
