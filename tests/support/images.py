"""Encoded test images of every kind the service must accept, built in memory (no files committed)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

ORIENTATION = 0x0112


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise plus a block: resizing has real work to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.normal(0, 40, size=(height, width, 3))
    image = np.clip(base + noise, 0, 255)
    image[height // 4 : height // 2, width // 3 : width // 2] = rng.integers(0, 256, 3)
    return image.astype(np.uint8)


def rgb(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    return Image.fromarray(_pattern(width, height, seed), "RGB")


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def with_orientation(image: Image.Image, orientation: int, quality: int = 90) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(image, "JPEG", exif=exif, quality=quality)


def kinds(seed: int = 0) -> dict[str, bytes]:
    """Name -> encoded bytes: JPEG, PNG, RGBA, grayscale, palette, CMYK, EXIF-rotated, non-square, tiny, ..."""
    base = rgb(320, 240, seed)
    rgba = base.convert("RGBA")
    alpha = np.asarray(rgb(320, 240, seed + 1))[:, :, 0]
    rgba.putalpha(Image.fromarray(alpha, "L"))
    palette_transparent = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette_transparent.info["transparency"] = 3
    frames = [rgb(96, 96, seed + i).convert("P") for i in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=50)
    sixteen_bit = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    return {
        "jpeg": encode(base, "JPEG", quality=92),
        "jpeg_low_quality": encode(base, "JPEG", quality=15),
        "png": encode(base, "PNG"),
        "png_rgba": encode(rgba, "PNG"),
        "png_grayscale": encode(base.convert("L"), "PNG"),
        "png_grayscale_alpha": encode(base.convert("LA"), "PNG"),
        "png_16bit": encode(sixteen_bit, "PNG"),
        "png_palette": encode(base.convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG"),
        "png_palette_transparency": encode(palette_transparent, "PNG"),
        "gif_animated": animated.getvalue(),
        "jpeg_cmyk": encode(base.convert("CMYK"), "JPEG"),
        "jpeg_grayscale": encode(base.convert("L"), "JPEG"),
        "jpeg_exif_rotate_90": with_orientation(base, 6),
        "jpeg_exif_rotate_180": with_orientation(base, 3),
        "jpeg_exif_rotate_270": with_orientation(base, 8),
        "jpeg_exif_mirror": with_orientation(base, 2),
        "webp": encode(base, "WEBP", quality=80),
        "webp_lossless_alpha": encode(rgba, "WEBP", lossless=True),
        "bmp": encode(base, "BMP"),
        "tiff": encode(base, "TIFF"),
        "tall": encode(rgb(90, 700, seed + 2), "JPEG"),
        "wide": encode(rgb(1200, 100, seed + 3), "PNG"),
        "large": encode(rgb(2000, 1500, seed + 4), "JPEG"),
        "tiny_1x1": encode(rgb(1, 1, seed + 5), "PNG"),
        "tiny_3x5": encode(rgb(3, 5, seed + 6), "PNG"),
        "exact_size": encode(rgb(384, 384, seed + 7), "PNG"),
    }
