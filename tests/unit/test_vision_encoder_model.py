"""The `vision_encoder` Triton model's batch handling, on the exported ONNX model and real ONNX Runtime: a batch's
images go through session runs of `images_per_run` images, each run in its own CPU turn, and every request gets
its own images' embeddings back. Triton's Python API (`triton_python_backend_utils`, which only a backend stub
provides) is stood in for by the few calls the model makes; the served model is tested end to end elsewhere."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from google.protobuf import json_format

from blip_server.repository import parse_config
from support import python_backend
from support.python_backend import Tensor, TritonError

MODEL_PY = Path(__file__).parents[2] / "model_repository" / "vision_encoder" / "1" / "model.py"


class _Recorder:
    """Stands in for the model's CpuTurns and wraps its session: every turn and run, in order."""

    def __init__(self, session):
        self.events: list[tuple[str, int]] = []
        self._session = session

    def __enter__(self):
        self.events.append(("turn", 0))
        return self

    def __exit__(self, *exc):
        self.events.append(("end", 0))

    def close(self):
        pass

    def run(self, names, feeds, options=None):
        self.events.append(("run", len(feeds["PIXEL_VALUES"])))
        return self._session.run(names, feeds, options)


@pytest.fixture
def load_model(repositories, monkeypatch):
    directory = repositories["standard"] / "vision_encoder"
    module = python_backend.load_model_module(monkeypatch, MODEL_PY, "vision_encoder_model",
                                              lambda request, name: request.get(name))

    def load(config_name: str):
        config = json_format.MessageToDict(parse_config(directory / config_name), preserving_proto_field_name=True)
        config["parameters"]["cpu_turns"] = {"string_value": "0"}  # the recorder takes the turns' place
        model = module.TritonPythonModel()
        model.initialize({"model_config": json.dumps(config), "model_repository": str(directory),
                          "model_version": "1", "model_instance_kind": "CPU"})
        recorder = _Recorder(model.session)
        model.turns, model.session = recorder, recorder
        return model, recorder

    load.module = module
    return load


def _requests(sizes: list[int], seed: int = 5) -> list[dict[str, Tensor]]:
    rng = np.random.default_rng(seed)
    return [{"PIXEL_VALUES": Tensor("PIXEL_VALUES", rng.standard_normal((n, 3, 384, 384), dtype=np.float32))}
            for n in sizes]


def _expected(repositories, requests) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(repositories["standard"] / "vision_encoder" / "1" / "model.onnx"))
    return [session.run(None, {"PIXEL_VALUES": r["PIXEL_VALUES"].array})[0] for r in requests]


@pytest.mark.parametrize("config_name, runs", [("config.pbtxt", [1, 1, 1, 1]), ("configs/gpu.pbtxt", [4])])
def test_a_batch_runs_in_runs_of_images_per_run_each_in_its_own_turn(repositories, load_model, config_name, runs):
    model, recorder = load_model(config_name)
    requests = _requests([1, 2, 1])
    responses = model.execute(requests)
    assert [size for event, size in recorder.events if event == "run"] == runs
    # Each run in a turn of its own: turn, run, end, turn, run, end...
    assert [event for event, _ in recorder.events] == ["turn", "run", "end"] * len(runs)
    for response, expected in zip(responses, _expected(repositories, requests), strict=True):
        assert response.error is None
        np.testing.assert_allclose(response.outputs["IMAGE_EMBEDS"], expected, atol=1e-5)


def test_a_malformed_request_fails_alone_and_the_others_are_encoded(repositories, load_model):
    model, recorder = load_model("config.pbtxt")
    requests = _requests([1, 1])
    bad = {"PIXEL_VALUES": Tensor("PIXEL_VALUES", np.zeros((1, 3, 32, 32), dtype=np.float32))}
    responses = model.execute([requests[0], bad, requests[1]])
    assert [size for event, size in recorder.events if event == "run"] == [1, 1]
    assert responses[1].error.code == TritonError.INVALID_ARG and "PIXEL_VALUES must be float32" in str(
        responses[1].error)
    for response, expected in zip([responses[0], responses[2]], _expected(repositories, requests), strict=True):
        np.testing.assert_allclose(response.outputs["IMAGE_EMBEDS"], expected, atol=1e-5)


class _FakeSession:
    """An ONNX Runtime session that holds `held` providers, whatever it was asked for (as a failed CUDA provider
    leaves it holding the CPU's alone)."""

    def __init__(self, held):
        self.held, self.fallback = held, True
        self.asked = None

    def get_providers(self):
        return self.held

    def disable_fallback(self):
        self.fallback = False

    def get_inputs(self):
        return [types.SimpleNamespace(shape=["batch", 3, 384, 384])]


@pytest.fixture
def load_gpu_instance(repositories, load_model, monkeypatch):
    """initialize() of a GPU instance (configs/gpu.pbtxt) with ONNX Runtime's providers stood in for."""
    module = load_model.module

    def load(available, held, precision="fp32"):
        sessions = []

        def session(path, options, providers):
            sessions.append(_FakeSession(held))
            sessions[-1].asked = providers
            return sessions[-1]

        monkeypatch.setattr(module.ort, "get_available_providers", lambda: available)
        monkeypatch.setattr(module.ort, "InferenceSession", session)
        directory = repositories["standard"] / "vision_encoder"
        config = json_format.MessageToDict(parse_config(directory / "configs" / "gpu.pbtxt"),
                                           preserving_proto_field_name=True)
        config["parameters"]["precision"] = {"string_value": precision}
        model = module.TritonPythonModel()
        model.initialize({"model_config": json.dumps(config), "model_repository": str(directory),
                          "model_version": "1", "model_instance_kind": "GPU", "model_instance_device_id": "1"})
        return model, sessions[0]

    return load


def test_a_gpu_instance_runs_on_the_cuda_provider_without_tf32_or_fallback(load_gpu_instance):
    model, session = load_gpu_instance(["CUDAExecutionProvider", "CPUExecutionProvider"],
                                       ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert session.asked[0] == ("CUDAExecutionProvider", {"device_id": 1, "use_tf32": 0})
    assert session.fallback is False


def test_a_gpu_instance_refuses_an_onnxruntime_without_cuda(load_gpu_instance):
    with pytest.raises(RuntimeError, match="needs ONNX Runtime's CUDA provider.*install onnxruntime-gpu"):
        load_gpu_instance(["CPUExecutionProvider"], ["CPUExecutionProvider"])


def test_a_gpu_instance_refuses_a_session_that_fell_back_to_the_cpu(load_gpu_instance):
    with pytest.raises(RuntimeError, match="could not use the GPU .*holds CPUExecutionProvider.*refusing"):
        load_gpu_instance(["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"])


def test_a_gpu_instance_of_an_int8_export_refuses_to_load(load_gpu_instance):
    with pytest.raises(RuntimeError, match="--precision int8.*CPUs only"):
        load_gpu_instance(["CUDAExecutionProvider", "CPUExecutionProvider"],
                          ["CUDAExecutionProvider", "CPUExecutionProvider"], precision="int8")
