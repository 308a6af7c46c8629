"""What an encoded image is, read from its header alone: its format and size, checked against the limits.

The gateway refuses an image here before it is sent anywhere, and `preprocess` checks again before decoding a
single pixel: a small file can declare an image of any size (a decompression bomb), and decoding allocates what
the header declares. Pillow reads only the header when it opens a file.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

# Pillow's names of the formats we accept ("JPEG" also opens phones' multi-picture MPO files).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"


class ImageError(ValueError):
    """The bytes are not an image we can caption; the message says why."""


@dataclass(frozen=True)
class ImageLimits:
    """The largest image decoded: pixels in all, and pixels along either side."""

    max_pixels: int = 50_000_000
    max_side: int = 20_000


@dataclass(frozen=True)
class ImageHeader:
    format: str | None  # Pillow's name of it; None only for an image made in memory, never for one opened
    width: int
    height: int
    mode: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def open_image(data: bytes) -> Image.Image:
    """The image, opened but not decoded; ImageError if it is not one of the accepted formats."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # corrupt metadata warnings, bomb warnings: the limits below decide
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"the image is too large to decode: {exc}") from None
    except Exception:  # noqa: BLE001 - whatever a plugin raises on bytes that are not its format
        raise ImageError(f"could not decode the image ({len(data)} bytes): not a {FORMAT_NAMES} file") from None


def check(image: Image.Image, limits: ImageLimits) -> ImageHeader:
    """The opened image's header, or ImageError if its declared size is empty or over the limits."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"the image has no pixels ({width}x{height})")
    if max(width, height) > limits.max_side:
        raise ImageError(f"the image is {width}x{height}; the limit is {limits.max_side} pixels a side")
    if width * height > limits.max_pixels:
        raise ImageError(f"the image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}")
    return ImageHeader(image.format, width, height, image.mode)


def read_header(data: bytes, limits: ImageLimits) -> ImageHeader:
    """Format and size of encoded image bytes, checked against `limits`, without decoding the pixels."""
    image = open_image(data)
    try:
        return check(image, limits)
    finally:
        image.close()
