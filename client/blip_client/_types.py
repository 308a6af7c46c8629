"""Typed results and options, with their conversions from and to the protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, fields

from blip_client.protos.blip.caption.v1 import caption_pb2


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate; None leaves an option to the server's default. Same meaning as transformers'
    generate() arguments of the same names."""

    num_beams: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    length_penalty: float | None = None
    repetition_penalty: float | None = None
    num_return_sequences: int | None = None
    no_repeat_ngram_size: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def to_pb(self) -> caption_pb2.GenerationOptions:
        return caption_pb2.GenerationOptions(**{f.name: getattr(self, f.name) for f in fields(self)
                                                if getattr(self, f.name) is not None})

    @classmethod
    def from_pb(cls, message: caption_pb2.GenerationOptions) -> GenerationOptions:
        present = {descriptor.name for descriptor, _ in message.ListFields()}  # the fields that are set
        return cls(**{f.name: getattr(message, f.name) for f in fields(cls) if f.name in present})


@dataclass(frozen=True)
class Caption:
    text: str
    score: float


@dataclass(frozen=True)
class CaptionResult:
    """The captions of one image, best first."""

    captions: list[Caption]
    request_id: str = ""
    model: str = ""

    @property
    def text(self) -> str:
        """The best caption."""
        return self.captions[0].text

    @classmethod
    def from_pb(cls, message: caption_pb2.CaptionResponse) -> CaptionResult:
        return cls([Caption(c.text, c.score) for c in message.captions], message.request_id, message.model)


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int
    max_image_pixels: int
    max_prompt_tokens: int
    max_num_beams: int
    max_new_tokens: int
    max_num_return_sequences: int
    max_no_repeat_ngram_size: int
    max_concurrent_requests: int
    max_image_side: int
    max_prompt_bytes: int


@dataclass(frozen=True)
class ModelSummary:
    """One served model (`list_models()`): its name (what `model=` takes), source checkpoint, precision, whether
    it is the default (the model of calls that name none), the Triton ensemble that serves it (no cache) and
    the same with Triton's response cache (for deterministic requests only; empty if none is served)."""

    name: str
    source_checkpoint: str
    precision: str
    is_default: bool
    triton_ensemble: str
    triton_cached_ensemble: str

    @classmethod
    def from_pb(cls, message: caption_pb2.ModelSummary) -> ModelSummary:
        return cls(message.name, message.source_checkpoint, message.precision, message.is_default,
                   message.triton_ensemble, message.triton_cached_ensemble)


@dataclass(frozen=True)
class ModelInfo:
    model: str
    source_checkpoint: str
    image_height: int
    image_width: int
    precision: str
    defaults: GenerationOptions
    limits: Limits
    early_stopping: str = "false"

    @classmethod
    def from_pb(cls, message: caption_pb2.ModelInfo) -> ModelInfo:
        limits = Limits(**{f.name: getattr(message.limits, f.name) for f in fields(Limits)})
        return cls(message.model, message.source_checkpoint, message.image_height, message.image_width,
                   message.precision, GenerationOptions.from_pb(message.defaults), limits,
                   message.early_stopping or "false")
