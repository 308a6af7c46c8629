"""Requests to the `blip_caption` ensemble with tritonclient, as a Triton-native client sends them."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient

# Option name -> (ensemble input, Triton datatype, numpy dtype)
OPTIONS = {
    "num_beams": ("NUM_BEAMS", "INT32", np.int32),
    "max_new_tokens": ("MAX_NEW_TOKENS", "INT32", np.int32),
    "min_new_tokens": ("MIN_NEW_TOKENS", "INT32", np.int32),
    "num_return_sequences": ("NUM_RETURN_SEQUENCES", "INT32", np.int32),
    "length_penalty": ("LENGTH_PENALTY", "FP32", np.float32),
    "repetition_penalty": ("REPETITION_PENALTY", "FP32", np.float32),
    "no_repeat_ngram_size": ("NO_REPEAT_NGRAM_SIZE", "INT32", np.int32),
    "top_k": ("TOP_K", "INT32", np.int32),
    "seed": ("SEED", "INT64", np.int64),
    "do_sample": ("DO_SAMPLE", "BOOL", np.bool_),
    "temperature": ("TEMPERATURE", "FP32", np.float32),
    "top_p": ("TOP_P", "FP32", np.float32),
}


def _tensor(name: str, datatype: str, values: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(values.shape), datatype)
    tensor.set_data_from_numpy(values)
    return tensor


def caption_inputs(images: bytes | list[bytes], prompt: str | list[str] | None = None, **options):
    """Inputs for one request; a list of images makes a request with that many items."""
    images = [images] if isinstance(images, bytes) else images
    count = len(images)
    inputs = [_tensor("IMAGE", "BYTES", np.array([[i] for i in images], dtype=np.object_))]
    if prompt is not None:
        prompts = [prompt] * count if isinstance(prompt, str) else prompt
        inputs.append(_tensor("PROMPT", "BYTES", np.array([[p.encode()] for p in prompts], dtype=np.object_)))
    for name, value in options.items():
        tensor, datatype, dtype = OPTIONS[name]
        inputs.append(_tensor(tensor, datatype, np.full((count, 1), value, dtype=dtype)))
    return inputs


def captions(result) -> list[tuple[list[str], list[float]]]:
    """Per item: (captions best first, scores)."""
    texts, scores = result.as_numpy("CAPTIONS"), result.as_numpy("SCORES")
    return [([t.decode() for t in row], [float(s) for s in score_row]) for row, score_row in zip(texts, scores)]
