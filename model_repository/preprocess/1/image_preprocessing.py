"""Encoded image bytes -> pixel values, exactly as the transformers pipeline and BlipImageProcessor do it.

The pipeline loads an image with `PIL.Image.open`, applies its EXIF orientation (`ImageOps.exif_transpose`)
and converts it with `convert("RGB")`. The checkpoint's image processor (the PIL backend of
`BlipImageProcessor`) then converts to RGB once more, compositing onto white any transparency that survived
(`convert("RGB")` keeps a palette image's transparent colour as `info["transparency"]`), resizes to the configured size with the configured resample filter, rescales in
float64 before casting to float32, and normalises with the checkpoint's mean and std in float32. Every
operation here is the same operation, in the same order and precision, so pixel values match bit for bit.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Pillow's names of the formats we accept ("JPEG" also opens phones' multi-picture MPO files).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class ImageError(ValueError):
    """The bytes are not an image we can caption; the message says why."""


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The resolved settings of the checkpoint's BlipImageProcessor."""

    height: int
    width: int
    resample: int
    do_convert_rgb: bool
    do_resize: bool
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @classmethod
    def from_json(cls, path: str | Path) -> "ImageProcessorConfig":
        values = json.loads(Path(path).read_text())
        values["image_mean"] = tuple(values["image_mean"])
        values["image_std"] = tuple(values["image_std"])
        return cls(**values)

    def to_dict(self) -> dict:
        return {**self.__dict__, "image_mean": list(self.image_mean), "image_std": list(self.image_std)}


def load_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode, refuse what is not an accepted image or is too large, apply EXIF orientation, convert to RGB."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"the image is too large to decode: {exc}") from None
    except Exception as exc:
        raise ImageError(
            f"could not decode the image ({len(data)} bytes): not a JPEG, PNG, WebP, GIF, BMP or TIFF file"
        ) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except Exception as exc:
        raise ImageError(f"could not decode the {image.format} image: {exc}") from None


def _convert_to_rgb(image: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb: transparency is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def pixel_values(image: Image.Image, config: ImageProcessorConfig) -> np.ndarray:
    """An RGB image -> float32 [3, height, width], as BlipImageProcessor (PIL backend) computes it."""
    if config.do_convert_rgb:
        image = _convert_to_rgb(image)
    if config.do_resize:
        image = image.resize((config.width, config.height), resample=config.resample, reducing_gap=None)
    array = np.asarray(image)
    if config.do_rescale:
        array = (array.astype(np.float64) * config.rescale_factor).astype(np.float32)
    else:
        array = array.astype(np.float32)
    if config.do_normalize:
        array = (array - np.array(config.image_mean, dtype=np.float32)) / np.array(config.image_std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def preprocess(data: bytes, config: ImageProcessorConfig, max_pixels: int) -> np.ndarray:
    return pixel_values(load_image(data, max_pixels), config)
