"""The ensemble under concurrent load: batched requests with mixed options, bad neighbours, multi-item requests."""

from __future__ import annotations

import threading
import time

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from blip_bench.processes import decoder_counters
from support import images, reference
from support.triton_requests import caption_inputs, captions

KINDS = images.kinds(seed=31)
GOOD = [
    ("jpeg", None, dict()),
    ("png", "a picture of", dict(num_beams=1, min_new_tokens=0)),
    ("webp", None, dict(num_beams=4, num_return_sequences=2, length_penalty=0.5)),
    ("jpeg_exif_rotate_270", "a photo of", dict(num_beams=2, repetition_penalty=1.3, max_new_tokens=8)),
    ("bmp", None, dict(num_beams=1, no_repeat_ngram_size=1, min_new_tokens=3)),
    ("tiff", "two", dict(num_beams=3, max_new_tokens=25, min_new_tokens=0)),
]
BAD = [
    (b"\x89PNG\r\n\x1a\n this is not really a png", None, dict(), "could not decode the image"),
    (KINDS["jpeg"], None, dict(num_beams=3, num_return_sequences=5),
     "num_return_sequences=5 is out of range: allowed 1 to 3"),
    (KINDS["png"], None, dict(top_p=0.0, do_sample=True), "top_p=0.0 is out of range"),
]


def _arrivals(client) -> int:
    """Requests handed to the decoder: its execute() queues each for the decode loop and returns."""
    stats = client.get_inference_statistics("text_decoder", as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0))


def test_concurrent_mixed_requests_are_batched_and_bad_ones_fail_alone(servers):
    server = servers("standard")
    client = server.client()
    requests = [(KINDS[k], p, o, None) for k, p, o in GOOD] + BAD
    requests = requests * 2
    results: list = [None] * len(requests)
    # The decoder's own counters: Triton's statistics count execute() calls, which only queue requests.
    before = decoder_counters(server.triton.options.metrics_port)
    barrier = threading.Barrier(len(requests))

    def send(i):
        image, prompt, options, _ = requests[i]
        barrier.wait()
        try:
            results[i] = captions(client.infer("blip_caption", caption_inputs(image, prompt, **options)))[0]
        except InferenceServerException as exc:
            results[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    for (image, prompt, options, error), result in zip(requests, results, strict=True):
        if error is None:
            assert not isinstance(result, Exception), result
            expected = reference.caption(server.checkpoint, image, prompt, **options)
            assert result[0] == expected[0]
            assert result[1] == pytest.approx(expected[1], abs=1e-4)
        else:
            assert isinstance(result, InferenceServerException)
            assert result.status() == "StatusCode.INVALID_ARGUMENT"
            assert error in result.message()
    # Decoded one at a time, no step would have more rows than the widest request's (4 beams); the loop flushes
    # its counters when it falls idle, which it has once every answer is in.
    after = decoder_counters(server.triton.options.metrics_port)
    rows, steps = after["rows"] - before["rows"], after["steps"] - before["steps"]
    widest = max(max(o.get("num_beams", 3), o.get("num_return_sequences", 1)) for _, _, o in GOOD)
    assert steps > 0 and rows / steps > widest, f"{rows / max(steps, 1):.1f} rows a step: nothing was decoded together"


def test_a_request_carries_one_image_and_more_are_refused_clearly(servers):
    server = servers("unusual")
    answer = server.client().infer("blip_caption", caption_inputs(KINDS["gif_animated"], "sky", num_beams=3,
                                                                  num_return_sequences=2))
    expected = reference.caption(server.checkpoint, KINDS["gif_animated"], "sky", num_beams=3, num_return_sequences=2)
    assert captions(answer)[0][0] == expected[0]
    with pytest.raises(InferenceServerException) as error:
        server.client().infer("blip_caption", caption_inputs([KINDS["jpeg"], KINDS["png"]]))
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT" and "batch-size must be <= 1" in error.value.message()


# Each decode step of the Triton below sleeps this long first (text_decoder's test-only knob): the long requests'
# 60 steps last at least 6 s, far longer than the short one's way through preprocess and the encoder on any machine,
# so that it joins them while they decode however fast or busy the machine is (on the shared server a busy machine
# let two of the long ones finish first: their steps ran while the short one was still being encoded).
SLOW_STEP = 0.1


def test_a_short_caption_does_not_wait_behind_long_ones(repositories, start_triton):
    """In-flight batching: a short request that arrives while long ones decode joins them and leaves first."""
    triton = start_triton(repositories["standard"], environment={"BLIP_TEST_STEP_DELAY_SECONDS": str(SLOW_STEP)})
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton.options.grpc_port}")
    finished, threads = [], []

    def send(name, **options):
        try:
            captions(client.infer("blip_caption", caption_inputs(KINDS["jpeg"], **options)))
            finished.append(name)
        except InferenceServerException as exc:
            finished.append(exc)

    before = _arrivals(client)
    for i in range(4):  # as long as the standard test model allows (64 positions)
        threads.append(threading.Thread(target=send, args=(f"long {i}",),
                                        kwargs=dict(num_beams=8, min_new_tokens=60, max_new_tokens=60)))
        threads[-1].start()
    deadline = time.monotonic() + 60
    while _arrivals(client) < before + 4:  # the long ones are in the decode loop
        assert time.monotonic() < deadline and not finished, finished
        time.sleep(0.005)
    threads.append(threading.Thread(target=send, args=("short",), kwargs=dict(num_beams=1, max_new_tokens=5,
                                                                             min_new_tokens=0)))
    threads[-1].start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(finished) == 5 and finished[0] == "short", finished


def test_seeded_sampling_is_reproducible_through_the_server(servers):
    client = servers("standard").client()

    def ask(seed):
        return captions(client.infer("blip_caption", caption_inputs(
            KINDS["jpeg"], do_sample=True, num_beams=1, num_return_sequences=3, seed=seed, temperature=1.3)))[0][0]

    first = ask(123)
    assert ask(123) == first and len(first) == 3
    assert any(ask(seed) != first for seed in (124, 125, 126))
    greedy = captions(client.infer("blip_caption", caption_inputs(KINDS["jpeg"], num_beams=1)))[0][0]
    top_k_1 = captions(client.infer("blip_caption", caption_inputs(KINDS["jpeg"], num_beams=1, do_sample=True,
                                                                   top_k=1, seed=9)))[0][0]
    assert top_k_1 == greedy


@pytest.mark.parametrize(
    "image, options, message",
    [
        (b"", dict(), "the image is empty"),
        (KINDS["jpeg"], dict(num_beams=0), "num_beams=0 is out of range: allowed 1 to 8"),
        (KINDS["jpeg"], dict(max_new_tokens=1000), "max_new_tokens=1000 is out of range"),
        (KINDS["jpeg"], dict(temperature=-1.0, do_sample=True), "temperature=-1.0 is out of range"),
    ],
    ids=["empty_image", "zero_beams", "too_many_tokens", "negative_temperature"],
)
def test_bad_requests_get_invalid_argument_with_a_reason(servers, image, options, message):
    with pytest.raises(InferenceServerException) as error:
        servers("standard").client().infer("blip_caption", caption_inputs(image, **options))
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in error.value.message()
