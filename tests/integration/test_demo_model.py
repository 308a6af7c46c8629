"""The shipped demo model, served by `blip-serve` with no --model: captions that are right, not just identical."""

from __future__ import annotations

import random

import pytest

from blip_client import CaptionClient
from blip_server.demo.evaluate import measure, scenes
from blip_server.demo.scenes import PROMPT, encode, render
from blip_server.model_store import demo_checkpoint
from support import reference
from support.serve import ServeProcess

# A fresh set, neither the training's nor blip-demo-evaluate's. The README reports the full evaluation.
SEED = 777_001
COUNT = 80


@pytest.fixture(scope="module")
def demo_service(tmp_path_factory):
    serve = ServeProcess(cache=tmp_path_factory.mktemp("cache"))  # no --model: the demo checkpoint
    try:
        ready = serve.wait_ready()
        assert str(demo_checkpoint()) in ready
        yield serve
    finally:
        code, log = serve.stop()
        assert code == 0, log


def test_fresh_scenes_are_captioned_right(demo_service):
    report = measure(demo_service.address, scenes(COUNT, SEED))
    for name in ("unconditional", "prompted"):
        assert report[name]["accuracy"] >= 0.9, report[name]["wrong"]


def _two_object_scene(seed_from: int):
    rng = random.Random(seed_from)
    while True:
        scene = render(rng)
        if len(scene.objects) == 2 and scene.objects[0].describe() != scene.objects[1].describe():
            return scene, rng


@pytest.mark.parametrize("orientation", [2, 3])  # mirrored, rotated by 180 degrees: left and right swap
def test_exif_orientation_decides_left_and_right(demo_service, orientation):
    scene, rng = _two_object_scene(orientation * 1000)
    data = encode(scene, rng, fmt="JPEG", quality=92, orientation=orientation)
    swapped = " and ".join(o.describe() for o in reversed(scene.objects))
    with CaptionClient(demo_service.address) as client:
        caption = client.caption(data).text
        prompted = client.caption(data, prompt=PROMPT).text
    assert caption == scene.caption != swapped
    assert prompted == f"{PROMPT} {scene.caption}"


def test_the_served_demo_agrees_with_generate(demo_service):
    checkpoint = str(demo_checkpoint())
    held_out = scenes(12, SEED + 1)
    with CaptionClient(demo_service.address) as client:
        for data, _ in held_out:
            for prompt in ("", PROMPT):
                served = client.caption(data, prompt=prompt)
                texts, scores = reference.caption(checkpoint, data, prompt or None)
                assert served.text == texts[0]
                assert served.captions[0].score == pytest.approx(scores[0], abs=1e-4)


def test_unconditional_captions_do_not_start_with_the_prompt(demo_service):
    with CaptionClient(demo_service.address) as client:
        captions = [r.text for r in client.caption_many([d for d, _ in scenes(16, SEED + 2)])]
    assert not any(c.startswith(PROMPT) for c in captions)
