"""Property-based fuzzing of what takes untrusted bytes: image preprocessing (random bytes, mutated valid files,
forged headers) and request parsing (the gateway's, and the decoder's options). Nothing may escape but the clean,
per-request error each layer defines.

`HYPOTHESIS_PROFILE=fuzz python -m pytest tests/unit/test_fuzz.py` runs the long fuzz (20,000 examples each).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib

import numpy as np
from generation_options import GenerationOptions, OptionError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from image_preprocessing import ImageError, ImageLimits, ImageProcessorConfig, preprocess

from blip_client.protos.blip.caption.v1 import caption_pb2
from blip_server.gateway.messages import CaptionJob
from blip_server.gateway.status_mapping import InvalidArgument
from blip_server.shared.image_header import ImageError as HeaderError
from blip_server.shared.image_header import ImageLimits as HeaderLimits
from blip_server.shared.image_header import read_header
from support import images

settings.register_profile("ci", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=20_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CONFIG = ImageProcessorConfig(64, 64, 3, True, True, True, 1 / 255, True, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
LIMITS = ImageLimits(max_pixels=4_000_000, max_side=8_000)  # small: forged headers must not cost gigabytes here
SEEDS = [images.encode(images.rgb(48, 32, seed=1), fmt, **params) for fmt, params in [
    ("PNG", {}), ("JPEG", {"quality": 80}), ("JPEG", {"progressive": True}), ("GIF", {}), ("WEBP", {}),
    ("BMP", {}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}),
]] + [images.with_orientation(images.rgb(40, 30, seed=2), 6)]


def _preprocess_cleanly(data: bytes) -> None:
    """Pixels of the right shape and finite, or an ImageError: nothing else."""
    try:
        pixels = preprocess(data, CONFIG, LIMITS)
    except ImageError:
        return
    assert pixels.shape == (3, 64, 64) and pixels.dtype == np.float32 and np.isfinite(pixels).all()


@given(st.binary(max_size=4096))
def test_random_bytes_are_refused_cleanly(data):
    _preprocess_cleanly(data)


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at: at + draw(st.integers(1, 64))]
        else:
            other = draw(st.sampled_from(SEEDS))
            data[at:] = other[draw(st.integers(0, len(other) - 1)):]
    return bytes(data)


@given(mutated())
def test_mutated_valid_files_are_captioned_or_refused_cleanly(data):
    _preprocess_cleanly(data)


def _png(width: int, height: int, bit_depth: int, color_type: int, body: bytes, compressed: bool) -> bytes:
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(body) if compressed else body)
            + chunk(b"IEND", b""))


@given(st.integers(0, 2**31), st.integers(0, 2**31), st.sampled_from([1, 2, 4, 8, 16]),
       st.sampled_from([0, 2, 3, 4, 6, 7]), st.binary(max_size=2048), st.booleans())
def test_forged_png_headers_never_decode_past_the_limits(width, height, bit_depth, color_type, body, compressed):
    data = _png(width, height, bit_depth, color_type, body, compressed)
    try:
        header = read_header(data, HeaderLimits(LIMITS.max_pixels, LIMITS.max_side))
    except HeaderError:
        header = None
    if header is not None:
        assert header.pixels <= LIMITS.max_pixels and max(header.width, header.height) <= LIMITS.max_side
    _preprocess_cleanly(data)


@given(st.binary(max_size=512))
def test_random_request_bytes_are_a_job_or_invalid_argument(data):
    try:
        job = CaptionJob.from_bytes(data)
    except InvalidArgument as error:
        assert error.message and "Traceback" not in error.message
        return
    assert isinstance(job.prompt, str) and isinstance(job.request_id, str) and isinstance(job.image, bytes)


VALID_REQUEST = caption_pb2.CaptionRequest(image=b"\x89PNG....", prompt="a picture of", request_id="r-1",
                                           options=caption_pb2.GenerationOptions(num_beams=3, top_p=0.9, seed=7))


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_requests_are_a_job_or_invalid_argument(edits):
    data = bytearray(VALID_REQUEST.SerializeToString())
    for at, value in edits:
        data[at % len(data)] = value
    with contextlib.suppress(InvalidArgument):
        CaptionJob.from_bytes(bytes(data))


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                                            children, max_size=3),
                           max_leaves=8)


@given(st.one_of(
    st.binary(max_size=256),
    st.dictionaries(st.sampled_from(GenerationOptions.names() + ["bogus"]), json_values, max_size=12).map(
        lambda d: json.dumps(d, allow_nan=True).encode()),
))
def test_the_decoders_options_are_parsed_or_refused_with_option_error(data):
    with contextlib.suppress(OptionError):
        GenerationOptions.from_json(data)
