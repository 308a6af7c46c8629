"""Encoded image bytes -> pixel values, exactly as the transformers pipeline and BlipImageProcessor do it.

The pipeline loads an image with `PIL.Image.open`, applies its EXIF orientation (`ImageOps.exif_transpose`)
and converts it with `convert("RGB")`. The checkpoint's image processor (the PIL backend of
`BlipImageProcessor`) then converts to RGB once more, compositing onto white any transparency that survived
(`convert("RGB")` keeps a palette image's transparent colour as `info["transparency"]`), resizes to the
configured size with the configured resample filter, rescales in float64 before casting to float32, and
normalises with the checkpoint's mean and std in float32. Every operation here is the same operation, in the
same order and precision, so pixel values match bit for bit; conversions that would only copy an image already
in the target mode are skipped, as are copies `exif_transpose` makes of an upright image.

With torchvision installed, `AutoProcessor` picks the torchvision backend of `BlipImageProcessor` instead, and
its pixels differ slightly (up to a few levels on some pixels): `torchvision_pixel_values` computes those, with
the torch operations torchvision runs on the CPU, for a repository exported with `--image-processor torchvision`.

Before a pixel is decoded, the header's size is checked against the limits (`image_header`). An instance of
`preprocess` handles one request at a time, so its memory peaks at one image's decode (up to about 16 bytes a
pixel: 800 MB at the default 50-MP limit).
"""

from __future__ import annotations

import json
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from image_header import ImageError, ImageLimits, check, open_image
from PIL import Image, ImageOps

__all__ = ["ImageError", "ImageLimits", "ImageProcessorConfig", "PROCESSORS", "load_image",
           "pixel_values", "preprocess", "torchvision_pixel_values"]


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
    backend: str = "pil"  # which BlipImageProcessor the pixels equal: "pil" or "torchvision" (PROCESSORS)

    @classmethod
    def from_json(cls, path: str | Path) -> ImageProcessorConfig:
        values = json.loads(Path(path).read_text())
        values["image_mean"] = tuple(values["image_mean"])
        values["image_std"] = tuple(values["image_std"])
        return cls(**values)

    def to_dict(self) -> dict:
        return {**self.__dict__, "image_mean": list(self.image_mean), "image_std": list(self.image_std)}


def _decode(image: Image.Image, header) -> Image.Image:
    """Decode an opened image, apply its EXIF orientation and convert it to RGB (the pipeline's loading)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return image if image.mode == "RGB" else image.convert("RGB")
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data, whatever the plugin raises
        raise ImageError(f"could not decode the {header.format} image: {exc}") from None


def load_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode (within the limits), apply EXIF orientation, convert to RGB."""
    image = open_image(data)
    return _decode(image, check(image, limits))


def _convert_to_rgb(image: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb: transparency is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """`image.resize(size, resample)` as Pillow 13 computes it, whatever the Pillow (parity is measured on 13.0;
    NVIDIA's Triton image runs Python 3.10, whose last Pillow is 12.3).

    Pillow resizes in two passes, each rounding to 8 bits. Up to 12.x the horizontal pass always ran first; 13.0
    runs the vertical one first when the height shrinks by more than twice what the width does (Resample.c,
    `horizontal_first`), which changes up to a quarter of the pixels of a tall image by a few levels. Here that
    case is two one-axis resizes in 13.0's order: each is the same single pass in both releases (tested)."""
    width, height = image.size
    if height - size[1] > 0 and height - size[1] > (width - size[0]) * 2:
        image = image.resize((width, size[1]), resample=resample, reducing_gap=None)
    return image.resize(size, resample=resample, reducing_gap=None)


def pixel_values(image: Image.Image, config: ImageProcessorConfig) -> np.ndarray:
    """An RGB image -> float32 [3, height, width], as BlipImageProcessor (PIL backend) computes it.

    The same elementwise operations in the same precisions, laid out channels-first from the first one and done
    in place: one new array (the result) per image, and the float64 stage in a buffer each thread keeps. Every
    array of 1 MiB or more is mapped afresh and faulted in page by page (this process's allocator sends them to
    mmap: see model.py); the six temporaries a 384x384 image used to take cost 7 ms of its 17 in this model."""
    if config.do_convert_rgb:
        image = _convert_to_rgb(image)
    if config.do_resize:
        image = resize(image, (config.width, config.height), config.resample)
    channels_first = np.asarray(image).transpose(2, 0, 1)
    if config.do_rescale:
        rescaled = _scratch(channels_first.shape)
        np.multiply(channels_first, config.rescale_factor, out=rescaled, dtype=np.float64)
        array = rescaled.astype(np.float32)
    else:
        array = channels_first.astype(np.float32, order="C")
    if config.do_normalize:
        array -= np.array(config.image_mean, dtype=np.float32)[:, None, None]
        array /= np.array(config.image_std, dtype=np.float32)[:, None, None]
    return array


_THREAD = threading.local()


def _scratch(shape: tuple[int, ...]) -> np.ndarray:
    """A float64 buffer of `shape` that the calling thread reuses."""
    buffer = getattr(_THREAD, "buffer", None)
    if buffer is None or buffer.shape != shape:
        buffer = _THREAD.buffer = np.empty(shape, dtype=np.float64)
    return buffer


def torchvision_pixel_values(image: Image.Image, config: ImageProcessorConfig) -> np.ndarray:
    """An RGB image -> float32 [3, height, width], as BlipImageProcessor (torchvision backend) computes it on the
    CPU: the uint8 image goes channels-first through torch's antialiased bicubic interpolation (what
    `torchvision.transforms.v2.functional.resize` runs for uint8 CPU tensors, rounding inside the kernel), then
    to float32, normalised with mean and std divided by rescale_factor (rescaling fused into normalisation)."""
    import torch

    if config.do_resize and config.resample != Image.Resampling.BICUBIC:
        raise ValueError(f"the torchvision image processor is supported with bicubic resampling only, not "
                         f"resample={config.resample}")
    rgb = _convert_to_rgb(image) if config.do_convert_rgb else image
    with warnings.catch_warnings():  # a read-only view of the image, copied channels-first at once
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(np.asarray(rgb)).permute(2, 0, 1).contiguous()[None]
    if config.do_resize and tuple(tensor.shape[-2:]) != (config.height, config.width):
        tensor = torch.nn.functional.interpolate(tensor, size=[config.height, config.width], mode="bicubic",
                                                 align_corners=False, antialias=True)
    if config.do_normalize:
        scale = 1.0 / config.rescale_factor if config.do_rescale else 1.0
        mean = (torch.tensor(config.image_mean) * scale).view(-1, 1, 1)
        std = (torch.tensor(config.image_std) * scale).view(-1, 1, 1)
        tensor = tensor.to(torch.float32).sub_(mean).div_(std)
    elif config.do_rescale:
        tensor = tensor * config.rescale_factor
    return np.ascontiguousarray(tensor[0].to(torch.float32).numpy())


# --image-processor: which backend of BlipImageProcessor the pixels equal.
PROCESSORS = {"pil": pixel_values, "torchvision": torchvision_pixel_values}


def preprocess(data: bytes, config: ImageProcessorConfig, limits: ImageLimits) -> np.ndarray:
    """Pixel values of encoded image bytes, refused by their header's size before any decoding."""
    image = open_image(data)
    header = check(image, limits)
    rgb = _decode(image, header)
    try:
        return PROCESSORS[config.backend](rgb, config)
    finally:
        rgb.close()
        image.close()
