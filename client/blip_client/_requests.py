"""What both clients share: building requests, reading stream answers, channel options, call metadata."""

from __future__ import annotations

from blip_client._errors import CaptionError, code_from_name, error_for
from blip_client._images import ImageInput, image_bytes
from blip_client._types import CaptionResult, GenerationOptions
from blip_client.protos.blip.caption.v1 import caption_pb2

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def build_request(image: ImageInput, prompt: str, options: GenerationOptions | None,
                  request_id: str = "") -> caption_pb2.CaptionRequest:
    return caption_pb2.CaptionRequest(
        image=image_bytes(image),
        prompt=prompt or "",
        options=(options or GenerationOptions()).to_pb(),
        request_id=request_id,
    )


def stream_item(response: caption_pb2.CaptionStreamResponse) -> tuple[int, CaptionResult | CaptionError]:
    """A CaptionStream answer as (index of its image, result or error); request ids are the indexes."""
    index = int(response.request_id)
    if response.HasField("error"):
        return index, error_for(code_from_name(response.error.code_name), response.error.message)
    return index, CaptionResult.from_pb(response.response)


def channel_options() -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()
