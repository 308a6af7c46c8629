"""What callers may pass as an image: encoded bytes, a file path, or a PIL image."""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # Pillow is needed only by callers that pass PIL images
    import PIL.Image

ImageInput = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", "PIL.Image.Image"]


def image_bytes(image: ImageInput) -> bytes:
    """The encoded image file to send. A PIL image is sent as PNG (lossless)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    if hasattr(image, "save") and hasattr(image, "size"):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"an image is bytes, a path or a PIL image, not {type(image).__name__}")
