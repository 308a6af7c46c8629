"""The demo world: scenes follow the rules of docs/demo-model.md, captions are right by construction, tokens fit the
defaults."""

from __future__ import annotations

import io
import random
import re

import numpy as np
import pytest
from PIL import Image, ImageOps

from blip_demo.model import build_processor
from blip_demo.scenes import COLOURS, PROMPT, REFERENCE_CANVAS, SHAPES, SIZES, SceneStyle, encode, render

SCENES = [render(random.Random(seed)) for seed in range(300)]


def test_objects_are_inside_apart_and_ordered_left_to_right():
    for scene in SCENES:
        canvas = scene.image.size[0]
        assert scene.image.size == (canvas, canvas) and 1 <= len(scene.objects) <= 2
        for o in scene.objects:
            left, top, right, bottom = o.box
            assert 0 <= left < right <= canvas and 0 <= top < bottom <= canvas
            low, high = SIZES[o.size]
            side = (right - left) * REFERENCE_CANVAS / canvas
            assert right - left == bottom - top and low - 2 <= side <= high + 2
        if len(scene.objects) == 2:
            first, second = scene.objects
            assert first.box[2] < second.box[0]  # separated horizontally, first is the left one


def test_captions_follow_the_grammar():
    words = r"(small|large) (red|green|blue|yellow|purple|orange) (circle|square|triangle)"
    pattern = rf"^a {words}( and a {words})?$"
    for scene in SCENES:
        assert re.match(pattern, scene.caption), scene.caption
        assert scene.prompted_caption() == f"{PROMPT} {scene.caption}"
    captions = {s.caption for s in SCENES}
    assert {o.shape for s in SCENES for o in s.objects} == set(SHAPES)
    assert {o.colour for s in SCENES for o in s.objects} == set(COLOURS)
    assert len(captions) > 150  # of 36 one-object and 1,296 two-object captions


def test_each_object_is_drawn_in_its_colour():
    for scene in SCENES[:60]:
        pixels = np.asarray(scene.image).astype(int)
        for o in scene.objects:
            left, top, right, bottom = o.box
            y = top + 2 * (bottom - top) // 3 if o.shape == "triangle" else (top + bottom) // 2  # inside the shape
            centre = pixels[y, (left + right) // 2]
            assert np.abs(centre - np.array(COLOURS[o.colour])).max() <= SceneStyle().colour_jitter + 2


@pytest.mark.parametrize("orientation", range(1, 9))
def test_stored_orientation_is_undone_by_exif_transpose(orientation):
    scene = render(random.Random(5))
    data = encode(scene, random.Random(0), fmt="JPEG", quality=95, orientation=orientation)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")).astype(int)
    assert upright.shape == np.asarray(scene.image).shape
    assert np.abs(upright - np.asarray(scene.image).astype(int)).mean() < 3


def test_every_caption_is_in_the_vocabulary_and_long_enough_for_the_default_min_new_tokens():
    tokenizer = build_processor().tokenizer
    for scene in SCENES:
        ids = tokenizer(scene.caption, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert 5 <= len(ids) <= 19  # at least min_new_tokens, and room for the end token within 20
        assert tokenizer.decode(ids) == scene.caption
