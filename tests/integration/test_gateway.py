"""The typed API end to end: blip-serve (gateway + real Triton) called with the SDK, raw stubs, generated code."""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blip_bench.processes import decoder_counters
from blip_client import (
    AsyncCaptionClient,
    CaptionClient,
    DeadlineExceededError,
    GenerationOptions,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from support import images, reference
from support.serve import ServeProcess

ROOT = Path(__file__).resolve().parents[2]
KINDS = images.kinds(seed=51)
HEAVY = GenerationOptions(num_beams=8, max_new_tokens=60, min_new_tokens=60)


def _expected(service, kind, prompt=None, **options):
    return reference.caption(service.checkpoint, KINDS[kind], prompt, **options)


def test_unary_captions_equal_transformers(service):
    with CaptionClient(service.address) as client:
        for kind, prompt, options in [("jpeg", "", {}),
                                      ("png_rgba", "a picture of", dict(num_beams=5, num_return_sequences=3)),
                                      ("jpeg_exif_rotate_90", "", dict(num_beams=1, min_new_tokens=0))]:
            result = client.caption(KINDS[kind], prompt=prompt, options=GenerationOptions(**options), request_id=kind)
            texts, scores = _expected(service, kind, prompt or None, **options)
            assert [c.text for c in result.captions] == texts
            assert [c.score for c in result.captions] == pytest.approx(scores, abs=1e-4)
            assert (result.request_id, result.model) == (kind, "standard")  # a bare --model: its folder's name


def test_streaming_answers_each_item_with_its_id_and_survives_bad_items(service):
    items = [KINDS["jpeg"], b"not an image", KINDS["png"], KINDS["webp"], b"", KINDS["bmp"]]
    with CaptionClient(service.address) as client:
        answers = dict(client.caption_stream(items, options=GenerationOptions(num_beams=2)))
    assert sorted(answers) == list(range(len(items)))
    assert isinstance(answers[1], InvalidArgumentError) and "could not decode" in answers[1].message
    assert isinstance(answers[4], InvalidArgumentError) and "empty" in answers[4].message
    for index, kind in [(0, "jpeg"), (2, "png"), (3, "webp"), (5, "bmp")]:
        assert answers[index].text == _expected(service, kind, num_beams=2)[0][0]


def test_model_info_describes_what_is_served(service, checkpoints):
    with CaptionClient(service.address) as client:
        info = client.model_info()
    assert info.model == "standard" and info.precision == "fp32"  # named after the folder of --model
    assert info.source_checkpoint == str(Path(service.checkpoint).resolve())
    assert (info.image_height, info.image_width) == (384, 384)
    assert (info.defaults.num_beams, info.defaults.max_new_tokens, info.defaults.min_new_tokens) == (3, 20, 5)
    assert info.defaults.seed is None
    assert (info.limits.max_num_beams, info.limits.max_new_tokens, info.limits.max_prompt_tokens) == (8, 64, 64)


def test_out_of_range_options_name_the_field_and_range(service):
    with CaptionClient(service.address) as client:
        for options, message in [(GenerationOptions(num_beams=0), "num_beams=0 is out of range: allowed 1 to 8"),
                                 (GenerationOptions(top_p=1.5, do_sample=True),
                                  "top_p=1.5 is out of range: allowed greater than 0 and at most 1"),
                                 (GenerationOptions(num_beams=2, num_return_sequences=3),
                                  "num_return_sequences=3 is out of range: allowed 1 to 2")]:
            with pytest.raises(InvalidArgumentError) as error:
                client.caption(KINDS["jpeg"], options=options)
            assert error.value.message == message


def test_oversized_images_are_resource_exhausted(service):
    with CaptionClient(service.address) as client, pytest.raises(ResourceExhaustedError):
        client.caption(b"\xff" * (21 * 1024 * 1024))


STOPPED = "text_decoder: stopped decoding a request"
# The slowed decoder: each step sleeps SLOW_STEP s first (text_decoder's test-only BLIP_TEST_STEP_DELAY_SECONDS), so
# HEAVY's 60 steps take over a minute on any machine; DEADLINE passes during them, far after what comes before the
# decoding (preprocessing and encoding an image with the test model: milliseconds, a second under heavy load).
SLOW_STEP, DEADLINE = 1.0, 5.0


@pytest.fixture(scope="module")
def slow_service(repositories, tmp_path_factory):
    """blip-serve (no response cache) whose decoder sleeps SLOW_STEP s before every step."""
    with pytest.MonkeyPatch.context() as patch:  # blip-serve passes its environment on to Triton and the stubs
        patch.setenv("BLIP_TEST_STEP_DELAY_SECONDS", str(SLOW_STEP))
        serve = ServeProcess("--model", str(repositories["standard"]), "--response-cache-mb", "0",
                             cache=tmp_path_factory.mktemp("cache"))
    serve.wait_ready()
    yield serve
    code, log = serve.stop()
    assert code == 0, log


def test_a_passed_deadline_stops_the_decoder(slow_service):
    """A deadline that passes while the (slowed) decoder works: the caller gets DEADLINE_EXCEEDED, and the decoder,
    which got the deadline with the request, stops decoding it at its next step: its log says so, and its step
    counter (Triton's metrics port) shows it decoded some steps, not all of them."""
    steps_before = decoder_counters(slow_service.ports["metrics"])["steps"]
    stopped = slow_service.triton_log_text().count(STOPPED)
    with CaptionClient(slow_service.address, retry=None) as client, pytest.raises(DeadlineExceededError):
        client.caption(KINDS["jpeg"], options=HEAVY, timeout=DEADLINE)
    waited = time.monotonic()
    while slow_service.triton_log_text().count(STOPPED) == stopped:  # the decoder notices at its next step
        assert time.monotonic() - waited < 120, f"the decoder went on decoding:\n{slow_service.triton_log_tail()}"
        time.sleep(0.1)
    assert slow_service.triton_log_text().count(STOPPED) == stopped + 1
    steps = decoder_counters(slow_service.ports["metrics"])["steps"] - steps_before
    assert 0 < steps < HEAVY.max_new_tokens, (steps, slow_service.triton_log_tail())


def test_cancelled_calls_end_and_leave_the_server_healthy(service):
    async def scenario():
        async with AsyncCaptionClient(service.address) as client:
            call = asyncio.create_task(client.caption(KINDS["jpeg"], options=HEAVY))
            await asyncio.sleep(0.05)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            return await client.caption(KINDS["png"])

    result = asyncio.run(scenario())
    assert result.text == _expected(service, "png")[0][0]


def test_concurrent_clients_all_get_correct_captions(service):
    kinds = ["jpeg", "png", "webp", "tiff", "gif_animated", "jpeg_grayscale"]
    expected = {k: _expected(service, k)[0][0] for k in kinds}
    failures = []

    def client_session(offset):
        try:
            with CaptionClient(service.address) as client:
                rotated = kinds[offset:] + kinds[:offset]
                results = client.caption_many([KINDS[k] for k in rotated], concurrency=3)
                assert [r.text for r in results] == [expected[k] for k in rotated]
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=client_session, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not failures, failures


def test_a_client_generated_from_the_proto_alone_can_call(service, tmp_path):
    from grpc_tools import protoc

    proto = ROOT / "protos" / "blip" / "caption" / "v1" / "caption.proto"
    args = ["protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(proto)]
    assert protoc.main(args) == 0
    sys.path.insert(0, str(tmp_path))
    try:
        for name in [m for m in sys.modules if m == "blip" or m.startswith("blip.")]:
            del sys.modules[name]
        messages = importlib.import_module("blip.caption.v1.caption_pb2")
        stubs = importlib.import_module("blip.caption.v1.caption_pb2_grpc")
        with grpc.insecure_channel(service.address) as channel:
            stub = stubs.CaptionServiceStub(channel)
            response = stub.Caption(messages.CaptionRequest(image=KINDS["jpeg"], request_id="independent"))
            info = stub.GetModelInfo(messages.GetModelInfoRequest())
    finally:
        sys.path.remove(str(tmp_path))
    assert response.captions[0].text == _expected(service, "jpeg")[0][0] and response.request_id == "independent"
    assert info.model == "standard"


def test_the_cli_prints_json_lines_in_order_and_fails_when_an_image_fails(service, tmp_path):
    paths = []
    for kind in ["jpeg", "png", "webp"]:
        paths.append(tmp_path / f"{kind}.img")
        paths[-1].write_bytes(KINDS[kind])
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    paths.insert(1, tmp_path / "broken.jpg")
    command = [str(Path(sys.executable).parent / "blip-caption"), "--server", service.address, "--json",
               "--num-beams", "2", *map(str, paths), str(tmp_path / "missing.jpg")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    import json

    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(p) for p in paths] + [str(tmp_path / "missing.jpg")]
    assert lines[1]["error"]["code"] == "INVALID_ARGUMENT" and "could not decode" in lines[1]["error"]["message"]
    assert lines[4]["error"]["code"] == "NOT_FOUND"
    for line, kind in zip([lines[0], lines[2], lines[3]], ["jpeg", "png", "webp"], strict=True):
        texts, scores = _expected(service, kind, num_beams=2)
        assert line["captions"][0]["text"] == texts[0]
        assert line["captions"][0]["score"] == pytest.approx(scores[0], abs=1e-4)
    assert "image" in run.stderr and "%" in run.stderr  # the progress bar
    ok = subprocess.run(command[:1] + ["--server", service.address, "--prompt", "a picture of", str(paths[0])],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    expected = _expected(service, "jpeg", "a picture of")[0][0]
    assert ok.stdout.startswith(f"{paths[0]}: {expected}  (score ")


def test_health_api_keys_and_calls_waiting_while_triton_restarts(repositories, checkpoints, tmp_path):
    serve = ServeProcess("--model", str(repositories["standard"]), "--api-keys", "k1,k2", cache=tmp_path)
    try:
        serve.wait_ready()
        channel = grpc.insecure_channel(serve.address)
        health = health_pb2_grpc.HealthStub(channel)

        def status():
            return health.Check(health_pb2.HealthCheckRequest(service="blip.caption.v1.CaptionService")).status

        assert status() == health_pb2.HealthCheckResponse.SERVING
        with CaptionClient(serve.address) as anonymous, pytest.raises(UnauthenticatedError):
            anonymous.caption(KINDS["jpeg"])
        with CaptionClient(serve.address, api_key="k2") as client:
            assert client.caption(KINDS["jpeg"]).text
            (triton_pid,) = serve.children()
            subprocess.run(["kill", "-9", str(triton_pid)], check=True)
            deadline = time.monotonic() + 30
            while status() != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
                time.sleep(0.1)
            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
            # The call waits for the restarted Triton (the gateway's wait-for-ready), within its deadline.
            assert client.caption(KINDS["jpeg"]).text == (
                reference.caption(str(checkpoints["standard"]), KINDS["jpeg"])[0][0])
            deadline = time.monotonic() + 120
            while status() != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
                time.sleep(0.2)
            assert status() == health_pb2.HealthCheckResponse.SERVING
            assert client.caption(KINDS["png"]).text == (
                reference.caption(str(checkpoints["standard"]), KINDS["png"])[0][0])
        assert "restarting Triton" in serve.log()
        channel.close()
    finally:
        code, log = serve.stop()
    assert code == 0, log
