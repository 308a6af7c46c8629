"""Triton Python model `preprocess`: one caption request -> what the encoder and the decoder need.

Inputs (per item): IMAGE BYTES [1]; PROMPT BYTES [1] (optional, UTF-8); the generation options listed in docs/tensors.md
(each optional, [1]).
Outputs (per item): PIXEL_VALUES FP32 [3, H, W]; PROMPT_IDS INT64 [P] (BOS first; right-padded with -1 when
the items of one request have prompts of different lengths); GENERATION_OPTIONS BYTES [1] (the options with
defaults filled in, as JSON).

Options are resolved and validated first, and the prompt's length checked in bytes before it is tokenised, so a
bad request is refused before any image work; images of a batch are decoded and resized on a thread pool (Pillow
releases the GIL), each image's size checked from its header first and its decoding waiting for room in the
instance's decode budget. A bad request is answered with its own INVALID_ARG error, and any other failure while
handling one request with its own INTERNAL error: the other requests of the batch are unaffected.

Limits come from the config's parameters; `BLIP_MAX_IMAGE_PIXELS`, `BLIP_MAX_IMAGE_SIDE` and
`BLIP_MAX_PROMPT_BYTES` in Triton's environment override them (`blip-serve` passes its flags that way).
"""

import ctypes
import json
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from cpu_turns import available_cores
from generation_options import REQUEST_OPTIONS, GenerationLimits, GenerationOptions, OptionError, from_parameters
from image_preprocessing import DecodeBudget, ImageError, ImageLimits, ImageProcessorConfig, preprocess
from prompt_tokens import PromptError, PromptTokenizer

_LIBC = ctypes.CDLL("libc.so.6")
# This process decodes images of every size: buffers of 1 MiB or more (a decoded 640x480 photo, a resized copy)
# are mmapped and go back to the system when freed, instead of the heap that tritonserver's 4 MiB setting
# (blip_server.memory) leaves them to. Measured in a soak: this stub's memory at rest +3 MB in 4 minutes with it,
# +17 MB in 2 without.
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
        self.budget = DecodeBudget(_limit(params, "decode_budget_bytes", 1 << 30))
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
        threads = int(params.get("threads") or 0) or available_cores()
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="preprocess")
        self._trimmed_at = time.monotonic()

    def execute(self, requests):
        jobs = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
            prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT")
            prompts = list(prompt.as_numpy().reshape(-1)) if prompt is not None else [None] * len(images)
            options = {}
            for option in REQUEST_OPTIONS:
                tensor = pb_utils.get_input_tensor_by_name(request, option.tensor)
                if tensor is not None:
                    values = tensor.as_numpy()
                    options[option.name] = ([tuple(map(option.kind, row)) for row in values.reshape(len(values), -1)
                                             .tolist()] if option.repeated
                                            else [option.kind(v) for v in values.reshape(-1).tolist()])
            jobs.append(self.pool.submit(self._prepare, list(images), prompts, options))
        responses = []
        for job in jobs:
            try:
                outputs = job.result()
            except _BadRequest as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            except Exception:  # noqa: BLE001 - one request's failure must not fail its batch
                pb_utils.Logger.log_error(f"preprocess: a request failed:\n{traceback.format_exc()}")
                error = pb_utils.TritonError("preprocessing failed; the server log has the details",
                                             pb_utils.TritonError.INTERNAL)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            names = ("PIXEL_VALUES", "PROMPT_IDS", "GENERATION_OPTIONS")
            tensors = [pb_utils.Tensor(n, o) for n, o in zip(names, outputs, strict=True)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        self._trim()
        return responses

    def _trim(self) -> None:
        """Once a second at most, give the heaps' free memory back: decoding images of every size fragments them,
        and without this the process keeps the high-water mark of its busiest moment."""
        if time.monotonic() - self._trimmed_at >= 1.0:
            _LIBC.malloc_trim(0)
            self._trimmed_at = time.monotonic()

    def _prepare(self, images: list, prompts: list, options: dict[str, list]):
        count = len(images)
        option_values = [(o.tensor, options[o.name]) for o in REQUEST_OPTIONS if o.name in options]
        for name, values in [("PROMPT", prompts)] + option_values:
            if len(values) != count:
                raise _BadRequest(f"{name} has {len(values)} values for {count} images")
        items = []
        for i in range(count):
            where = f"item {i}: " if count > 1 else ""
            try:
                raw = None if prompts[i] is None else bytes(prompts[i])
                if raw is not None and len(raw) > self.max_prompt_bytes:
                    raise PromptError(f"the prompt is {len(raw)} bytes long; the limit is {self.max_prompt_bytes}")
                text = None if raw is None else raw.decode("utf-8")
                ids = self.prompts(text)
                given = {field: values[i] for field, values in options.items()}
                resolved = self._resolve(given, len(ids))
                resolved.validate(self.limits, len(ids), self.max_positions)
            except UnicodeDecodeError:
                raise _BadRequest(f"{where}PROMPT is not valid UTF-8") from None
            except (PromptError, OptionError) as exc:
                raise _BadRequest(f"{where}{exc}") from None
            items.append((ids, resolved))
        if len({resolved.num_return_sequences for _, resolved in items}) > 1:
            raise _BadRequest("all images of one request must ask for the same num_return_sequences")
        pixels = []
        for i, image in enumerate(images):
            try:
                pixels.append(preprocess(bytes(image), self.image_config, self.image_limits, self.budget))
            except ImageError as exc:
                raise _BadRequest(f"item {i}: {exc}" if count > 1 else str(exc)) from None
        width = max(len(ids) for ids, _ in items)
        prompt_ids = np.full((count, width), -1, dtype=np.int64)
        for row, (ids, _) in enumerate(items):
            prompt_ids[row, : len(ids)] = ids
        resolved = np.array([[r.to_json().encode()] for _, r in items], dtype=np.object_)
        return np.stack(pixels), prompt_ids, resolved

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
        self.pool.shutdown(wait=True)
