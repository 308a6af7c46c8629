"""The `blip_caption` ensemble seen from a client: its tensors, building a request, reading the answer.

Each generation option's ensemble input (its tensor and datatype) comes from its declaration
(`blip_server.shared.generation_options.OPTIONS`); the gateway, the tests and the benchmark all build their
Triton requests here.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from blip_server.shared.generation_options import REQUEST_OPTIONS, Option

MODEL = "blip_caption"
# The same ensemble with Triton's response cache: what the gateway sends deterministic requests to (beam search,
# greedy, or sampling with a seed), so that a repeated one is answered from the cache without running any model.
# `blip_caption` itself caches nothing: an unseeded sample sent there is always sampled afresh. blip-export
# writes this one from `blip_caption`'s config (`model_configs.write_cached_ensemble`).
CACHED_MODEL = "blip_caption_cached"
# The parameter of the default ensemble's config that lists every model a Triton serves, as JSON: a list of
# {"name", "ensemble", "cached_ensemble", "preprocess"}, the default first (`blip_server.served_models` writes
# it). A repository without it (one export, served as it was exported) serves one model, `blip_caption`.
CATALOG_PARAMETER = "served_models"

# Triton datatype -> numpy dtype, for the datatypes options are declared with.
NUMPY_DTYPES: dict[str, type[np.generic]] = {"BOOL": np.bool_, "INT32": np.int32, "INT64": np.int64,
                                             "FP32": np.float32}
OPTIONS_BY_NAME = {o.name: o for o in REQUEST_OPTIONS}


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
           **options: object) -> list[Any]:
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
        if value is not None:
            tensors.append(option_tensor(module, OPTIONS_BY_NAME[field], value, count))
    return tensors


def option_tensor(module: ModuleType, option: Option, value: object, count: int) -> Any:
    """The input of one option for a request of `count` items: [count, 1], or [count, values] when repeated."""
    dtype = NUMPY_DTYPES[option.dtype]
    if option.repeated:
        values = np.array([list(value)] * count, dtype=dtype).reshape(count, -1)  # type: ignore[call-overload]
    else:
        values = np.full((count, 1), value, dtype=dtype)
    return _tensor(module, option.tensor, option.dtype, values)


def outputs(module: ModuleType) -> list[Any]:
    return [module.InferRequestedOutput("CAPTIONS"), module.InferRequestedOutput("SCORES")]


def captions(result: Any) -> list[list[CaptionText]]:
    """Per item of the request (a tritonclient `InferResult`, untyped): its captions, best first."""
    texts, scores = result.as_numpy("CAPTIONS"), result.as_numpy("SCORES")
    return [
        [CaptionText(t.decode("utf-8"), float(s)) for t, s in zip(row, score_row, strict=True)]
        for row, score_row in zip(texts, scores, strict=True)
    ]
