"""The `blip_caption` ensemble seen from a client: its tensors, building a request, reading the answer.

One table maps each generation option to its ensemble input; the gateway, the tests and the benchmark all
build their Triton requests here, and a unit test checks the table against the ensemble's config.pbtxt.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

MODEL = "blip_caption"

# Generation option -> (ensemble input, Triton datatype, numpy dtype).
OPTION_TENSORS = {
    "num_beams": ("NUM_BEAMS", "INT32", np.int32),
    "max_new_tokens": ("MAX_NEW_TOKENS", "INT32", np.int32),
    "min_new_tokens": ("MIN_NEW_TOKENS", "INT32", np.int32),
    "length_penalty": ("LENGTH_PENALTY", "FP32", np.float32),
    "repetition_penalty": ("REPETITION_PENALTY", "FP32", np.float32),
    "num_return_sequences": ("NUM_RETURN_SEQUENCES", "INT32", np.int32),
    "no_repeat_ngram_size": ("NO_REPEAT_NGRAM_SIZE", "INT32", np.int32),
    "do_sample": ("DO_SAMPLE", "BOOL", np.bool_),
    "temperature": ("TEMPERATURE", "FP32", np.float32),
    "top_k": ("TOP_K", "INT32", np.int32),
    "top_p": ("TOP_P", "FP32", np.float32),
    "seed": ("SEED", "INT64", np.int64),
}


@dataclass(frozen=True)
class CaptionText:
    text: str
    score: float


def _tensor(module: ModuleType, name: str, datatype: str, values: npt.NDArray[np.generic]) -> Any:
    """A tritonclient `InferInput` (untyped) holding `values`."""
    tensor = module.InferInput(name, list(values.shape), datatype)
    tensor.set_data_from_numpy(values)
    return tensor


def inputs(module: ModuleType, images: bytes | list[bytes], prompt: str | list[str] | None = None,
           **options: bool | int | float | None) -> list[Any]:
    """Inputs of one request for `module` (tritonclient.grpc or tritonclient.grpc.aio).

    A list of images makes a request with that many items; options are the same for all of them. Options that
    are None are left out (the server's defaults apply).
    """
    images = [images] if isinstance(images, bytes) else list(images)
    count = len(images)
    tensors = [_tensor(module, "IMAGE", "BYTES", np.array([[i] for i in images], dtype=np.object_))]
    if prompt is not None:
        prompts = [prompt] * count if isinstance(prompt, str) else list(prompt)
        tensors.append(_tensor(module, "PROMPT", "BYTES", np.array([[p.encode()] for p in prompts], dtype=np.object_)))
    for field, value in options.items():
        if value is None:
            continue
        name, datatype, dtype = OPTION_TENSORS[field]
        tensors.append(_tensor(module, name, datatype, np.full((count, 1), value, dtype=dtype)))
    return tensors


def outputs(module: ModuleType) -> list[Any]:
    return [module.InferRequestedOutput("CAPTIONS"), module.InferRequestedOutput("SCORES")]


def captions(result: Any) -> list[list[CaptionText]]:
    """Per item of the request (a tritonclient `InferResult`, untyped): its captions, best first."""
    texts, scores = result.as_numpy("CAPTIONS"), result.as_numpy("SCORES")
    return [
        [CaptionText(t.decode("utf-8"), float(s)) for t, s in zip(row, score_row, strict=True)]
        for row, score_row in zip(texts, scores, strict=True)
    ]
