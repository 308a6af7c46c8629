"""The client SDK's own pieces: status-code mapping, image inputs, options presence, generated code."""

from __future__ import annotations

import filecmp

import grpc
import pytest

import blip_client
from blip_client import _errors
from blip_client._images import image_bytes
from blip_client.protos.blip.caption.v1 import caption_pb2
from support import images

EXPECTED = {
    grpc.StatusCode.INVALID_ARGUMENT: blip_client.InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: blip_client.ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: blip_client.UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: blip_client.DeadlineExceededError,
    grpc.StatusCode.CANCELLED: blip_client.CancelledError,
    grpc.StatusCode.UNAUTHENTICATED: blip_client.UnauthenticatedError,
    grpc.StatusCode.NOT_FOUND: blip_client.NotFoundError,
    grpc.StatusCode.INTERNAL: blip_client.InternalError,
}


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_every_status_code_maps_to_a_typed_error(code):
    error = _errors.from_rpc_error(FakeRpcError(code, "why"))
    assert isinstance(error, blip_client.CaptionError) and error.code == code and error.message == "why"
    assert type(error) is EXPECTED.get(code, blip_client.CaptionError)
    assert str(error) == f"{code.name}: why"
    assert _errors.code_from_name(code.name) == code


def test_images_may_be_bytes_paths_or_pil_images(tmp_path):
    data = images.encode(images.rgb(20, 10), "PNG")
    path = tmp_path / "image.png"
    path.write_bytes(data)
    assert image_bytes(data) == image_bytes(bytearray(data)) == image_bytes(str(path)) == image_bytes(path) == data
    from PIL import Image

    decoded = Image.open(path)
    assert Image.open(__import__("io").BytesIO(image_bytes(decoded))).size == (20, 10)
    with pytest.raises(TypeError, match="an image is bytes, a path or a PIL image"):
        image_bytes(42)


def test_options_keep_presence_through_the_wire():
    options = blip_client.GenerationOptions(num_beams=0, do_sample=False, seed=0)
    message = options.to_pb()
    assert [f.name for f, _ in message.ListFields()] == ["num_beams", "do_sample", "seed"]
    assert blip_client.GenerationOptions.from_pb(
        caption_pb2.GenerationOptions.FromString(message.SerializeToString())) == options


def test_the_public_api_is_exported():
    assert set(blip_client.__all__) <= set(dir(blip_client))
    assert {"CaptionClient", "AsyncCaptionClient", "GenerationOptions", "CaptionResult"} <= set(blip_client.__all__)


def test_generated_code_is_current(tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("generate_python", root / "protos" / "generate_python.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generator.generate(tmp_path)
    committed = root / "client" / "blip_client" / "protos"
    for fresh in tmp_path.rglob("*.py*"):
        assert filecmp.cmp(fresh, committed / fresh.relative_to(tmp_path), shallow=False), (
            f"{fresh.relative_to(tmp_path)} is stale: run python protos/generate_python.py"
        )


def test_the_default_retry_policy_spans_a_gateway_restart_and_says_so():
    import json

    from blip_client import RetryPolicy
    from blip_client._requests import DEFAULT_RETRY, channel_options

    assert RetryPolicy() == DEFAULT_RETRY
    assert DEFAULT_RETRY.max_attempts == 5  # gRPC's most
    assert DEFAULT_RETRY.backoffs() == [1.0, 2.0, 4.0, 8.0]
    assert DEFAULT_RETRY.worst_case_wait == 15.0
    assert "up to 15 s in all" in (RetryPolicy.__doc__ or "")
    (config,) = [value for name, value in channel_options() if name == "grpc.service_config"]
    policy = json.loads(str(config))["methodConfig"][0]["retryPolicy"]
    assert policy == {"maxAttempts": 5, "initialBackoff": "1.0s", "maxBackoff": "8.0s", "backoffMultiplier": 2.0,
                      "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]}
