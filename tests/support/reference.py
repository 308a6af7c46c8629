"""What transformers itself answers: the definition of a correct caption."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
from transformers import AutoProcessor, BlipForConditionalGeneration
from transformers.image_utils import load_image

# Options in the tests' matrix, by the names generate() and our API share.
OPTION_NAMES = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "repetition_penalty",
                "num_return_sequences", "no_repeat_ngram_size")
SERVICE_DEFAULTS = {"num_beams": 3, "max_new_tokens": 20, "min_new_tokens": 5}


@functools.lru_cache(maxsize=8)
def load(checkpoint: str):
    model = BlipForConditionalGeneration.from_pretrained(checkpoint).eval()
    return model, AutoProcessor.from_pretrained(checkpoint)


def pipeline_image(data: bytes):
    """The image as the transformers pipeline loads it (EXIF orientation applied, RGB)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "image"
        path.write_bytes(data)
        return load_image(str(path))


def caption(checkpoint: str, image: bytes, prompt: str | None = None, **options) -> tuple[list[str], list[float]]:
    """Captions and scores of an encoded image, through the pipeline's loading and the checkpoint's processor."""
    _, processor = load(checkpoint)
    inputs = processor(images=pipeline_image(image), text=prompt, return_tensors="pt")
    return generate(checkpoint, inputs, **options)


def generate(checkpoint: str, inputs: dict, **options) -> tuple[list[str], list[float]]:
    """Captions and scores from BlipForConditionalGeneration.generate, service defaults for unset options.

    Scores: beam search reports `sequences_scores`; for greedy decoding the sum of the token log-probabilities
    (`compute_transition_scores(normalize_logits=True)`) over generated length ** length_penalty.
    """
    model, processor = load(checkpoint)
    options = {**SERVICE_DEFAULTS, **options}
    with torch.inference_mode():
        out = model.generate(**inputs, **options, output_scores=True, return_dict_in_generate=True)
    texts = processor.batch_decode(out.sequences, skip_special_tokens=True)
    if options["num_beams"] > 1:
        return texts, out.sequences_scores.tolist()
    transitions = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    length = transitions.shape[1]
    return texts, [float(transitions[0].sum()) / length ** options.get("length_penalty", 1.0)]
