"""Captions through the running Triton ensemble equal transformers' generate() on the same images."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from support import images, reference
from support.triton_requests import caption_inputs, captions

KINDS = images.kinds(seed=21)
IMAGE_KINDS = ["jpeg", "png_rgba", "png_palette_transparency", "jpeg_cmyk", "jpeg_exif_rotate_90", "tall", "tiny_3x5"]
CASES = {
    "greedy": dict(num_beams=1, min_new_tokens=0),
    "beams_3_defaults": dict(),
    "beams_5_return_3": dict(num_beams=5, num_return_sequences=3),
    "min_new_tokens": dict(num_beams=3, min_new_tokens=9),
    "length_penalty": dict(num_beams=4, length_penalty=1.7, min_new_tokens=0),
    "repetition_penalty": dict(num_beams=3, repetition_penalty=1.4),
    "no_repeat_ngram": dict(num_beams=2, no_repeat_ngram_size=2, max_new_tokens=15),
}
PROMPTS = [None, "a picture of"]


@pytest.mark.parametrize("checkpoint", ["standard", "unusual"])
def test_captions_equal_transformers(servers, checkpoint):
    server = servers(checkpoint)
    jobs = [(kind, case, prompt) for kind in IMAGE_KINDS for case in CASES for prompt in PROMPTS]
    client = server.client()

    def ask(job):
        kind, case, prompt = job
        return captions(client.infer("blip_caption", caption_inputs(KINDS[kind], prompt, **CASES[case])))[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, jobs))
    for (kind, case, prompt), (texts, scores) in zip(jobs, answers, strict=True):
        expected_texts, expected_scores = reference.caption(server.checkpoint, KINDS[kind], prompt, **CASES[case])
        assert texts == expected_texts, (kind, case, prompt)
        assert scores == pytest.approx(expected_scores, abs=1e-4), (kind, case, prompt)
        if prompt:
            assert all(t.startswith(prompt) for t in texts)
