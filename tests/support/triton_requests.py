"""Requests to the `blip_caption` ensemble with tritonclient, as a Triton-native client sends them."""

from __future__ import annotations

import tritonclient.grpc as grpcclient

from blip_server import ensemble


def caption_inputs(images: bytes | list[bytes], prompt: str | list[str] | None = None, **options):
    return ensemble.inputs(grpcclient, images, prompt, **options)


def captions(result) -> list[tuple[list[str], list[float]]]:
    """Per item: (captions best first, scores)."""
    return [([c.text for c in item], [c.score for c in item]) for item in ensemble.captions(result)]
