"""The gateway's domain types and their conversions from and to the protobuf messages.

Requests arrive as bytes and are parsed here, not by grpc's deserializer: a message that is not a valid
CaptionRequest (or holds a string that is not UTF-8) is then an INVALID_ARGUMENT naming what is wrong, for the
call or for the one stream item, instead of an UNKNOWN status that ends the call or the whole stream.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from blip_client.protos.blip.caption.v1 import caption_pb2
from blip_server.ensemble import CaptionText
from blip_server.gateway.status_mapping import InvalidArgument
from blip_server.shared.generation_options import REQUEST_OPTIONS, OptionValue

# The options a request may set: the same names in the proto, the declaration and the ensemble.
OPTION_FIELDS = tuple(o.name for o in REQUEST_OPTIONS)


def options_from_pb(message: Message, names: tuple[str, ...] = OPTION_FIELDS) -> dict[str, OptionValue]:
    """Only the options the caller set: proto3 presence (an explicit 0 is a value, not "unset"), and for a repeated
    option any values (a repeated field has no presence: an empty list is unset)."""
    options: dict[str, OptionValue] = {}
    for name in names:
        value = getattr(message, name)
        if isinstance(value, (bool, int, float, str)):
            if message.HasField(name):
                options[name] = value
        elif len(value):  # a repeated field's container
            options[name] = tuple(value)
    return options


def options_to_pb(options: Mapping[str, OptionValue | None]) -> caption_pb2.GenerationOptions:
    # Each value has its own field's type (protobuf checks it), which a dict's value type cannot say per key.
    values: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items() if v is not None}
    return caption_pb2.GenerationOptions(**values)


@functools.cache
def _lenient_request() -> type[Message]:
    """CaptionRequest with every field as bytes: reads what the strict parser refused, to say which field is bad."""
    file = descriptor_pb2.FileDescriptorProto(name="blip/caption/v1/lenient.proto", package="blip.caption.v1.lenient",
                                              syntax="proto3")
    message = file.message_type.add(name="CaptionRequest")
    for f in caption_pb2.CaptionRequest.DESCRIPTOR.fields:
        message.field.add(name=f.name, number=f.number, type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
                          label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("blip.caption.v1.lenient.CaptionRequest"))


def _why_unparsable(data: bytes) -> tuple[str, str]:
    """(request_id if it can be read, what is wrong) for bytes that are not a valid CaptionRequest."""
    try:
        # Built from a descriptor at runtime: its fields are not known to the type checker.
        lenient: Any = _lenient_request().FromString(data)
    except DecodeError:
        return "", f"the request ({len(data)} bytes) is not a valid blip.caption.v1.CaptionRequest message"
    request_id = lenient.request_id.decode("utf-8", errors="replace")
    for name in ("prompt", "request_id", "model"):
        try:
            getattr(lenient, name).decode("utf-8")
        except UnicodeDecodeError:
            return request_id, f"{name} is not valid UTF-8"
    return request_id, "options is not a valid blip.caption.v1.GenerationOptions message"


@dataclass(frozen=True)
class CaptionJob:
    image: bytes
    prompt: str
    options: dict[str, OptionValue]
    request_id: str
    model: str = ""  # the model's name; empty: the default

    @classmethod
    def from_pb(cls, message: caption_pb2.CaptionRequest) -> CaptionJob:
        return cls(message.image, message.prompt, options_from_pb(message.options), message.request_id,
                   message.model)

    @classmethod
    def from_bytes(cls, data: bytes) -> CaptionJob:
        """Parse a serialized CaptionRequest; raises UnparsableRequest (an InvalidArgument) saying what is wrong."""
        try:
            return cls.from_pb(caption_pb2.CaptionRequest.FromString(data))
        except DecodeError:
            request_id, why = _why_unparsable(data)
            raise UnparsableRequest(why, request_id) from None


class UnparsableRequest(InvalidArgument):
    """A request that is not a valid CaptionRequest; `request_id` is its id when that much could be read."""

    def __init__(self, message: str, request_id: str = ""):
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True)
class CaptionResult:
    captions: list[CaptionText]
    request_id: str
    model: str

    def to_pb(self) -> caption_pb2.CaptionResponse:
        return caption_pb2.CaptionResponse(
            captions=[caption_pb2.Caption(text=c.text, score=c.score) for c in self.captions],
            request_id=self.request_id,
            model=self.model,
        )


@dataclass(frozen=True)
class ServedModel:
    """One model a replica serves: its name for callers and the Triton models behind it."""

    name: str
    ensemble: str  # the Triton ensemble unseeded samples are asked of (it caches nothing)
    preprocess: str  # the Triton model whose config says what is served (defaults, limits, source, precision)
    default: bool = False  # answers requests that name no model
    cached_ensemble: str = ""  # the same with Triton's response cache, for deterministic requests ("": none served)

    def ensemble_for(self, deterministic: bool) -> str:
        """The ensemble a request goes to: the cached one when its answer depends on its inputs alone."""
        return self.cached_ensemble if deterministic and self.cached_ensemble else self.ensemble


@dataclass(frozen=True)
class ModelDescription:
    model: str
    source_checkpoint: str
    image_height: int
    image_width: int
    precision: str
    defaults: dict[str, OptionValue] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)
    early_stopping: str = "false"

    def to_pb(self) -> caption_pb2.ModelInfo:
        return caption_pb2.ModelInfo(
            model=self.model,
            source_checkpoint=self.source_checkpoint,
            image_height=self.image_height,
            image_width=self.image_width,
            precision=self.precision,
            defaults=options_to_pb(self.defaults),
            limits=caption_pb2.Limits(**self.limits),
            early_stopping=self.early_stopping,
        )
