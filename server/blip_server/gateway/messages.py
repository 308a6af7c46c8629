"""The gateway's domain types and their conversions from and to the protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, field

from blip_client.protos.blip.caption.v1 import caption_pb2
from blip_server.ensemble import OPTION_TENSORS, CaptionText

OPTION_FIELDS = tuple(OPTION_TENSORS)  # the GenerationOptions fields, same names in proto and ensemble


def options_from_pb(message: caption_pb2.GenerationOptions) -> dict:
    """Only the options the caller set (proto3 presence): an explicit 0 is a value, not "unset"."""
    return {name: getattr(message, name) for name in OPTION_FIELDS if message.HasField(name)}


def options_to_pb(options: dict) -> caption_pb2.GenerationOptions:
    return caption_pb2.GenerationOptions(**{k: v for k, v in options.items() if v is not None})


@dataclass(frozen=True)
class CaptionJob:
    image: bytes
    prompt: str
    options: dict
    request_id: str

    @classmethod
    def from_pb(cls, message: caption_pb2.CaptionRequest) -> "CaptionJob":
        return cls(message.image, message.prompt, options_from_pb(message.options), message.request_id)


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
class ModelDescription:
    model: str
    source_checkpoint: str
    image_height: int
    image_width: int
    precision: str
    defaults: dict = field(default_factory=dict)
    limits: dict = field(default_factory=dict)

    def to_pb(self) -> caption_pb2.ModelInfo:
        return caption_pb2.ModelInfo(
            model=self.model,
            source_checkpoint=self.source_checkpoint,
            image_height=self.image_height,
            image_width=self.image_width,
            precision=self.precision,
            defaults=options_to_pb(self.defaults),
            limits=caption_pb2.Limits(**self.limits),
        )
