"""Pixel values equal what the transformers pipeline + the checkpoint's BlipImageProcessor produce."""

from __future__ import annotations

import numpy as np
import pytest
from image_preprocessing import ImageError, ImageLimits, ImageProcessorConfig, load_image, preprocess

from blip_server.checkpoint import image_settings
from support import images, reference

KINDS = images.kinds(seed=3)
LIMITS = ImageLimits()


def _config(checkpoint) -> tuple[ImageProcessorConfig, object]:
    model, processor = reference.load(str(checkpoint))
    settings = image_settings(processor.image_processor, model.config.vision_config.image_size)
    return ImageProcessorConfig(**settings), processor.image_processor


@pytest.mark.parametrize("checkpoint_name", ["standard", "unusual"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_pixel_values_match_blip_image_processor(checkpoints, checkpoint_name, kind):
    config, image_processor = _config(checkpoints[checkpoint_name])
    expected = image_processor(images=reference.pipeline_image(KINDS[kind]), return_tensors="np")["pixel_values"][0]
    actual = preprocess(KINDS[kind], config, LIMITS)
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape == (3, config.height, config.width)
    assert np.abs(actual - expected).max() <= 1e-5


def test_exif_orientation_is_applied_before_anything_else():
    base = images.rgb(300, 200, seed=9)
    upright = load_image(images.encode(base, "PNG"), LIMITS)
    rotated = load_image(images.with_orientation(base, 6, quality=100), LIMITS)
    assert upright.size == (300, 200)
    assert rotated.size == (200, 300)  # orientation 6: displayed rotated by 90 degrees


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"definitely not an image", "could not decode"),
        (images.encode(images.rgb(64, 64), "JPEG")[:300], "could not decode"),
        (images.encode(images.rgb(64, 64), "PDF"), "could not decode"),
    ],
    ids=["empty", "garbage", "truncated_jpeg", "pdf"],
)
def test_bad_images_are_refused_with_a_reason(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data, LIMITS)


def test_images_over_the_pixel_limit_are_refused_before_decoding():
    data = images.encode(images.rgb(400, 300), "PNG")
    with pytest.raises(ImageError, match="400x300 = 120000 pixels; the limit is 100000"):
        load_image(data, ImageLimits(max_pixels=100_000))
    assert load_image(data, ImageLimits(max_pixels=120_000)).size == (400, 300)


def test_images_over_the_side_limit_are_refused_before_decoding():
    data = images.encode(images.rgb(400, 30), "PNG")
    with pytest.raises(ImageError, match="the image is 400x30; the limit is 399 pixels a side"):
        load_image(data, ImageLimits(max_side=399))
    assert load_image(data, ImageLimits(max_side=400)).size == (400, 30)
