"""Triton Python model `text_decoder`: image embeddings + prompt ids + resolved options -> captions and scores.

Inputs (per item): IMAGE_EMBEDS FP32 [L, hidden]; PROMPT_IDS INT64 [P] (BOS first, -1 entries are padding);
GENERATION_OPTIONS BYTES [1] (JSON, as `preprocess` resolves it).
Outputs (per item): CAPTIONS BYTES [K], SCORES FP32 [K], best first (K = num_return_sequences).

All items of all requests in a batch are decoded together in one loop, whatever their options. Options are
validated again here (the model may be called directly); a request with a bad one is answered with its own
INVALID_ARG error, and a request its client cancelled stops decoding and is answered CANCELLED.
"""

import json
import os
import time
import traceback
from pathlib import Path

import numpy as np

# OpenMP threads that wait sleep instead of spinning: the encoder and preprocess share the cores with this model,
# and spinning threads of two processes on the same cores slow both down many times over.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402  (reads OMP_WAIT_POLICY when it loads)
import triton_python_backend_utils as pb_utils

from blip_text_decoder import BlipTextDecoder
from caption_generation import generate
from caption_text import CaptionDecoder
from generation_options import GenerationLimits, GenerationOptions, OptionError, from_parameters


_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class _BadRequest(Exception):
    pass


def _deadline(request) -> float | None:
    """The caller's deadline, if the request carries one: the `deadline_unix_ms` request parameter.

    Triton hands a cancellation to an ensemble's next step only, never to the step already running, so the
    gateway also sends its caller's deadline; decoding stops once it has passed (the answer is unwanted).
    """
    try:
        value = json.loads(request.parameters() or "{}").get("deadline_unix_ms")
    except (ValueError, AttributeError):
        return None
    return float(value) / 1000.0 if isinstance(value, (int, float)) else None


def _gone(request, deadline: float | None) -> bool:
    return (deadline is not None and time.time() > deadline) or request.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        directory = Path(args["model_repository"]) / args["model_version"]
        threads = int(params.get("threads") or 0) or len(os.sched_getaffinity(0))
        torch.set_num_threads(threads)
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            if not torch.cuda.is_available():
                raise RuntimeError(f"text_decoder: a GPU instance needs a CUDA build of torch and a visible GPU; "
                                   f"torch {torch.__version__} sees none")
            device = f"cuda:{args['model_instance_device_id']}"
        dtype = _DTYPES.get(params.get("dtype") or "float32")
        if dtype is None or (dtype is torch.float16 and device == "cpu"):
            raise RuntimeError(f"text_decoder: dtype {params.get('dtype')!r} is not float32, or float16 on a GPU")
        self.decoder = BlipTextDecoder.from_directory(directory, device=device, dtype=dtype)
        decoding = json.loads((directory / "decoding.json").read_text())
        self.texts = CaptionDecoder(directory / "tokenizer.json", decoding["clean_up_tokenization_spaces"])
        self.limits = from_parameters(GenerationLimits, params, "limit_")
        self.bos = self.decoder.config.bos_token_id

    def execute(self, requests):
        items, owners, errors = [], [], [None] * len(requests)
        for r, request in enumerate(requests):
            try:
                parsed = self._parse(request)
            except _BadRequest as exc:
                errors[r] = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                continue
            except Exception:  # a malformed direct call must not take its batch down
                pb_utils.Logger.log_error(f"text_decoder: unreadable request:\n{traceback.format_exc()}")
                errors[r] = pb_utils.TritonError("the request's tensors could not be read", pb_utils.TritonError.INVALID_ARG)
                continue
            items.extend(parsed)
            owners.extend([r] * len(parsed))

        results = []
        if items:
            deadlines = [_deadline(request) for request in requests]
            gone = lambda i: _gone(requests[owners[i]], deadlines[owners[i]])  # noqa: E731
            try:
                results = self._generate(items, gone)
            except Exception:  # noqa: BLE001 - find the request that fails; the others are answered
                pb_utils.Logger.log_error(f"text_decoder: a batch failed, decoding its requests one by one:\n"
                                          f"{traceback.format_exc()}")
                results = []
                for r in range(len(requests)):
                    mine = [i for i, owner in enumerate(owners) if owner == r]
                    try:
                        results += self._generate([items[i] for i in mine], lambda j: gone(mine[j]))
                    except Exception:  # noqa: BLE001
                        pb_utils.Logger.log_error(f"text_decoder: a request failed:\n{traceback.format_exc()}")
                        errors[r] = pb_utils.TritonError("decoding failed; the server log has the details",
                                                         pb_utils.TritonError.INTERNAL)
                        results += [[] for _ in mine]

        per_request = [[] for _ in requests]
        for owner, hypotheses in zip(owners, results):
            if errors[owner] is not None:
                continue
            if hypotheses is None:
                pb_utils.Logger.log_info("text_decoder: stopped decoding a request: cancelled or past its deadline")
                errors[owner] = pb_utils.TritonError(
                    "the request was cancelled or its deadline passed", pb_utils.TritonError.CANCELLED
                )
            per_request[owner].append(hypotheses)

        responses = []
        for request_results, error in zip(per_request, errors):
            if error is None:
                try:
                    responses.append(self._answer(request_results))
                    continue
                except Exception:  # noqa: BLE001
                    pb_utils.Logger.log_error(f"text_decoder: a request failed:\n{traceback.format_exc()}")
                    error = pb_utils.TritonError("decoding failed; the server log has the details",
                                                 pb_utils.TritonError.INTERNAL)
            responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        return responses

    def _answer(self, request_results):
        captions = [self.texts([h.tokens for h in hypotheses]) for hypotheses in request_results]
        scores = [[h.score for h in hypotheses] for hypotheses in request_results]
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("CAPTIONS", np.array([[c.encode("utf-8") for c in row] for row in captions], dtype=np.object_)),
            pb_utils.Tensor("SCORES", np.array(scores, dtype=np.float32)),
        ])

    def _generate(self, items, is_cancelled):
        return generate(
            self.decoder,
            torch.from_numpy(np.stack([embeds for embeds, _, _ in items])),
            [prompt for _, prompt, _ in items],
            [options for _, _, options in items],
            is_cancelled=is_cancelled,
        )

    def _parse(self, request) -> list[tuple[np.ndarray, list[int], GenerationOptions]]:
        embeds = pb_utils.get_input_tensor_by_name(request, "IMAGE_EMBEDS").as_numpy()
        count = len(embeds)
        hidden = self.decoder.config.encoder_hidden_size
        if embeds.ndim != 3 or embeds.shape[2] != hidden or embeds.dtype != np.float32:
            raise _BadRequest(f"IMAGE_EMBEDS must be float32 [L, {hidden}] per item; got {embeds.dtype} "
                              f"{list(embeds.shape[1:])}")
        prompt_ids = pb_utils.get_input_tensor_by_name(request, "PROMPT_IDS").as_numpy()
        options = pb_utils.get_input_tensor_by_name(request, "GENERATION_OPTIONS").as_numpy().reshape(-1)
        if prompt_ids.ndim != 2 or len(prompt_ids) != count or len(options) != count:
            raise _BadRequest(f"PROMPT_IDS and GENERATION_OPTIONS must have one entry per item ({count})")
        parsed = []
        for i in range(count):
            where = f"item {i}: " if count > 1 else ""
            prompt = [int(t) for t in prompt_ids[i] if t >= 0]
            if not prompt or prompt[0] != self.bos or max(prompt) >= self.decoder.config.vocab_size:
                raise _BadRequest(f"{where}PROMPT_IDS must start with BOS ({self.bos}) and hold token ids "
                                  f"below {self.decoder.config.vocab_size}")
            try:
                item_options = GenerationOptions.from_json(bytes(options[i]))
                item_options.validate(self.limits, len(prompt), self.decoder.config.max_position_embeddings)
            except OptionError as exc:
                raise _BadRequest(f"{where}{exc}") from None
            parsed.append((embeds[i], prompt, item_options))
        counts = {item_options.num_return_sequences for _, _, item_options in parsed}
        if len(counts) > 1:
            raise _BadRequest("all items of one request must ask for the same num_return_sequences")
        return parsed
