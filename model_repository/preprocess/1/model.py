"""Triton Python model `preprocess`: one caption request -> what the encoder and the decoder need.

Inputs (one image per request: `max_batch_size: 1`, so each execution holds one request): IMAGE BYTES [1];
PROMPT BYTES [1] (optional, UTF-8); the generation options listed in docs/tensors.md (each optional, [1]).
Outputs: PIXEL_VALUES FP32 [3, H, W]; PROMPT_IDS INT64 [P] (BOS first); GENERATION_OPTIONS BYTES [1] (the options
with defaults filled in, as JSON).

Options are resolved and validated first, and the prompt's length checked in bytes before it is tokenised, so a
bad request is refused before any image work; the image's size is checked from its header before it is decoded,
and an instance decodes one image at a time (two instances in config.pbtxt: two images at once). A bad request
is answered with its own INVALID_ARG error, and any other failure while handling a request with its own INTERNAL
error: requests are answered one by one, each on its own.

Limits come from the config's parameters; `BLIP_MAX_IMAGE_PIXELS`, `BLIP_MAX_IMAGE_SIDE` and
`BLIP_MAX_PROMPT_BYTES` in Triton's environment override them (`blip-serve` passes its flags that way).
"""

import ctypes
import json
import os
import time
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from generation_options import REQUEST_OPTIONS, GenerationLimits, GenerationOptions, OptionError, from_parameters
from image_preprocessing import ImageError, ImageLimits, ImageProcessorConfig, preprocess
from prompt_tokens import PromptError, PromptTokenizer


def _glibc():
    """glibc's C library, or None elsewhere (musl, macOS), where the allocator keeps its own settings."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both are glibc's
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()
# This process decodes images of every size: buffers of 1 MiB or more (a decoded 640x480 photo, a resized copy)
# are mmapped and go back to the system when freed, instead of the heap that tritonserver's 4 MiB setting
# (blip_server.memory) leaves them to. Measured in a soak: this stub's memory at rest +3 MB in 4 minutes with it,
# +17 MB in 2 without.
if _LIBC is not None:
    _LIBC.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


class _BadRequest(Exception):
    pass


def _limit(params: dict, name: str, default: int) -> int:
    """A limit: BLIP_<NAME> in the environment, else the config parameter <name>, else the default."""
    return int(os.environ.get(f"BLIP_{name.upper()}") or params.get(name) or default)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        directory = Path(args["model_repository"]) / args["model_version"]
        settings = json.loads((directory / "preprocess.json").read_text())
        self.image_config = ImageProcessorConfig.from_json(directory / "image_processor.json")
        self.image_limits = ImageLimits(max_pixels=_limit(params, "max_image_pixels", ImageLimits.max_pixels),
                                        max_side=_limit(params, "max_image_side", ImageLimits.max_side))
        self.max_prompt_bytes = _limit(params, "max_prompt_bytes", 2048)
        self.max_positions = settings["max_position_embeddings"]
        self.prompts = PromptTokenizer(
            directory / "tokenizer.json",
            bos_token_id=settings["bos_token_id"],
            max_tokens=int(params.get("max_prompt_tokens") or 64),
        )
        self.defaults = from_parameters(GenerationOptions, params, "default_")
        # A checkpoint that counts lengths in total tokens: what is left for new ones depends on the prompt.
        self.max_length = int(params.get("default_max_length") or 0)
        self.min_length = int(params.get("default_min_length") or 0)
        self.limits = from_parameters(GenerationLimits, params, "limit_")
        self._trimmed_at = time.monotonic()

    def execute(self, requests):
        """One response per request (Triton hands over one at a time: max_batch_size 1), each on its own."""
        responses = []
        for request in requests:
            try:
                names = ("PIXEL_VALUES", "PROMPT_IDS", "GENERATION_OPTIONS")
                tensors = [pb_utils.Tensor(n, o) for n, o in zip(names, self._prepare(request), strict=True)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except _BadRequest as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
            except Exception:  # noqa: BLE001 - one request's failure is its own
                pb_utils.Logger.log_error(f"preprocess: a request failed:\n{traceback.format_exc()}")
                error = pb_utils.TritonError("preprocessing failed; the server log has the details",
                                             pb_utils.TritonError.INTERNAL)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        self._trim()
        return responses

    def _trim(self) -> None:
        """Once a second at most, give the heaps' free memory back: decoding images of every size fragments them,
        and without this the process keeps the high-water mark of its busiest moment."""
        if _LIBC is not None and time.monotonic() - self._trimmed_at >= 1.0:
            _LIBC.malloc_trim(0)
            self._trimmed_at = time.monotonic()

    def _prepare(self, request):
        """The request's (pixel values [1, 3, H, W], prompt ids [1, P], resolved options [1, 1]); raises _BadRequest
        for what the caller must change."""
        images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
        if len(images) != 1:
            raise _BadRequest(f"IMAGE holds {len(images)} images; send one per request")
        prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT")
        given = {}
        for option in REQUEST_OPTIONS:
            tensor = pb_utils.get_input_tensor_by_name(request, option.tensor)
            if tensor is not None:
                values = tensor.as_numpy().reshape(-1).tolist()
                if option.repeated:
                    given[option.name] = tuple(map(option.kind, values))
                elif len(values) != 1:
                    raise _BadRequest(f"{option.tensor} holds {len(values)} values; send one")
                else:
                    given[option.name] = option.kind(values[0])
        try:
            raw = None if prompt is None else bytes(prompt.as_numpy().reshape(-1)[0])
            if raw is not None and len(raw) > self.max_prompt_bytes:
                raise PromptError(f"the prompt is {len(raw)} bytes long; the limit is {self.max_prompt_bytes}")
            ids = self.prompts(None if raw is None else raw.decode("utf-8"))
            resolved = self._resolve(given, len(ids))
            resolved.validate(self.limits, len(ids), self.max_positions)
        except UnicodeDecodeError:
            raise _BadRequest("PROMPT is not valid UTF-8") from None
        except (PromptError, OptionError) as exc:
            raise _BadRequest(str(exc)) from None
        try:
            pixels = preprocess(bytes(images[0]), self.image_config, self.image_limits)
        except ImageError as exc:
            raise _BadRequest(str(exc)) from None
        return (pixels[None], np.array([ids], dtype=np.int64),
                np.array([[resolved.to_json().encode()]], dtype=np.object_))

    def _resolve(self, given: dict, prompt_tokens: int) -> GenerationOptions:
        """The request's options over the defaults; lengths the checkpoint counts in total tokens become new tokens
        for this prompt, and a default min_new_tokens never exceeds max_new_tokens (transformers would stop at
        the maximum anyway)."""
        resolved = self.defaults.with_values(**given)
        derived = {}
        if self.max_length and "max_new_tokens" not in given:
            if self.max_length <= prompt_tokens:
                raise OptionError(f"the prompt is {prompt_tokens} tokens long and the checkpoint's max_length "
                                  f"({self.max_length} tokens in all) leaves no room: set max_new_tokens")
            derived["max_new_tokens"] = self.max_length - prompt_tokens
        if self.min_length and "min_new_tokens" not in given:
            derived["min_new_tokens"] = max(0, self.min_length - prompt_tokens)
        resolved = resolved.with_values(**derived)
        if "min_new_tokens" not in given and resolved.min_new_tokens > resolved.max_new_tokens:
            resolved = resolved.with_values(min_new_tokens=resolved.max_new_tokens)
        return resolved

    def finalize(self):
        pass
