from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CaptionRequest(_message.Message):
    __slots__ = ("image", "prompt", "options", "request_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    prompt: str
    options: GenerationOptions
    request_id: str
    def __init__(self, image: _Optional[bytes] = ..., prompt: _Optional[str] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerationOptions(_message.Message):
    __slots__ = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "repetition_penalty", "num_return_sequences", "no_repeat_ngram_size", "do_sample", "temperature", "top_k", "top_p", "seed")
    NUM_BEAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    NUM_RETURN_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    NO_REPEAT_NGRAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    DO_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    num_beams: int
    max_new_tokens: int
    min_new_tokens: int
    length_penalty: float
    repetition_penalty: float
    num_return_sequences: int
    no_repeat_ngram_size: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, num_beams: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., min_new_tokens: _Optional[int] = ..., length_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., num_return_sequences: _Optional[int] = ..., no_repeat_ngram_size: _Optional[int] = ..., do_sample: _Optional[bool] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class Caption(_message.Message):
    __slots__ = ("text", "score")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    text: str
    score: float
    def __init__(self, text: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class CaptionResponse(_message.Message):
    __slots__ = ("captions", "request_id", "model")
    CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    captions: _containers.RepeatedCompositeFieldContainer[Caption]
    request_id: str
    model: str
    def __init__(self, captions: _Optional[_Iterable[_Union[Caption, _Mapping]]] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "code_name", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    code_name: str
    message: str
    def __init__(self, code: _Optional[int] = ..., code_name: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class CaptionStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: CaptionResponse
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[CaptionResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_image_bytes", "max_image_pixels", "max_prompt_tokens", "max_num_beams", "max_new_tokens", "max_num_return_sequences", "max_no_repeat_ngram_size", "max_concurrent_requests", "max_image_side", "max_prompt_bytes")
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BEAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_RETURN_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_NO_REPEAT_NGRAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_BYTES_FIELD_NUMBER: _ClassVar[int]
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
    def __init__(self, max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., max_num_beams: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_num_return_sequences: _Optional[int] = ..., max_no_repeat_ngram_size: _Optional[int] = ..., max_concurrent_requests: _Optional[int] = ..., max_image_side: _Optional[int] = ..., max_prompt_bytes: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "source_checkpoint", "image_height", "image_width", "defaults", "limits", "precision", "early_stopping")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_FIELD_NUMBER: _ClassVar[int]
    model: str
    source_checkpoint: str
    image_height: int
    image_width: int
    defaults: GenerationOptions
    limits: Limits
    precision: str
    early_stopping: str
    def __init__(self, model: _Optional[str] = ..., source_checkpoint: _Optional[str] = ..., image_height: _Optional[int] = ..., image_width: _Optional[int] = ..., defaults: _Optional[_Union[GenerationOptions, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., precision: _Optional[str] = ..., early_stopping: _Optional[str] = ...) -> None: ...
