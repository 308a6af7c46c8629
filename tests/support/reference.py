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


def generate(checkpoint: str, inputs: dict, seed: int | None = None, generation_config=None,
             **options) -> tuple[list[str], list[float]]:
    """Captions and scores from BlipForConditionalGeneration.generate, service defaults for unset options.

    A seed means what it means in transformers: `torch.manual_seed(seed)` right before `generate()`. With a
    `generation_config` (the checkpoint's), the service's defaults fill in only what it leaves unset.

    Scores: beam search reports `sequences_scores`; for greedy decoding and sampling the sum of each sequence's
    token log-probabilities (`compute_transition_scores(normalize_logits=True)`, of the processed
    distribution) over its generated length ** length_penalty, best first.
    """
    model, processor = load(checkpoint)
    if generation_config is not None:
        config = generation_config.to_diff_dict()
        options = {**{k: v for k, v in SERVICE_DEFAULTS.items()
                      if k not in config and not (k == "max_new_tokens" and "max_length" in config)
                      and not (k == "min_new_tokens" and "min_length" in config)}, **options}
        options["generation_config"] = generation_config
    else:
        options = {**SERVICE_DEFAULTS, **options}
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(**inputs, **options, output_scores=True, return_dict_in_generate=True)
    texts = processor.batch_decode(out.sequences, skip_special_tokens=True)
    beams = options.get("num_beams", getattr(generation_config, "num_beams", 1) or 1)
    if beams > 1:
        return texts, out.sequences_scores.tolist()
    transitions = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    eos = model.config.text_config.sep_token_id
    penalty = options.get("length_penalty", getattr(generation_config, "length_penalty", 1.0) or 1.0)
    scores = []
    for row, sequence in zip(transitions, out.sequences, strict=True):
        generated = sequence[-transitions.shape[1]:].tolist()  # a finished row is padded after its end
        length = generated.index(eos) + 1 if eos in generated else len(generated)
        scores.append(float(row[:length].sum()) / length ** penalty)
    order = sorted(range(len(texts)), key=lambda i: -scores[i])
    return [texts[i] for i in order], [scores[i] for i in order]
