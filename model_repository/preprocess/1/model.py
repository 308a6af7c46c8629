"""Triton Python model `preprocess`: encoded image + optional prompt -> pixel values + decoder prompt ids.

Inputs (per item): IMAGE BYTES [1], PROMPT BYTES [1] (optional, UTF-8).
Outputs (per item): PIXEL_VALUES FP32 [3, H, W]; PROMPT_IDS INT64 [P] (BOS first; right-padded with -1 when
the items of one request have prompts of different lengths).

Images of a batch are decoded and resized on a thread pool (Pillow releases the GIL). A request whose image or
prompt is bad is answered with its own INVALID_ARG error; the other requests of the batch are unaffected.
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from image_preprocessing import ImageError, ImageProcessorConfig, preprocess
from prompt_tokens import PromptError, PromptTokenizer


def _parameter(config: dict, name: str, default: int) -> int:
    value = config.get("parameters", {}).get(name, {}).get("string_value", "")
    return int(value) if value else default


class _BadRequest(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        directory = Path(args["model_repository"]) / args["model_version"]
        settings = json.loads((directory / "preprocess.json").read_text())
        self.image_config = ImageProcessorConfig.from_json(directory / "image_processor.json")
        self.max_pixels = _parameter(config, "max_image_pixels", 64_000_000)
        self.prompts = PromptTokenizer(
            directory / "tokenizer.json",
            bos_token_id=settings["bos_token_id"],
            max_tokens=_parameter(config, "max_prompt_tokens", 64),
        )
        threads = _parameter(config, "threads", 0) or len(os.sched_getaffinity(0))
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="preprocess")

    def execute(self, requests):
        jobs = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
            prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT")
            prompts = prompt.as_numpy().reshape(-1) if prompt is not None else [None] * len(images)
            jobs.append(self.pool.submit(self._prepare, list(images), list(prompts)))
        responses = []
        for job in jobs:
            try:
                pixels, prompt_ids = job.result()
            except _BadRequest as exc:
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                    )
                )
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("PIXEL_VALUES", pixels), pb_utils.Tensor("PROMPT_IDS", prompt_ids)]
                )
            )
        return responses

    def _prepare(self, images: list, prompts: list) -> tuple[np.ndarray, np.ndarray]:
        if len(prompts) != len(images):
            raise _BadRequest(f"PROMPT has {len(prompts)} items but IMAGE has {len(images)}")
        pixels, ids = [], []
        for index, (image, prompt) in enumerate(zip(images, prompts)):
            where = f"item {index}: " if len(images) > 1 else ""
            try:
                text = None if prompt is None else bytes(prompt).decode("utf-8")
            except UnicodeDecodeError:
                raise _BadRequest(f"{where}PROMPT is not valid UTF-8") from None
            try:
                pixels.append(preprocess(bytes(image), self.image_config, self.max_pixels))
                ids.append(self.prompts(text))
            except (ImageError, PromptError) as exc:
                raise _BadRequest(f"{where}{exc}") from None
        width = max(len(i) for i in ids)
        prompt_ids = np.full((len(ids), width), -1, dtype=np.int64)
        for row, i in enumerate(ids):
            prompt_ids[row, : len(i)] = i
        return np.stack(pixels), prompt_ids

    def finalize(self):
        self.pool.shutdown(wait=True)
