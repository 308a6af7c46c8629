"""Hostile and unusual image files, built in memory, with the answer each must get.

What user uploads from the internet hold: decompression bombs and headers that declare absurd sizes, files that
are truncated, corrupt or not images at all, and valid files of every odd kind (16-bit, CMYK, palette with
transparency, animated, progressive, multi-page, rotated, huge phone photos). The tests send them through the
real stack; the soak mixes them into its load.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

CAPTION = "caption"  # the expectation of a valid file: captions, equal to transformers'
ORIENTATION = 0x0112


@dataclass(frozen=True)
class Sample:
    data: bytes
    expected: str  # CAPTION, or the gRPC status code name the call must end with

    @property
    def hostile(self) -> bool:
        return self.expected != CAPTION


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    """Gradients under noise, like a photo to a JPEG encoder. The noise is a tile repeated, in float32: drawn
    for every pixel in float64, the 48-megapixel image took 9 s."""
    rng = np.random.default_rng(seed)
    tile = rng.normal(0, 30, size=(256, 256, 3)).astype(np.float32)
    base = np.tile(tile, (-(-height // 256), -(-width // 256), 1))[:height, :width]
    base[..., 0] += np.arange(width, dtype=np.float32) * (255 / max(width - 1, 1))
    base[..., 1] += np.arange(height, dtype=np.float32)[:, None] * (255 / max(height - 1, 1))
    diagonal = (np.arange(width) % 256).astype(np.uint8)[None, :] + (np.arange(height) % 256).astype(np.uint8)[:, None]
    base[..., 2] += diagonal  # (x + y) mod 256: uint8 wraps
    image = np.clip(base, 0, 255, out=base).astype(np.uint8)
    image[height // 4: height // 2, width // 3: width // 2] = rng.integers(0, 256, 3)
    return image


def rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(_pattern(width, height, seed), "RGB")


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, pixel_bytes: bytes = b"") -> bytes:
    """A PNG whose header declares width x height (8-bit RGB) and whose data holds `pixel_bytes` only."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(pixel_bytes))
            + _png_chunk(b"IEND", b""))


def png_bomb(width: int, height: int) -> bytes:
    """A real, complete PNG of width x height black pixels: a few hundred kilobytes that decode to gigabytes."""
    row = b"\x00" + b"\x00" * (3 * width)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def _jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0) rewritten to declare another size."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9:]


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


def _hostile(seed: int, max_image_bytes: int) -> dict[str, Sample]:
    rng = random.Random(seed)
    jpeg = encode(rgb(320, 240, seed), "JPEG", quality=90)
    png = encode(rgb(320, 240, seed + 1), "PNG")
    corrupt_png = bytearray(png)
    corrupt_png[len(png) // 2] ^= 0xFF  # inside IDAT: its CRC no longer matches
    gif = bytearray(encode(rgb(64, 64, seed).convert("P"), "GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen 65535 x 65535
    bmp = bytearray(encode(rgb(64, 64, seed), "BMP"))
    bmp[18:26] = struct.pack("<ii", 100_000, 100_000)
    tiff = encode(rgb(64, 64, seed), "TIFF")
    tiff_huge = tiff.replace(struct.pack("<HHII", 256, 4, 1, 64), struct.pack("<HHII", 256, 4, 1, 90_000), 1)
    invalid = "INVALID_ARGUMENT"
    return {
        "empty": Sample(b"", invalid),
        "random_bytes": Sample(rng.randbytes(4096), invalid),
        "text": Sample(b"this is not an image, it is a sentence\n" * 20, invalid),
        "html": Sample(b"<!doctype html><html><body><img src='http://example.com/cat.jpg'></body></html>", invalid),
        "url": Sample(b"https://example.com/cat.jpg", invalid),  # never fetched: bytes are the image
        "pdf": Sample(encode(rgb(64, 64, seed), "PDF"), invalid),
        "svg": Sample(b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>', invalid),
        "gzip": Sample(zlib.compress(png), invalid),
        "unsupported_format_pcx": Sample(encode(rgb(64, 64, seed), "PCX"), invalid),
        "jpeg_truncated": Sample(jpeg[: len(jpeg) // 3], invalid),
        "jpeg_soi_then_garbage": Sample(b"\xff\xd8\xff" + rng.randbytes(2000), invalid),
        "png_truncated": Sample(png[: len(png) // 2], invalid),
        "png_corrupt_crc": Sample(bytes(corrupt_png), invalid),
        "png_zero_width": Sample(png_declaring(0, 100), invalid),
        "png_header_100_megapixels": Sample(png_declaring(10_000, 10_000), invalid),
        "png_bomb_64_megapixels": Sample(png_bomb(8_000, 8_000), invalid),
        "png_line_60000000x1": Sample(png_declaring(60_000_000, 1), invalid),
        "png_line_1x30000": Sample(png_declaring(1, 30_000), invalid),
        "png_forged_size_no_data": Sample(png_declaring(7_000, 7_000, b"\x00" * 64), invalid),
        "jpeg_forged_size_65000": Sample(_jpeg_with_size(jpeg, 65_000, 65_000), invalid),
        "gif_screen_65535": Sample(bytes(gif), invalid),
        "bmp_header_100000": Sample(bytes(bmp), invalid),
        "tiff_header_90000": Sample(tiff_huge, invalid),
        "webp_truncated": Sample(encode(rgb(200, 200, seed), "WEBP")[:120], invalid),
        "polyglot_gif_zip": Sample(b"GIF89a" + zlib.compress(b"PK\x03\x04" * 100), invalid),
        "over_max_image_bytes": Sample(b"\xff\xd8\xff" + b"\x00" * (max_image_bytes + 1), "RESOURCE_EXHAUSTED"),
    }


def _unusual(seed: int, phone_photo: bool) -> dict[str, Sample]:
    base = rgb(320, 240, seed + 2)
    jpeg = encode(base, "JPEG", quality=90)
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 3
    frames = [rgb(96, 96, seed + i).convert("P") for i in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    pages = io.BytesIO()
    base.save(pages, "TIFF", save_all=True, append_images=[rgb(320, 240, seed + 3)])
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(_pattern(320, 240, seed + 4)[:, :, 0], "L"))
    gray16 = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    samples = {
        "png_16bit_grayscale": encode(gray16, "PNG"),
        "tiff_16bit_grayscale": encode(gray16, "TIFF"),
        "jpeg_cmyk": encode(base.convert("CMYK"), "JPEG", quality=90),
        "png_palette_transparency": encode(palette, "PNG"),
        "gif_animated": animated.getvalue(),
        "jpeg_progressive": encode(base, "JPEG", quality=85, progressive=True),
        "jpeg_grayscale": encode(base.convert("L"), "JPEG"),
        "jpeg_exif_rotated_270": encode(base, "JPEG", exif=_exif(8)),
        "png_rgba": encode(rgba, "PNG"),
        "png_grayscale_alpha": encode(base.convert("LA"), "PNG"),
        "webp_lossless_alpha": encode(rgba, "WEBP", lossless=True),
        "bmp_1bit": encode(base.convert("1"), "BMP"),
        "bmp_rgba32": encode(rgba, "BMP"),
        "tiff_multipage_lzw": pages.getvalue(),
        "panorama_12000x60": encode(rgb(12_000, 60, seed + 5), "JPEG"),
        "tiny_1x1": encode(rgb(1, 1, seed + 6), "PNG"),
        # A header declaring more than the data holds: libjpeg fills the rest, Pillow (and so transformers) accepts
        # it; the decode budget bounds what it costs.
        "jpeg_forged_size_larger_than_data": _jpeg_with_size(jpeg, 4_000, 3_000),
    }
    if phone_photo:  # 48 megapixels, as a phone stores it: rotated by EXIF
        samples["phone_photo_48_megapixels"] = encode(rgb(8_000, 6_000, seed + 7), "JPEG", quality=80, exif=_exif(6))
    return {name: Sample(data, CAPTION) for name, data in samples.items()}


def corpus(seed: int = 0, max_image_bytes: int = 20 * 1024 * 1024, phone_photo: bool = True) -> dict[str, Sample]:
    """Name -> Sample: every hostile file and every unusual valid file."""
    return {**_hostile(seed, max_image_bytes), **_unusual(seed, phone_photo)}
