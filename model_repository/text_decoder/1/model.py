"""Triton Python model `text_decoder`: image embeddings + prompt ids + resolved options -> captions and scores.

Inputs (one item per request): IMAGE_EMBEDS FP32 [L, hidden]; PROMPT_IDS INT64 [P] (BOS first, -1 entries are
padding); GENERATION_OPTIONS BYTES [1] (JSON, as `preprocess` resolves it).
Outputs: CAPTIONS BYTES [K], SCORES FP32 [K], best first (K = num_return_sequences).

In-flight batching with Triton's iterative sequence batcher (`sequence_batching { iterative_sequence: true }`):
each `execute()` is one step of a `DecodeLoop` holding every request in flight. A request Triton hands over for
the first time joins the loop (keyed by its `correlation_id()`); an unfinished one is handed back to Triton to be
scheduled again (`TRITONSERVER_REQUEST_RELEASE_RESCHEDULE`, `None` in its place), and a finished one is answered.
Triton forms the next batch from the handed-back requests and new ones at once, so a short caption never waits
behind a long one. The ensemble calls this model with plain requests; clients need no sequence controls.

Options are validated again here (the model may be called directly); a request with a bad one is answered with
its own INVALID_ARG error, one its client cancelled or whose deadline passed leaves the loop and is answered
CANCELLED, and any other failure is that request's INTERNAL error. Rows decoded per step, steps and requests in
flight are exported as Triton metrics (`blip_decoder_*` on Triton's metrics port).
"""

import json
import time
import traceback
from pathlib import Path

import numpy as np

# OpenMP's default wait policy (spin briefly, then sleep): a step holds the cores alone (cpu_turns.py), and making
# idle threads sleep at once (OMP_WAIT_POLICY=PASSIVE) woke them for every operator: on BLIP-large, a request's
# first step took 554 ms instead of 318 and the others 75 ms instead of 70.
import torch
import triton_python_backend_utils as pb_utils

from blip_text_decoder import BlipTextDecoder, exact_float32, placement
from caption_generation import DecodeLoop
from caption_text import CaptionDecoder
from cpu_turns import CpuTurns, available_cores
from generation_options import GenerationLimits, GenerationOptions, OptionError, from_parameters

# A request that Triton has not handed back for this long is dropped from the loop (it cannot be answered).
_ABANDONED_AFTER = 300.0


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


def _error(message: str, code) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class _Metrics:
    """Triton custom metrics; the families must outlive their metrics, so both are kept."""

    def __init__(self):
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self.families = [
            pb_utils.MetricFamily("blip_decoder_rows", "Decoder rows (beams, samples) decoded, summed over steps; "
                                  "divided by blip_decoder_steps: rows per step", counter),
            pb_utils.MetricFamily("blip_decoder_steps", "Decode steps run", counter),
            pb_utils.MetricFamily("blip_decoder_requests_in_flight", "Requests in the decode loop", gauge),
        ]
        self.rows, self.steps, self.in_flight = (family.Metric() for family in self.families)

    def record(self, rows: int, in_flight: int) -> None:
        try:
            self.rows.increment(rows)
            self.steps.increment(1)
            self.in_flight.set(in_flight)
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            pb_utils.Logger.log_warn(f"text_decoder: metrics not recorded:\n{traceback.format_exc()}")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        directory = Path(args["model_repository"]) / args["model_version"]
        torch.set_num_threads(int(params.get("threads") or 0) or available_cores())
        try:
            where = placement(args.get("model_instance_kind"), args.get("model_instance_device_id"),
                              params.get("dtype"), params.get("quantization"), params.get("precision"))
        except ValueError as exc:
            raise RuntimeError(f"text_decoder: {exc}") from None
        device = where.device
        if exact_float32(where.device, where.dtype):  # float32 on a GPU: no TF32, captions as transformers' fp32
            pb_utils.Logger.log_info(f"text_decoder: float32 on {device}, TF32 off")
        self.decoder = BlipTextDecoder.from_directory(directory, device=device, dtype=where.dtype, int8=where.int8)
        # On the CPU a step takes its turn on the cores with the encoder's runs (cpu_turns.py).
        self.turns = CpuTurns(enabled=device == "cpu" and params.get("cpu_turns", "1") != "0")
        decoding = json.loads((directory / "decoding.json").read_text())
        self.texts = CaptionDecoder(directory / "tokenizer.json", decoding["clean_up_tokenization_spaces"])
        self.limits = from_parameters(GenerationLimits, params, "limit_")
        self.bos = self.decoder.config.bos_token_id
        columns = min(self.decoder.config.max_position_embeddings,
                      int(params.get("max_prompt_tokens") or 64) + self.limits.max_new_tokens)
        self.loop = DecodeLoop(self.decoder, columns)
        self.deadlines: dict[int, float | None] = {}
        self.seen: dict[int, float] = {}  # when Triton last handed each request in flight over
        self.done: dict[int, list] = {}  # finished while Triton held the request: answered when it comes back
        self.metrics = _Metrics()

    def execute(self, requests):
        responses = [None] * len(requests)
        now = time.monotonic()
        for r, request in enumerate(requests):
            key = request.correlation_id()
            self.seen[key] = now
            try:
                if key not in self.deadlines:
                    self._join(key, request)
                elif (self.deadlines[key] or float("inf")) < time.time() or request.is_cancelled():
                    pb_utils.Logger.log_info("text_decoder: stopped decoding a request: cancelled or past its deadline")
                    self._forget(key)
                    responses[r] = _error("the request was cancelled or its deadline passed",
                                          pb_utils.TritonError.CANCELLED)
            except _BadRequest as exc:
                self._forget(key)
                responses[r] = _error(str(exc), pb_utils.TritonError.INVALID_ARG)
            except Exception:  # noqa: BLE001 - a malformed direct call must not take its batch down
                pb_utils.Logger.log_error(f"text_decoder: unreadable request:\n{traceback.format_exc()}")
                self._forget(key)
                responses[r] = _error("the request's tensors could not be read", pb_utils.TritonError.INVALID_ARG)

        if len(self.loop):
            try:
                with self.turns:
                    self.done.update(self.loop.step())
            except Exception:  # noqa: BLE001 - the loop's state is unknown: fail what is in flight, start afresh
                pb_utils.Logger.log_error(f"text_decoder: a decode step failed:\n{traceback.format_exc()}")
                for key in list(self.loop.requests):
                    self.done[key] = None
                self.loop = DecodeLoop(self.decoder, self.loop.columns)
            self.metrics.record(self.loop.stats.rows, len(self.loop))

        for r, request in enumerate(requests):
            if responses[r] is not None:
                continue
            key = request.correlation_id()
            if key in self.done:
                responses[r] = self._answer(self.done.pop(key))
                self._forget(key)
            else:
                request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)
        self._drop_abandoned(now)
        return responses

    def _join(self, key: int, request) -> None:
        embeds, prompt, options = self._parse(request)
        self.deadlines[key] = _deadline(request)
        self.loop.add(key, torch.from_numpy(embeds), prompt, options)

    def _forget(self, key: int) -> None:
        self.loop.cancel(key)
        self.deadlines.pop(key, None)
        self.seen.pop(key, None)
        self.done.pop(key, None)

    def _drop_abandoned(self, now: float) -> None:
        for key in [k for k, seen in self.seen.items() if now - seen > _ABANDONED_AFTER]:
            pb_utils.Logger.log_warn(f"text_decoder: request {key} was not handed back for {_ABANDONED_AFTER:.0f} s; "
                                     "dropped")
            self._forget(key)

    def _answer(self, hypotheses) -> "pb_utils.InferenceResponse":
        if hypotheses is None:
            return _error("decoding failed; the server log has the details", pb_utils.TritonError.INTERNAL)
        try:
            captions = self.texts([h.tokens for h in hypotheses])
            return pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("CAPTIONS", np.array([[c.encode("utf-8") for c in captions]], dtype=np.object_)),
                pb_utils.Tensor("SCORES", np.array([[h.score for h in hypotheses]], dtype=np.float32)),
            ])
        except Exception:  # noqa: BLE001
            pb_utils.Logger.log_error(f"text_decoder: a request failed:\n{traceback.format_exc()}")
            return _error("decoding failed; the server log has the details", pb_utils.TritonError.INTERNAL)

    def _parse(self, request) -> tuple[np.ndarray, list[int], GenerationOptions]:
        embeds = pb_utils.get_input_tensor_by_name(request, "IMAGE_EMBEDS").as_numpy()
        hidden = self.decoder.config.encoder_hidden_size
        if embeds.ndim != 3 or len(embeds) != 1 or embeds.shape[2] != hidden or embeds.dtype != np.float32:
            raise _BadRequest(f"IMAGE_EMBEDS must be float32 [1, L, {hidden}] (one item per request); got "
                              f"{embeds.dtype} {list(embeds.shape)}")
        prompt_ids = pb_utils.get_input_tensor_by_name(request, "PROMPT_IDS").as_numpy()
        options = pb_utils.get_input_tensor_by_name(request, "GENERATION_OPTIONS").as_numpy().reshape(-1)
        if prompt_ids.ndim != 2 or len(prompt_ids) != 1 or len(options) != 1:
            raise _BadRequest("PROMPT_IDS and GENERATION_OPTIONS must have one entry (one item per request)")
        prompt = [int(t) for t in prompt_ids[0] if t >= 0]
        if not prompt or prompt[0] != self.bos or max(prompt) >= self.decoder.config.vocab_size:
            raise _BadRequest(f"PROMPT_IDS must start with BOS ({self.bos}) and hold token ids below "
                              f"{self.decoder.config.vocab_size}")
        if len(prompt) + self.limits.max_new_tokens > self.loop.columns and len(prompt) > self.loop.columns - 1:
            raise _BadRequest(f"the prompt is {len(prompt)} tokens long; the limit is {self.loop.columns - 1}")
        try:
            item_options = GenerationOptions.from_json(bytes(options[0]))
            item_options.validate(self.limits, len(prompt), min(self.decoder.config.max_position_embeddings,
                                                                self.loop.columns))
        except OptionError as exc:
            raise _BadRequest(str(exc)) from None
        return embeds[0], prompt, item_options

    def finalize(self):
        self.turns.close()
