"""Python client SDK for the BLIP caption service (`blip.caption.v1.CaptionService`).

    from blip_client import CaptionClient, GenerationOptions

    with CaptionClient("127.0.0.1:50051") as client:
        result = client.caption("photo.jpg", options=GenerationOptions(num_beams=5))
        print(result.text, result.captions[0].score)

`caption_folder` captions folders of images into a record file that a rerun resumes (`find_images`,
`caption_files` and `RecordFile` are its parts, for pipelines). `channel_credentials` builds the TLS credentials
both clients use from PEM files (`PemSource`: a path or the file's bytes), for other gRPC channels to the same
service (the gateway's health probe uses it).
"""

from blip_client._async_client import AsyncCaptionClient
from blip_client._client import CaptionClient
from blip_client._errors import (
    CancelledError,
    CaptionError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from blip_client._folders import FolderSummary, RecordFile, RecordsError, caption_files, caption_folder, find_images
from blip_client._images import ImageInput
from blip_client._requests import PemSource, RetryPolicy, channel_credentials
from blip_client._types import Caption, CaptionResult, GenerationOptions, Limits, ModelInfo, ModelSummary

__all__ = [
    "AsyncCaptionClient",
    "CancelledError",
    "Caption",
    "CaptionClient",
    "CaptionError",
    "CaptionResult",
    "DeadlineExceededError",
    "FolderSummary",
    "GenerationOptions",
    "ImageInput",
    "InternalError",
    "InvalidArgumentError",
    "Limits",
    "ModelInfo",
    "ModelSummary",
    "NotFoundError",
    "PemSource",
    "RecordFile",
    "RecordsError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "UnauthenticatedError",
    "UnavailableError",
    "caption_files",
    "caption_folder",
    "channel_credentials",
    "find_images",
]
