"""`--image-processor torchvision`: with torchvision installed, transformers' `AutoProcessor` picks the
torchvision `BlipImageProcessor`, whose pixels differ from the PIL one's; a repository exported for it computes
those pixels, and its captions equal transformers' on them (support.torchvision_reference runs that transformers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from image_header import ImageLimits
from image_preprocessing import ImageProcessorConfig, preprocess

from blip_server.export import ExportOptions, export_checkpoint
from blip_server.model_store import demo_checkpoint
from support import images, reference
from support.triton_requests import caption_inputs, captions

KINDS = images.kinds(seed=41)


def _scenes(count: int) -> dict[str, bytes]:
    import random

    from blip_demo.scenes import encode, render

    rng = random.Random(17)
    return {f"scene_{i}": encode(render(rng), rng) for i in range(count)}


@pytest.fixture(scope="module")
def checkpoints_under_test(checkpoints):
    return {"demo": demo_checkpoint(), "standard": checkpoints["standard"], "unusual": checkpoints["unusual"]}


@pytest.mark.parametrize("name", ["demo", "unusual"])
def test_our_torchvision_pixels_are_transformers_torchvision_pixels(torchvision_reference, checkpoints_under_test,
                                                                    tmp_path, name):
    checkpoint = checkpoints_under_test[name]
    files = {**KINDS, **_scenes(6)}
    picked, expected, expected_pil = torchvision_reference.pixels(checkpoint, files)
    assert picked == "BlipImageProcessor/torchvision"
    repository = tmp_path / "repository"
    export_checkpoint(checkpoint, repository, ExportOptions(image_processor="torchvision"))
    config = ImageProcessorConfig.from_json(repository / "preprocess" / "1" / "image_processor.json")
    assert config.backend == "torchvision"
    differing = []
    for file, data in files.items():
        ours = preprocess(data, config, ImageLimits())
        np.testing.assert_array_equal(ours, expected[file], err_msg=file)
        pil = preprocess(data, ImageProcessorConfig(**{**config.__dict__, "backend": "pil"}), ImageLimits())
        np.testing.assert_array_equal(pil, expected_pil[file], err_msg=file)
        if not np.array_equal(pil, ours):
            differing.append(file)
    # the reason the option exists: the two processors disagree on most resized images
    assert len(differing) > len(files) // 2, differing


@pytest.mark.parametrize("name", ["demo", "standard"])
def test_a_torchvision_repository_captions_as_transformers_with_torchvision(torchvision_reference,
                                                                             checkpoints_under_test, tmp_path,
                                                                             start_triton, name):
    checkpoint = checkpoints_under_test[name]
    files = {kind: KINDS[kind] for kind in ("jpeg", "png_rgba", "jpeg_exif_rotate_90", "wide", "tall", "large")}
    files.update(_scenes(4))
    _, expected_pixels, _ = torchvision_reference.pixels(checkpoint, files)
    export_checkpoint(checkpoint, tmp_path / "repository", ExportOptions(image_processor="torchvision"))
    triton = start_triton(tmp_path / "repository")
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton.options.grpc_port}")
    _, processor = reference.load(str(checkpoint))
    for i, (file, data) in enumerate(sorted(files.items())):
        prompt = "a picture of" if i % 2 else None
        options = dict(num_beams=1, min_new_tokens=0) if i % 3 == 2 else {}
        inputs = dict(processor.tokenizer(prompt, return_tensors="pt")) if prompt else {}
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        inputs["pixel_values"] = torch.from_numpy(expected_pixels[file])[None]
        expected = reference.generate(str(checkpoint), inputs, **options)
        texts, scores = captions(client.infer("blip_caption", caption_inputs(data, prompt, **options)))[0]
        assert texts == expected[0], (file, prompt, options)
        assert scores == pytest.approx(expected[1], rel=1e-5, abs=1e-4)
