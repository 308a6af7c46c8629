"""The gateway's own behaviour over real gRPC, with the Triton call replaced: status mapping, streams, auth,
health, reflection, limits. (Against the real Triton: tests/integration/test_gateway.py.)"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from blip_client import CaptionClient, GenerationOptions
from blip_client import _errors as client_errors
from blip_client.protos.blip.caption.v1 import caption_pb2
from blip_server.gateway import status_mapping
from blip_server.gateway.captioner import Captioner, GatewayLimits
from blip_server.gateway.messages import CaptionJob
from blip_server.gateway.replicas import Replica, ReplicaPool
from blip_server.repository import parse_config, template_directory
from support.fake_captioner import FAILURES, IMAGE, FakeCaptioner
from support.gateway import BackgroundGateway


@pytest.fixture
def served():
    captioner = FakeCaptioner(GatewayLimits(max_image_bytes=1000, max_concurrent_requests=2, stream_window=2))
    gateway = BackgroundGateway(captioner)
    yield gateway, captioner
    gateway.call(_release(captioner))
    gateway.stop()


async def _release(captioner):
    captioner.release.set()


@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_service_errors_become_their_status_codes(served, kind):
    gateway, _ = served
    with (
        CaptionClient(gateway.address) as client,
        pytest.raises(client_errors.ERRORS_BY_CODE[FAILURES[kind].code]) as error,
    ):
        client.caption(IMAGE, prompt=f"fail:{kind}")
    assert error.value.message.startswith(FAILURES[kind].message)


def test_a_bug_is_internal_with_a_generic_message(served):
    gateway, _ = served
    with CaptionClient(gateway.address) as client, pytest.raises(client_errors.InternalError) as error:
        client.caption(IMAGE, prompt="crash")
    assert "secret" not in error.value.message and "Traceback" not in error.value.message
    assert error.value.message == status_mapping.INTERNAL_MESSAGE


def test_explicit_zero_options_are_sent_and_unset_ones_are_not(served):
    gateway, captioner = served
    with CaptionClient(gateway.address) as client:
        client.caption(IMAGE, options=GenerationOptions(min_new_tokens=0, top_k=0, top_p=0.5), timeout=7)
    job, timeout = captioner.seen[-1]
    assert job.options == {"min_new_tokens": 0, "top_k": 0, "top_p": 0.5}
    assert timeout == pytest.approx(7, abs=1)  # the caller's deadline is passed on


@pytest.mark.parametrize("options, message", [
    (GenerationOptions(num_beams=0), "num_beams=0 is out of range: allowed 1 to 8"),
    (GenerationOptions(num_beams=9), "num_beams=9 is out of range: allowed 1 to 8"),
    (GenerationOptions(num_beams=2, num_return_sequences=3), "num_return_sequences=3 is out of range: allowed 1 to 2"),
    (GenerationOptions(do_sample=True, temperature=0.0), "temperature=0.0 is out of range"),
    (GenerationOptions(seed=-1), "seed=-1 is out of range"),
    (GenerationOptions(max_new_tokens=65), "max_new_tokens=65 is out of range: allowed 1 to 64"),
])
def test_the_gateway_refuses_out_of_range_options_before_calling_triton(served, options, message):
    gateway, captioner = served
    with CaptionClient(gateway.address) as client, pytest.raises(client_errors.InvalidArgumentError) as error:
        client.caption(IMAGE, options=options)
    assert error.value.message.startswith(message)
    assert captioner.seen == []


def test_the_gateway_refuses_what_it_owns(served):
    gateway, _ = served
    with CaptionClient(gateway.address) as client:
        with pytest.raises(client_errors.InvalidArgumentError, match="image is empty"):
            client.caption(b"")
        with pytest.raises(client_errors.ResourceExhaustedError, match="image is 1001 bytes; the limit is 1000"):
            client.caption(b"x" * 1001)
        with pytest.raises(client_errors.ResourceExhaustedError):  # over gRPC's message limit altogether
            client.caption(b"x" * 200_000)
        with pytest.raises(client_errors.InvalidArgumentError, match="prompt is longer than"):
            client.caption(IMAGE, prompt="p" * 5000)
        with pytest.raises(client_errors.InvalidArgumentError, match="could not decode the image .* not a JPEG"):
            client.caption(b"GIF89a but not really")
        with pytest.raises(client_errors.InvalidArgumentError, match="the image is 60000000x1; the limit is 20000"):
            client.caption(_png_header(60_000_000, 1))
        with pytest.raises(client_errors.InvalidArgumentError, match="= 100000000 pixels; the limit is 50000000"):
            client.caption(_png_header(10_000, 10_000))


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds (almost) nothing: a decompression bomb's header."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_calls_waiting_for_the_first_replica_count_against_capacity():
    """A gateway that has not yet read what its replicas serve, none of them ready: the two calls it can hold wait
    (for a replica, up to their deadline), and a third is refused at once instead of waiting beside them."""
    captioner = Captioner(ReplicaPool(("127.0.0.1:1",)), GatewayLimits(max_concurrent_requests=2))
    gateway = BackgroundGateway(captioner)
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            caption = channel.unary_unary("/blip.caption.v1.CaptionService/Caption",
                                          request_serializer=caption_pb2.CaptionRequest.SerializeToString,
                                          response_deserializer=caption_pb2.CaptionResponse.FromString)
            request = caption_pb2.CaptionRequest(image=IMAGE)
            waiting = [caption.future(request, timeout=120) for _ in range(2)]
            deadline = time.monotonic() + 60
            while captioner.in_flight < 2:  # both reached the captioner and wait there
                assert time.monotonic() < deadline and not any(f.done() for f in waiting), [f.done() for f in waiting]
                time.sleep(0.02)
            with pytest.raises(grpc.RpcError) as refused:
                caption(request, timeout=120)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
            assert "at capacity (2 images in flight)" in refused.value.details()
            assert not any(f.done() for f in waiting)
            for future in waiting:
                future.cancel()
    finally:
        gateway.stop()


def test_requests_over_capacity_are_refused_not_queued(served):
    gateway, captioner = served
    outcomes = []

    def slow():
        with CaptionClient(gateway.address) as client:
            outcomes.append(client.caption(IMAGE, prompt="slow"))

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for t in threads:
        t.start()
    with CaptionClient(gateway.address) as client:
        for _ in range(100):
            if len(captioner.seen) == 2:
                break
            threading.Event().wait(0.05)
        with pytest.raises(client_errors.ResourceExhaustedError, match="at capacity"):
            client.caption(IMAGE, prompt="third")
        gateway.call(_release(captioner))
        for t in threads:
            t.join(10)
        assert len(outcomes) == 2
        assert client.caption(IMAGE, prompt="after").text.startswith("after")


def test_a_stream_answers_every_item_and_survives_failed_ones(served):
    gateway, _ = served
    prompts = ["a", "fail:invalid", "b", "crash", "c", "fail:exhausted", "d"]
    with CaptionClient(gateway.address) as client:
        answers = dict(client.caption_stream([IMAGE] * len(prompts), prompt="x"))
        assert sorted(answers) == list(range(len(prompts)))
        stub_answers = {}
        from blip_client.protos.blip.caption.v1 import caption_pb2, caption_pb2_grpc

        stub = caption_pb2_grpc.CaptionServiceStub(client._channel)
        requests = [caption_pb2.CaptionRequest(image=IMAGE, prompt=p, request_id=f"id-{i}")
                    for i, p in enumerate(prompts)]
        for response in stub.CaptionStream(iter(requests)):  # the iterator's end is the client's half-close
            stub_answers[response.request_id] = response
    assert sorted(stub_answers) == sorted(f"id-{i}" for i in range(len(prompts)))
    for i, prompt in enumerate(prompts):
        response = stub_answers[f"id-{i}"]
        if prompt.startswith("fail:"):
            assert response.error.code_name == FAILURES[prompt[5:]].code.name
            assert response.error.code == FAILURES[prompt[5:]].code.value[0]
        elif prompt == "crash":
            assert response.error.code_name == "INTERNAL" and "secret" not in response.error.message
        else:
            assert response.response.captions[0].text.startswith(prompt)
            assert response.response.request_id == f"id-{i}"


class _ServedConfigs(Captioner):
    """A real Captioner whose replica serves the given model configs (as Triton's get_model_config returns them)."""

    def __init__(self, configs, limits):
        super().__init__(ReplicaPool(("127.0.0.1:1",)), limits)
        self.configs = configs

    async def ready(self):
        return True

    async def _config(self, model, deadline=None):
        return self.configs[model]

    async def _serves(self, model, deadline=None):
        return model in self.configs


def test_model_info_is_what_the_served_preprocess_config_and_the_gateways_limits_say():
    """GetModelInfo over gRPC from a real Captioner reading the repository's preprocess config.pbtxt, its parameters
    set here to values no default has, and the gateway's own limits set here too."""
    config = parse_config(template_directory() / "preprocess" / "config.pbtxt")
    served = {"source_checkpoint": "/models/blip-test-7", "precision": "int8", "image_height": "448",
              "image_width": "320", "max_prompt_tokens": "23", "default_num_beams": "5",
              "default_max_new_tokens": "33", "default_min_new_tokens": "2", "default_do_sample": "true",
              "default_temperature": "0.75", "default_top_k": "7", "default_early_stopping": "never",
              "limit_max_num_beams": "6", "limit_max_new_tokens": "41", "limit_max_num_return_sequences": "3",
              "limit_max_no_repeat_ngram_size": "9"}
    for key, value in served.items():
        config.parameters[key].string_value = value
    configs = {"blip_caption": {}, "preprocess": json_format.MessageToDict(config, preserving_proto_field_name=True)}
    limits = GatewayLimits(max_image_bytes=12345, max_image_pixels=678901, max_image_side=2345, max_prompt_bytes=321,
                           max_concurrent_requests=17)
    gateway = BackgroundGateway(_ServedConfigs(configs, limits))
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            info = channel.unary_unary("/blip.caption.v1.CaptionService/GetModelInfo",
                                       request_serializer=caption_pb2.GetModelInfoRequest.SerializeToString,
                                       response_deserializer=caption_pb2.ModelInfo.FromString)(
                caption_pb2.GetModelInfoRequest(), timeout=10)
    finally:
        gateway.stop()
    # one export served as exported: named after its checkpoint's folder
    assert (info.model, info.source_checkpoint, info.precision) == ("blip-test-7", "/models/blip-test-7", "int8")
    assert (info.image_height, info.image_width, info.early_stopping) == (448, 320, "never")
    defaults = info.defaults
    assert (defaults.num_beams, defaults.max_new_tokens, defaults.min_new_tokens, defaults.top_k) == (5, 33, 2, 7)
    assert defaults.do_sample is True and defaults.temperature == pytest.approx(0.75)
    assert not defaults.HasField("seed")  # an unset seed is a random one: no default
    assert info.limits == caption_pb2.Limits(
        max_image_bytes=12345, max_image_pixels=678901, max_image_side=2345, max_prompt_bytes=321,
        max_prompt_tokens=23, max_num_beams=6, max_new_tokens=41, max_num_return_sequences=3,
        max_no_repeat_ngram_size=9, max_concurrent_requests=17)


def test_each_request_is_answered_by_the_model_it_names(served):
    gateway, captioner = served
    with CaptionClient(gateway.address) as client, CaptionClient(gateway.address, model="other") as bound:
        assert [(m.name, m.is_default, m.triton_ensemble, m.source_checkpoint) for m in client.list_models()] == [
            ("blip_caption", True, "blip_caption", "/checkpoint/blip_caption"),
            ("other", False, "other.blip_caption", "/checkpoint/other")]
        default, other = client.caption(IMAGE, prompt="a"), client.caption(IMAGE, prompt="a", model="other")
        assert (default.model, default.text) == ("blip_caption", "a []")
        assert (other.model, other.text) == ("other", "other.blip_caption: a []")
        assert bound.caption(IMAGE, prompt="a").model == "other"  # the client's model
        assert bound.caption(IMAGE, prompt="a", model="blip_caption").model == "blip_caption"  # the call's
        assert {i: r.model for i, r in bound.caption_stream([IMAGE, IMAGE])} == {0: "other", 1: "other"}
        assert client.model_info(model="other").source_checkpoint == "/checkpoint/other"
        assert bound.model_info().model == "other"
        with pytest.raises(client_errors.NotFoundError) as error:
            client.caption(IMAGE, model="missing")
        assert "missing" in error.value.message and "other" in error.value.message
        with pytest.raises(client_errors.NotFoundError):
            client.model_info(model="missing")
        (_, item), = client.caption_stream([IMAGE], model="missing")
        assert isinstance(item, client_errors.NotFoundError)
    assert len(captioner.seen) == 6  # nothing was sent for the unknown model



def test_health_follows_readiness_and_reflection_lists_the_services(served):
    gateway, _ = served
    with grpc.insecure_channel(gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def check():
            return health.Check(health_pb2.HealthCheckRequest(service="blip.caption.v1.CaptionService")).status

        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        gateway.call(gateway.gateway.set_serving(True))
        assert check() == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answer.list_services_response.service}
        assert {"blip.caption.v1.CaptionService", "grpc.health.v1.Health"} <= names


def test_api_keys_are_required_when_configured():
    gateway = BackgroundGateway(FakeCaptioner(), api_keys=["s3cret", "other"])
    try:
        with CaptionClient(gateway.address) as anonymous, pytest.raises(client_errors.UnauthenticatedError):
            anonymous.caption(IMAGE)
        with (
            CaptionClient(gateway.address, api_key="wrong") as wrong,
            pytest.raises(client_errors.UnauthenticatedError),
        ):
            list(wrong.caption_stream([IMAGE]))
        with CaptionClient(gateway.address, api_key="other") as right:
            assert right.caption(IMAGE, prompt="ok").text.startswith("ok")
        with grpc.insecure_channel(gateway.address) as channel:  # health stays open for load balancers
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    finally:
        gateway.stop()


def test_a_cancellation_after_the_callers_deadline_is_deadline_exceeded():
    class CancellingTriton:  # the decoder noticed the passed deadline before the gateway's own timer fired
        async def infer(self, *args, parameters=None, **kwargs):
            await asyncio.sleep(0.05)
            raise InferenceServerException("the request was cancelled or its deadline passed", "StatusCode.CANCELLED")

    pool = ReplicaPool(("127.0.0.1:1",))
    pool.replicas["127.0.0.1:1"] = Replica("127.0.0.1:1", CancellingTriton(), up=True)
    captioner = Captioner(pool, GatewayLimits())
    job = CaptionJob(IMAGE, "", {}, "")
    with pytest.raises(status_mapping.DeadlineExceeded):
        asyncio.run(captioner._infer(job, deadline=time.monotonic() + 0.01))
    with pytest.raises(status_mapping.Cancelled):
        asyncio.run(captioner._infer(job, deadline=time.monotonic() + 10))


@pytest.mark.parametrize("remaining, counted", [
    (0.0, "DEADLINE_EXCEEDED"),
    (0.0012, "DEADLINE_EXCEEDED"),  # the client gave up at its deadline, a moment before the gateway's (seen)
    (status_mapping.DEADLINE_SKEW + 0.001, "CANCELLED"),
    (5.0, "CANCELLED"),
    (None, "CANCELLED"),  # a call without a deadline
])
def test_a_call_cancelled_at_its_deadline_counts_as_deadline_exceeded(remaining, counted):
    class Context:
        def time_remaining(self):
            return remaining

    assert status_mapping._interrupted(asyncio.CancelledError(), Context()) == counted


def _held_call(gateway, captioner, finished) -> threading.Thread:
    """A caption call the fake captioner holds (prompt "slow") until released, started in a thread; returns once
    the captioner has it. `finished(result)` runs when the call returns."""

    def call():
        with CaptionClient(gateway.address) as client:
            finished(client.caption(IMAGE, prompt="slow"))

    thread = threading.Thread(target=call)
    thread.start()
    for _ in range(100):
        if captioner.seen:
            break
        threading.Event().wait(0.05)
    return thread


def _sample(gateway, name, **labels):
    return gateway.gateway.metrics.registry.get_sample_value(name, labels) or 0.0


def test_metrics_count_calls_by_method_and_code_and_are_served_over_http(served):
    import urllib.request

    gateway, captioner = served
    with CaptionClient(gateway.address, retry=None) as client:
        client.caption(IMAGE, prompt="ok")
        for prompt, error in [("fail:invalid", client_errors.InvalidArgumentError),
                              ("fail:unavailable", client_errors.UnavailableError),
                              ("crash", client_errors.InternalError)]:
            with pytest.raises(error):
                client.caption(IMAGE, prompt=prompt)
        dict(client.caption_stream([IMAGE, IMAGE, b""], prompt="s"))
        client.model_info()
        client.caption(IMAGE, prompt="ok", model="other")
        client.list_models()
        with pytest.raises(client_errors.NotFoundError):
            client.caption(IMAGE, model="missing")
        with grpc.insecure_channel(gateway.address) as channel:  # health checks are not counted
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    total, default = "blip_gateway_requests_total", "blip_caption"
    assert _sample(gateway, total, method="Caption", code="OK", model=default) == 1
    assert _sample(gateway, total, method="Caption", code="OK", model="other") == 1
    for code in ("INVALID_ARGUMENT", "UNAVAILABLE", "INTERNAL"):
        assert _sample(gateway, total, method="Caption", code=code, model=default) == 1
    assert _sample(gateway, total, method="Caption", code="NOT_FOUND", model="unknown") == 1  # not the name sent
    assert _sample(gateway, total, method="CaptionStream", code="OK", model="") == 1
    assert _sample(gateway, total, method="CaptionStream.item", code="OK", model=default) == 2
    assert _sample(gateway, total, method="CaptionStream.item", code="INVALID_ARGUMENT", model=default) == 1
    assert _sample(gateway, total, method="GetModelInfo", code="OK", model=default) == 1
    assert _sample(gateway, total, method="ListModels", code="OK", model="") == 1
    assert _sample(gateway, "blip_gateway_request_duration_seconds_count", method="Caption", model=default) == 4
    assert _sample(gateway, "blip_gateway_in_flight_requests") == 0
    assert not [m for m in gateway.gateway.metrics.registry.collect() for s in m.samples
                if s.labels.get("method", "").startswith("Check")]

    port = gateway.gateway.metrics.serve("127.0.0.1", 0)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'blip_gateway_requests_total{code="OK",method="Caption",model="blip_caption"} 1.0' in text
    assert "blip_gateway_request_duration_seconds_bucket" in text


def test_metrics_show_calls_in_flight_and_refusals(served):
    gateway, captioner = served
    done = threading.Event()
    thread = _held_call(gateway, captioner, lambda _: done.set())
    assert _sample(gateway, "blip_gateway_in_flight_requests") == 1
    gateway.call(_release(captioner))
    assert done.wait(10)
    thread.join(10)
    assert _sample(gateway, "blip_gateway_in_flight_requests") == 0

    keyed = BackgroundGateway(FakeCaptioner(), api_keys=["k"])
    try:
        with CaptionClient(keyed.address) as anonymous, pytest.raises(client_errors.UnauthenticatedError):
            anonymous.caption(IMAGE)
        assert _sample(keyed, "blip_gateway_requests_total", method="Caption", code="UNAUTHENTICATED", model="") == 1
    finally:
        keyed.stop()


def _raw(channel, method: str, stream: bool = False):
    factory = channel.stream_stream if stream else channel.unary_unary
    return factory(f"/blip.caption.v1.CaptionService/{method}", request_serializer=None, response_deserializer=None)


MALFORMED = {
    "not_protobuf": (b"\xff\xff\xff\xff", "is not a valid blip.caption.v1.CaptionRequest message"),
    "prompt_not_utf8": (b"\x0a\x01x\x12\x02\xc3\x28", "prompt is not valid UTF-8"),
    "request_id_not_utf8": (b"\x0a\x01x\x22\x02\xc3\x28", "request_id is not valid UTF-8"),
    "options_not_a_message": (b"\x0a\x01x\x1a\x02\xff\xff", "options is not a valid blip.caption.v1.GenerationOptions"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_request_is_invalid_argument_never_unknown(served, name):
    gateway, captioner = served
    data, message = MALFORMED[name]
    with grpc.insecure_channel(gateway.address) as channel, pytest.raises(grpc.RpcError) as error:
        _raw(channel, "Caption")(data, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    assert captioner.seen == []


def test_a_stream_answers_malformed_and_oversized_items_and_goes_on(served):
    from blip_client.protos.blip.caption.v1 import caption_pb2

    gateway, _ = served

    def good(i):
        return caption_pb2.CaptionRequest(image=IMAGE, prompt=f"p{i}", request_id=f"good-{i}").SerializeToString()

    oversized = caption_pb2.CaptionRequest(image=b"x" * 5000, request_id="big").SerializeToString()  # limit: 1000
    items = [good(0), MALFORMED["not_protobuf"][0], good(1), MALFORMED["prompt_not_utf8"][0], oversized, good(2)]
    with grpc.insecure_channel(gateway.address) as channel:
        answers = [caption_pb2.CaptionStreamResponse.FromString(r)
                   for r in _raw(channel, "CaptionStream", stream=True)(iter(items), timeout=30)]
    assert len(answers) == len(items)
    by_id = {}
    for answer in answers:
        by_id.setdefault(answer.request_id, []).append(answer)
    assert [by_id[f"good-{i}"][0].response.captions[0].text.startswith(f"p{i}") for i in range(3)] == [True] * 3
    assert by_id["big"][0].error.code_name == "RESOURCE_EXHAUSTED"
    malformed = [a.error for a in by_id[""]]
    assert sorted(e.code_name for e in malformed) == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    assert {m for e in malformed for m in ("CaptionRequest message", "UTF-8") if m in e.message} == {
        "CaptionRequest message", "UTF-8"}


def test_only_a_message_far_over_the_image_limit_ends_a_stream(served):
    from blip_client.protos.blip.caption.v1 import caption_pb2

    gateway, captioner = served
    huge = caption_pb2.CaptionRequest(image=b"x" * (captioner.limits.max_message_bytes + 1)).SerializeToString()
    with (
        grpc.insecure_channel(gateway.address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        list(_raw(channel, "CaptionStream", stream=True)(iter([huge]), timeout=30))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_sdk_retries_unavailable_within_its_policy(served):
    from blip_client import RetryPolicy, UnavailableError

    gateway, captioner = served
    quick = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)
    with CaptionClient(gateway.address, retry=quick) as client:
        assert client.caption(IMAGE, prompt="flaky:3").text.startswith("flaky:3")
    total = "blip_gateway_requests_total"
    assert _sample(gateway, total, method="Caption", code="UNAVAILABLE", model="blip_caption") == 3
    captioner.flaky = 0
    with (
        CaptionClient(gateway.address, retry=RetryPolicy(max_attempts=2, initial_backoff=0.01)) as client,
        pytest.raises(UnavailableError),
    ):
        client.caption(IMAGE, prompt="flaky:3")
    captioner.flaky = 0
    with CaptionClient(gateway.address, retry=None) as client, pytest.raises(UnavailableError):
        client.caption(IMAGE, prompt="flaky:1")
    assert _sample(gateway, total, method="Caption", code="UNAVAILABLE", model="blip_caption") == 6
    with pytest.raises(ValueError, match="max_attempts must be 1 to 5"):
        RetryPolicy(max_attempts=6)


def test_the_sdk_retries_a_call_the_server_cancelled_but_never_one_its_caller_cancelled(served):
    """A server that begins to stop cancels the calls it has not started (gRPC's server): the call never ran,
    so it is sent again, within the policy. A call its caller cancels is never sent again (gRPC's rule)."""
    import asyncio

    from blip_client import AsyncCaptionClient, CancelledError, RetryPolicy

    gateway, captioner = served
    quick = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
    with CaptionClient(gateway.address, retry=quick) as client:
        assert client.caption(IMAGE, prompt="cancelled:2").text.startswith("cancelled:2")
    total = "blip_gateway_requests_total"
    assert _sample(gateway, total, method="Caption", code="CANCELLED", model="blip_caption") == 2
    captioner.cancelled = 0
    with CaptionClient(gateway.address, retry=None) as client, pytest.raises(CancelledError):
        client.caption(IMAGE, prompt="cancelled:1")

    async def cancel_while_held() -> int:
        async with AsyncCaptionClient(gateway.address, retry=quick) as client:
            call = asyncio.ensure_future(client.caption(IMAGE, prompt="slow"))
            while not any(job.prompt == "slow" for job, _ in captioner.seen):
                await asyncio.sleep(0.01)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            # The SDK retries from within the call, so a retry would have been sent before the call ended; what
            # is waited for is the gateway ending the cancelled call (every image out of flight), then counted.
            for _ in range(500):
                if captioner.in_flight == 0:
                    break
                await asyncio.sleep(0.01)
            assert captioner.in_flight == 0
            return sum(job.prompt == "slow" for job, _ in captioner.seen)

    assert asyncio.run(cancel_while_held()) == 1


def test_large_images_wait_for_room_in_the_bytes_in_flight_budget():
    captioner = FakeCaptioner(GatewayLimits(max_image_bytes_in_flight=len(IMAGE) + 10))
    gateway = BackgroundGateway(captioner)
    try:
        results = []
        first = _held_call(gateway, captioner, lambda result: results.append(result.text))
        assert captioner.bytes_in_flight == len(IMAGE)
        with CaptionClient(gateway.address, retry=None) as client:
            with pytest.raises(client_errors.DeadlineExceededError):  # no room: it waits, then its deadline passes
                client.caption(IMAGE, prompt="second", timeout=0.5)
            waiting = threading.Thread(target=lambda: results.append(client.caption(IMAGE, prompt="third").text))
            waiting.start()
            for _ in range(500):  # until the third is in the gateway (in flight beside the first), waiting for room
                if captioner.in_flight == 2:
                    break
                threading.Event().wait(0.01)
            assert captioner.in_flight == 2
            assert len(captioner.seen) == 1  # the third waits: not sent to Triton
            gateway.call(_release(captioner))
            first.join(10)
            waiting.join(10)
        assert sorted(r.split()[0] for r in results) == ["slow", "third"]
        assert captioner.bytes_in_flight == 0
    finally:
        gateway.call(_release(captioner))
        gateway.stop()
