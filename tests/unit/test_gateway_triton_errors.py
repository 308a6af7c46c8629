"""Triton's failures as the gateway's callers see them: each status its code, a dead Python-backend stub
UNAVAILABLE (retried elsewhere: tests/unit/test_replica_pool.py), anything else INTERNAL with a generic message."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from blip_server.gateway import status_mapping

PREFIX = "in ensemble 'blip_caption', "
# As Triton 2.51 words it once a stub was killed (measured: see status_mapping.stub_died).
DEAD_STUB = f"{PREFIX}Stub process 'vision_encoder_0_0' is not healthy."


@pytest.mark.parametrize("status, kind", [
    ("StatusCode.INVALID_ARGUMENT", status_mapping.InvalidArgument),
    ("StatusCode.UNAVAILABLE", status_mapping.Unavailable),
    ("StatusCode.DEADLINE_EXCEEDED", status_mapping.DeadlineExceeded),
    ("StatusCode.CANCELLED", status_mapping.Cancelled),
    ("StatusCode.RESOURCE_EXHAUSTED", status_mapping.ResourceExhausted),
])
def test_triton_statuses_become_their_errors_without_the_ensembles_prefix(status, kind):
    error = status_mapping.from_triton(InferenceServerException(f"{PREFIX}what went wrong", status))
    assert type(error) is kind and "what went wrong" in error.message and PREFIX not in error.message
    other = "in ensemble 'large.blip_caption', "  # another served model's ensemble (served_models)
    error = status_mapping.from_triton(InferenceServerException(f"{other}what went wrong", status))
    assert "what went wrong" in error.message and "ensemble" not in error.message


def test_a_dead_stub_is_unavailable_and_retryable():
    exc = InferenceServerException(DEAD_STUB, "StatusCode.INTERNAL")
    assert status_mapping.stub_died(exc) and status_mapping.triton_unavailable(exc)
    error = status_mapping.from_triton(exc)
    assert type(error) is status_mapping.Unavailable
    assert error.message == "the inference server is unavailable (Stub process 'vision_encoder_0_0' is not healthy.)"


@pytest.mark.parametrize("status, message", [
    ("StatusCode.INTERNAL", f"{PREFIX}the decoder's step failed"),
    ("StatusCode.UNKNOWN", DEAD_STUB),  # the text under another status is not Triton's signal
])
def test_other_failures_are_internal_with_a_generic_message(status, message):
    exc = InferenceServerException(message, status)
    assert not status_mapping.stub_died(exc) and not status_mapping.triton_unavailable(exc)
    error = status_mapping.from_triton(exc)
    assert type(error) is status_mapping.ServiceError and error.code.name == "INTERNAL"
    assert error.message == status_mapping.INTERNAL_MESSAGE
