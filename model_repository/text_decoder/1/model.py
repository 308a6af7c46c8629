"""Triton Python model `text_decoder`: image embeddings + prompt ids + resolved options -> captions and scores.

Inputs (one item per request): IMAGE_EMBEDS FP32 [L, hidden]; PROMPT_IDS INT64 [P] (BOS first, -1 entries are
padding); GENERATION_OPTIONS BYTES [1] (JSON, as `preprocess` resolves it).
Outputs: CAPTIONS BYTES [K], SCORES FP32 [K], best first (K = num_return_sequences).

In-flight batching in the model itself: `execute()` reads each new request, queues it for the decode loop and
returns at once (`None`); a thread of this model runs the `DecodeLoop`, one step after another for every request
in flight, admitting the queued ones at the next step, and answers each request through its response sender the
moment it finishes (one final response per request: the model is not decoupled, so the ensemble takes plain
`ModelInfer` calls). A request's inputs cross from Triton into this process once, when it arrives, and nothing
goes back and forth while it is decoded; a short caption never waits behind a long one.

Options are validated again here (the model may be called directly); a request with a bad one is answered with
its own INVALID_ARG error, one its client cancelled or whose deadline passed leaves the loop and is answered
CANCELLED, and any other failure is that request's INTERNAL error. Rows decoded per step, steps and requests in
flight are exported as Triton metrics (`blip_decoder_*` on Triton's metrics port).
"""

import json
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass
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

# How often the loop asks Triton whether a request in flight was cancelled (each question is a round trip to the
# server process, so not at every step of every request).
_CANCELLATION_CHECK_SECONDS = 0.1
_METRICS_SECONDS = 0.5
# For tests only, never set in service: BLIP_TEST_STEP_DELAY_SECONDS=S sleeps S seconds before every decode step
# (outside the CPU turn and the step's measured seconds), so that a test of deadlines or shutdowns has a decode
# that lasts as long as it needs, whatever the machine's speed. Unset: nothing.
_TEST_STEP_DELAY_SECONDS = float(os.environ.get("BLIP_TEST_STEP_DELAY_SECONDS") or 0)


# A step that reads fewer weight bytes than this is bound by the cost of starting its operators, not by the
# memory's speed: more threads only add their own start-up and spinning. Measured on the demo model (2.8 MB a
# step) under 16 clients on two cores: one thread and no CPU turns 55.8 captions/s and 9.9 ms of the decoder's
# CPU a caption, two threads taking turns 38.5/s and 15.1 ms. BLIP-base's and -large's steps read 0.2-0.5 GB,
# and two threads took 71 ms a BLIP-large step where one took 97.
_THREADED_STEP_BYTES = 32 << 20


def step_threads(configured: int, step_bytes: int, cores: int) -> int:
    """torch's threads for the decoder: `configured` if set (the config's `threads`), else every core for a
    step that reads `_THREADED_STEP_BYTES` or more, else one."""
    if configured > 0:
        return configured
    return cores if step_bytes >= _THREADED_STEP_BYTES else 1


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
    """Triton custom metrics; the families must outlive their metrics, so both are kept.

    Each update is a round trip to the server process, which cost a demo-model step more than its arithmetic
    (three updates a step: 12.6% of the loop's time under load against 14.8% for the step): the counts are kept
    here and handed over at most every `_METRICS_SECONDS`, and whenever the loop falls idle."""

    def __init__(self):
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self.families = [
            pb_utils.MetricFamily("blip_decoder_rows", "Decoder rows (beams, samples) decoded, summed over steps; "
                                  "divided by blip_decoder_steps: rows per step", counter),
            pb_utils.MetricFamily("blip_decoder_steps", "Decode steps run", counter),
            pb_utils.MetricFamily("blip_decoder_step_seconds", "Seconds the decode steps took, summed (waits for the "
                                  "CPU turn excluded): the decoder's busy time", counter),
            pb_utils.MetricFamily("blip_decoder_requests_in_flight", "Requests in the decode loop", gauge),
        ]
        self.rows, self.steps, self.seconds, self.in_flight = (family.Metric() for family in self.families)
        self.pending_rows = self.pending_steps = 0
        self.pending_seconds = 0.0
        self.sent = time.monotonic()

    def record(self, rows: int, in_flight: int, seconds: float) -> None:
        self.pending_rows += rows
        self.pending_steps += 1
        self.pending_seconds += seconds
        if not in_flight or time.monotonic() - self.sent >= _METRICS_SECONDS:
            self.flush(in_flight)

    def flush(self, in_flight: int) -> None:
        """Hand the counts kept so far and the requests now in flight to Triton."""
        self.sent = time.monotonic()
        try:
            self.rows.increment(self.pending_rows)
            self.steps.increment(self.pending_steps)
            self.seconds.increment(self.pending_seconds)
            self.in_flight.set(in_flight)
            self.pending_rows = self.pending_steps = 0
            self.pending_seconds = 0.0
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            pb_utils.Logger.log_warn(f"text_decoder: metrics not recorded:\n{traceback.format_exc()}")


@dataclass
class _Pending:
    """A request in the decode loop: what answers it and what ends it early."""

    request: object
    sender: object
    deadline: float | None

    def send(self, response) -> None:
        try:
            self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # noqa: BLE001 - a caller gone away must not stop the loop
            pb_utils.Logger.log_warn(f"text_decoder: a response could not be sent:\n{traceback.format_exc()}")

    def ended(self, now: float, ask_triton: bool) -> bool:
        if self.deadline is not None and self.deadline < now:
            return True
        return ask_triton and self.request.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        directory = Path(args["model_repository"]) / args["model_version"]
        try:
            where = placement(args.get("model_instance_kind"), args.get("model_instance_device_id"),
                              params.get("dtype"), params.get("quantization"), params.get("precision"))
        except ValueError as exc:
            raise RuntimeError(f"text_decoder: {exc}") from None
        if exact_float32(where.device, where.dtype):  # float32 on a GPU: no TF32, captions as transformers' fp32
            pb_utils.Logger.log_info(f"text_decoder: float32 on {where.device}, TF32 off")
        # The loop's thread loads the weights and runs every step: all of torch's parallel work happens on one
        # thread. GNU OpenMP gives each thread that starts parallel work a team of its own; with a second team (the
        # loading thread's) there are more OpenMP threads than cores, and OpenMP then lets idle threads spin
        # 1000 times less before sleeping, so every operator waits to wake them: BLIP-large steps took 37-40 ms
        # in int8 and 49 ms in fp32 where one thread doing everything took 26 and 33.
        loaded = threading.Event()
        self.failure: str | None = None
        self.started = threading.Event()
        self.arrivals: queue.SimpleQueue = queue.SimpleQueue()  # (pending, embeds, prompt, options); None: stop
        self.thread = threading.Thread(target=self._run, args=(directory, where, params, loaded),
                                       name="text_decoder-loop", daemon=True)
        self.thread.start()
        loaded.wait()
        if self.failure is not None:
            raise RuntimeError(f"text_decoder: the decoder could not be loaded: {self.failure}")
        decoding = json.loads((directory / "decoding.json").read_text())
        self.texts = CaptionDecoder(directory / "tokenizer.json", decoding["clean_up_tokenization_spaces"])
        self.limits = from_parameters(GenerationLimits, params, "limit_")
        self.bos = self.decoder.config.bos_token_id
        self.columns = min(self.decoder.config.max_position_embeddings,
                           int(params.get("max_prompt_tokens") or 64) + self.limits.max_new_tokens)
        self.metrics = _Metrics()
        self.started.set()

    def _run(self, directory: Path, where, params: dict, loaded: threading.Event) -> None:
        """The loop's thread: load the decoder, tell initialize(), then decode until finalize() says stop."""
        try:
            self.decoder = BlipTextDecoder.from_directory(directory, device=where.device, dtype=where.dtype,
                                                          int8=where.int8)
            threads = step_threads(int(params.get("threads") or 0), self.decoder.step_weight_bytes(),
                                   available_cores())
            torch.set_num_threads(threads)
            # On the CPU a step that uses every core takes its turn on them with the encoder's runs (cpu_turns.py);
            # a one-thread step leaves the other cores to the encoder, and takes no turn.
            self.turns = CpuTurns(enabled=where.device == "cpu" and threads > 1 and params.get("cpu_turns", "1") != "0")
        except Exception as exc:  # noqa: BLE001 - reported by initialize()
            self.failure = f"{type(exc).__name__}: {exc}"
            pb_utils.Logger.log_error(f"text_decoder: loading failed:\n{traceback.format_exc()}")
            loaded.set()
            return
        loaded.set()
        self.started.wait()  # initialize() has finished what the loop reads
        self._decode()

    def execute(self, requests):
        """Queue each new request for the decode loop, or answer it at once if it is malformed."""
        for request in requests:
            pending = _Pending(request, request.get_response_sender(), _deadline(request))
            try:
                embeds, prompt, options = self._parse(request)
                # A copy: the input lives in memory Triton shares with this process for this call only.
                self.arrivals.put((pending, torch.from_numpy(embeds.copy()), prompt, options))
            except _BadRequest as exc:
                pending.send(_error(str(exc), pb_utils.TritonError.INVALID_ARG))
            except Exception:  # noqa: BLE001 - a malformed direct call must not take its batch down
                pb_utils.Logger.log_error(f"text_decoder: unreadable request:\n{traceback.format_exc()}")
                pending.send(_error("the request's tensors could not be read", pb_utils.TritonError.INVALID_ARG))
        return None

    # -- the loop's thread -----------------------------------------------------------------------------------

    def _decode(self) -> None:
        """The decode loop's thread: admit, drop what ended early, step, answer; until finalize() says stop.
        It owns `self.loop` and `self.pending`; nothing that goes wrong in it ends it."""
        self.loop = DecodeLoop(self.decoder, self.columns)
        self.pending: dict[int, _Pending] = {}
        self.keys = iter(range(1 << 62))
        asked = time.monotonic()
        while True:
            try:
                if not self._admit():
                    self._fail_all("the server is stopping; send the request again", pb_utils.TritonError.UNAVAILABLE)
                    return
                now, ask_triton = time.time(), time.monotonic() - asked >= _CANCELLATION_CHECK_SECONDS
                if ask_triton:
                    asked = time.monotonic()
                ended = [k for k, p in self.pending.items() if p.ended(now, ask_triton)]
                for key in ended:
                    pb_utils.Logger.log_info("text_decoder: stopped decoding a request: cancelled or past its "
                                             "deadline")
                    self.loop.cancel(key)
                    self.pending.pop(key).send(_error("the request was cancelled or its deadline passed",
                                                      pb_utils.TritonError.CANCELLED))
                if ended and not len(self.loop):  # idle now: no step will hand the counts over
                    self.metrics.flush(0)
                if len(self.loop):
                    if _TEST_STEP_DELAY_SECONDS:
                        time.sleep(_TEST_STEP_DELAY_SECONDS)
                    with self.turns:
                        started = time.perf_counter()
                        finished = self.loop.step()
                        seconds = time.perf_counter() - started
                    for key, hypotheses in finished.items():
                        self.pending.pop(key).send(self._answer(hypotheses))
                    self.metrics.record(self.loop.stats.rows, len(self.loop), seconds)
            except Exception:  # noqa: BLE001 - the loop's state is unknown: fail what is in flight, start afresh
                pb_utils.Logger.log_error(f"text_decoder: a decode step failed:\n{traceback.format_exc()}")
                self._fail_all("decoding failed; the server log has the details", pb_utils.TritonError.INTERNAL)
                self.loop = DecodeLoop(self.decoder, self.columns)
                self.metrics.flush(0)

    def _admit(self) -> bool:
        """Add what arrived to the loop: wait for it when the loop is idle. False: finalize() said stop."""
        try:
            arrival = self.arrivals.get(block=not len(self.loop))
            while True:
                if arrival is None:
                    return False
                pending, embeds, prompt, options = arrival
                key = next(self.keys)
                try:
                    self.loop.add(key, embeds, prompt, options)
                    self.pending[key] = pending
                except ValueError as exc:  # does not fit the loop's columns
                    pending.send(_error(str(exc), pb_utils.TritonError.INVALID_ARG))
                arrival = self.arrivals.get_nowait()
        except queue.Empty:
            return True

    def _fail_all(self, message: str, code) -> None:
        for pending in self.pending.values():
            pending.send(_error(message, code))
        self.pending.clear()

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
        if len(prompt) > self.columns - 1:
            raise _BadRequest(f"the prompt is {len(prompt)} tokens long; the limit is {self.columns - 1}")
        try:
            item_options = GenerationOptions.from_json(bytes(options[0]))
            item_options.validate(self.limits, len(prompt), min(self.decoder.config.max_position_embeddings,
                                                                self.columns))
        except OptionError as exc:
            raise _BadRequest(str(exc)) from None
        return embeds[0], prompt, item_options

    def finalize(self):
        self.arrivals.put(None)
        self.thread.join(timeout=30)
        self.turns.close()
