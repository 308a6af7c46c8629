"""Seeded sampling and beam sampling through the running ensemble equal transformers': torch.manual_seed(seed)
then generate(do_sample=True, ...) for each image alone, while other requests share the decoder's steps and join
and leave around them."""

from __future__ import annotations

import pytest

from support import images
from support.sampling import sampled_requests_equal_transformers
from support.triton_requests import caption_inputs, captions

KINDS = images.kinds(seed=91)


@pytest.mark.parametrize("checkpoint", ["standard", "unusual"])
def test_seeded_sampling_equals_transformers_among_other_requests(servers, checkpoint):
    server = servers(checkpoint)
    client = server.client()

    def call(image, prompt, options):
        return captions(client.infer("blip_caption", caption_inputs(image, prompt, **options)))[0]

    sampled_requests_equal_transformers(call, server.checkpoint, KINDS, ["jpeg", "png_rgba", "webp"])
