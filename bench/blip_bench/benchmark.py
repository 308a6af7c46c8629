"""`blip-bench run`: the service against transformers, side by side in one run, same images and settings.

    blip-bench run --preset large --concurrency 1,4,8,16 --precision fp32,int8 --output bench-large/
    blip-bench run --quick --output bench-quick/            # the demo model, seconds: CI's smoke test

For each precision it exports the checkpoint (`--preset` builds a random checkpoint with that architecture,
never committed: cost does not depend on weight values when every caption has exactly `--tokens` new tokens),
starts `blip-serve`, and captions the same generated images

- with transformers (`BlipForConditionalGeneration.generate()`), one image per call and in its best batch, and
  one by one again at the end, which shows how far the machine's speed drifted during the run;
- through the gateway with the SDK, and straight to the `blip_caption` ensemble with tritonclient, at each
  concurrency;

and reports seconds per caption, throughput, p50/p99 latency and ratios to transformers one by one; Triton's
per-model statistics (mean batch, queue and compute time); the decoder's time per caption against its memory
bandwidth floor; the memory of every server process against the weights' bytes; and whether a short caption
overtakes a long one. Captions of the fp32 service are checked against transformers'; those of other precisions
are compared with fp32's. It writes results.json, results.md and throughput.png (throughput against concurrency).

Before anything else runs it measures this machine's floor for a caption (`floor`: matrix-product rates on the
vision encoder's shapes, ONNX Runtime and torch, fp32 and int8, and the memory read bandwidth, all in
`results["floor"]`), and reports every service row of fp32 and int8 against the floor of its precision:

- `floor_s_per_caption`: the floor of one caption (the encoder's and the decoder's parts in the precision's
  `floor`);
- `latency_vs_floor`: p50 latency / floor, one caption against one caption's floor;
- `throughput_vs_floor`: seconds per caption (wall time / captions) / floor; at concurrency above one captions
  overlap and share their decode steps' weight reads, so this may go below what the latency's ratio shows;
- where the rest goes: the encoder's and the decoder's compute per caption (Triton's statistics, the CPU turn's
  wait included) against their parts of the floor (`encoder_vs_floor`, `decoder_vs_floor`), and
  `other_s_per_caption`, the mean latency less the three models' mean compute per caption (queues, transport,
  the gateway; at concurrency above one, the other captions' compute a caption waits through too).
"""

from __future__ import annotations

import io
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from blip_bench.floor import (
    PRECISIONS,
    CaptionFloor,
    Machine,
    VisionArchitecture,
    caption_floor,
    measure_machine,
    summary,
)


@dataclass(frozen=True)
class Settings:
    checkpoint: Path
    images: int
    concurrency: tuple[int, ...]
    precisions: tuple[str, ...]
    beams: int
    tokens: int
    batch_sizes: tuple[int, ...]  # transformers' batches to try; the best is reported
    threads: int
    overtaking: bool  # measure a short request sent half-way through a long one
    # Shares of requests whose image was sent before, for the rows with Triton's response cache (none: no rows)
    repeat_shares: tuple[float, ...] = ()


def _scenes(count: int, seed: int = 7) -> list[bytes]:
    import random

    from blip_demo.scenes import encode, render

    rng = random.Random(seed)
    return [encode(render(rng), rng, fmt="JPEG", quality=90, orientation=1) for _ in range(count)]


def _progress(row: dict) -> dict:
    print(f"blip-bench: {row['name']}: {row['seconds_per_caption']:.3f} s per caption, "
          f"{row['captions_per_second']:.2f} captions/s", file=sys.stderr, flush=True)
    return row


def _row(name: str, seconds: float, latencies: list[float], captions: int, **extra) -> dict:
    return {"name": name, "captions": captions, "seconds": seconds, "captions_per_second": captions / seconds,
            "seconds_per_caption": seconds / captions, "mean_ms": 1000 * float(np.mean(latencies)),
            "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p99_ms": 1000 * float(np.percentile(latencies, 99)), **extra}


class Transformers:
    """transformers' `generate()` on the checkpoint, timed one by one or in batches."""

    def __init__(self, settings: Settings):
        import torch
        from transformers import AutoProcessor, BlipForConditionalGeneration

        torch.set_num_threads(settings.threads)
        self.model = BlipForConditionalGeneration.from_pretrained(settings.checkpoint).eval()
        self.processor = AutoProcessor.from_pretrained(settings.checkpoint)
        self.options = dict(num_beams=settings.beams, max_new_tokens=settings.tokens, min_new_tokens=settings.tokens)
        self._warm = False

    def caption(self, batch: list[bytes]) -> list[str]:
        import torch
        from PIL import Image, ImageOps

        pictures = [ImageOps.exif_transpose(Image.open(io.BytesIO(d))).convert("RGB") for d in batch]
        inputs = self.processor(images=pictures, return_tensors="pt")
        with torch.inference_mode():
            return self.processor.batch_decode(self.model.generate(**inputs, **self.options), skip_special_tokens=True)

    def measure(self, images: list[bytes], size: int, name: str = "") -> tuple[dict, list[str]]:
        """-> (the row of captioning `images` in batches of `size`, the captions)."""
        if not self._warm:
            self.caption(images[:1])
            self._warm = True
        latencies, texts = [], []
        started = time.perf_counter()
        for i in range(0, len(images), size):
            t = time.perf_counter()
            texts += self.caption(images[i: i + size])
            latencies += [time.perf_counter() - t] * len(images[i: i + size])
        return _progress(_row(name or f"transformers, batch {size}", time.perf_counter() - started, latencies,
                              len(images), kind="transformers", batch=size)), texts


def run_transformers(transformers: Transformers, settings: Settings,
                     images: list[bytes]) -> tuple[list[dict], list[str]]:
    """transformers one by one and in batches; returns (rows, captions of one by one)."""
    rows, one_by_one = [], []
    for size in settings.batch_sizes:
        row, texts = transformers.measure(images, size)
        rows.append(row)
        if size == 1:
            one_by_one = texts
    return rows, one_by_one


def _warm_up(ask, images: list[bytes], concurrency: int) -> None:
    for data in images[: min(len(images), concurrency)]:
        ask(data)


def _measure(name: str, ask, images: list[bytes], concurrency: int, **extra) -> tuple[dict, list[str]]:
    """Every image asked once, by `concurrency` clients (warm up first: nothing here does)."""
    def timed(data):
        t = time.perf_counter()
        text = ask(data)
        return text, time.perf_counter() - t

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(timed, images))
    return (_row(name, time.perf_counter() - started, [a[1] for a in answers], len(images),
                 concurrency=concurrency, **extra), [a[0] for a in answers])


def _stats(client, model: str) -> dict:
    """Triton's cumulative statistics of a model: requests, executions, queue and compute nanoseconds."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    inference = stats.get("inference_stats", {})
    executed_ns = sum(int(b.get(k, {}).get("ns", 0)) for b in stats.get("batch_stats", [])
                      for k in ("compute_input", "compute_infer", "compute_output"))
    return {"requests": int(stats.get("inference_count", 0)), "executions": int(stats.get("execution_count", 0)),
            "queue_ns": int(inference.get("queue", {}).get("ns", 0)), "executed_ns": executed_ns}


def _delta(after: dict, before: dict) -> dict:
    d = {k: after[k] - before[k] for k in after}
    executions = max(1, d["executions"])
    return {"requests": d["requests"], "mean_batch": d["requests"] / executions, "executions": d["executions"],
            "mean_queue_ms": d["queue_ns"] / 1e6 / max(1, d["requests"]),
            "compute_ms_per_execution": d["executed_ns"] / 1e6 / executions, "compute_s": d["executed_ns"] / 1e9}


def _cpu_per_caption(after: dict[str, float], before: dict[str, float], gateway: str, captions: int) -> dict:
    """CPU seconds per caption of all server processes and of the gateway's alone, and the gateway's share: on
    cores the service keeps busy, the throughput the gateway costs against calling Triton directly. The
    share is read from CPU time, not from two runs' throughputs: the run-to-run noise of those is far larger."""
    used = {name: seconds - before.get(name, 0.0) for name, seconds in after.items()}
    total, own = sum(used.values()), used.get(gateway, 0.0)
    return {"server_cpu_s_per_caption": total / captions, "gateway_cpu_s_per_caption": own / captions,
            "gateway_cpu_share": own / total if total > 0 else 0.0}


def _weights_bytes(repository: Path) -> int:
    files = [repository / "vision_encoder" / "1" / "model.onnx",
             repository / "text_decoder" / "1" / "decoder.safetensors"]
    return sum(f.stat().st_size for f in files if f.exists())


def run_service(settings: Settings, repository: Path, precision: str, images: list[bytes], machine: Machine) -> dict:
    import tritonclient.grpc as grpcclient

    from blip_bench.processes import ServeProcess, decoder_counters, process_name
    from blip_client import CaptionClient, GenerationOptions
    from blip_server import ensemble

    options = dict(num_beams=settings.beams, max_new_tokens=settings.tokens, min_new_tokens=settings.tokens)
    floor = caption_floor(repository, precision, machine, settings.tokens) if precision in PRECISIONS else None
    rows, texts = [], {}
    with tempfile.TemporaryDirectory() as cache:
        # No response cache: these rows send the same images at every concurrency and measure the models.
        serve = ServeProcess("--model", str(repository), "--max-concurrent-requests", "1024",
                             "--response-cache-mb", "0", cache=Path(cache))
        try:
            serve.wait_ready(timeout=900)
            sdk = CaptionClient(serve.address, timeout=3600)
            triton = grpcclient.InferenceServerClient(serve.triton_address)
            generation = GenerationOptions(**options)
            via_gateway = lambda data: sdk.caption(data, options=generation).captions[0].text  # noqa: E731

            def via_triton(data):
                result = triton.infer(ensemble.MODEL, ensemble.inputs(grpcclient, data, None, **options),
                                      client_timeout=3600)
                return ensemble.captions(result)[0][0].text

            gateway = process_name(serve.command, serve.process.pid)  # blip-serve's own process runs the gateway
            peak = _PeakMemory(serve.memory)
            for concurrency in settings.concurrency:
                for route, ask in (("gateway", via_gateway), ("triton", via_triton)):
                    _warm_up(ask, images, concurrency)  # before the readings: they count the measured captions only
                    before = {m: _stats(triton, m) for m in ("preprocess", "vision_encoder", "text_decoder")}
                    decoder_before = decoder_counters(serve.ports["metrics"])
                    cpu_before = serve.cpu_seconds()
                    row, answers = _measure(f"service {precision} via {route}, {concurrency} concurrent", ask, images,
                                            concurrency, kind="service", precision=precision, route=route)
                    cpu_after = serve.cpu_seconds()
                    after = {m: _stats(triton, m) for m in before}
                    row["models"] = {m: _delta(after[m], before[m]) for m in before}
                    decoder_after = decoder_counters(serve.ports["metrics"])
                    row["models"]["text_decoder"].update(_decoder_delta(decoder_after, decoder_before))
                    row.update(_cpu_per_caption(cpu_after, cpu_before, gateway, len(images)))
                    row["decoder_s_per_caption"] = row["models"]["text_decoder"]["compute_s"] / len(images)
                    if floor is not None:
                        row.update(_against_floor(row, floor))
                    rows.append(_progress(row))
                    texts[(route, concurrency)] = answers
            peak.stop()
            time.sleep(3)  # at rest: nothing in flight
            memory = serve.memory()
            overtaking = _overtaking(sdk) if settings.overtaking else None
            sdk.close()
        finally:
            code, log = serve.stop()
        if code != 0:
            raise RuntimeError(f"blip-serve exited {code}:\n{log[-4000:]}")
    repeat_rows = run_repeats(settings, repository, precision) if settings.repeat_shares else []
    return {"rows": rows, "repeat_rows": repeat_rows, "texts": texts, "memory": memory, "peak_memory": peak.peak,
            "weights_bytes": _weights_bytes(repository),
            "overtaking": overtaking, "floor": _floor_fields(floor) if floor else None}


def _with_repeats(fresh: list[bytes], share: float, seed: int) -> list[bytes]:
    """As many requests as `fresh` images, a `share` of them an image sent earlier in the list (picked at random)."""
    import random

    rng = random.Random(seed)
    slots = set(rng.sample(range(1, len(fresh)), min(len(fresh) - 1, round(len(fresh) * share))))
    new = iter(fresh)
    sequence: list[bytes] = []
    for i in range(len(fresh)):
        sequence.append(rng.choice(sequence) if i in slots else next(new))
    return sequence


def run_repeats(settings: Settings, repository: Path, precision: str) -> list[dict]:
    """Throughput through the gateway with Triton's response cache (blip-serve's default) when a share of the
    requests repeats an image sent before, beside none: each share and concurrency gets images no earlier row sent
    (a share of 0 is every request a miss). A repeat sent while its first request is still in flight is a miss
    too, so the row reports the hits Triton counted (`cache_hits`) beside the share asked for."""
    import tritonclient.grpc as grpcclient

    from blip_bench.processes import ServeProcess
    from blip_client import CaptionClient, GenerationOptions
    from blip_server import ensemble

    options = GenerationOptions(num_beams=settings.beams, max_new_tokens=settings.tokens,
                                min_new_tokens=settings.tokens)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        serve = ServeProcess("--model", str(repository), "--max-concurrent-requests", "1024", cache=Path(cache))
        try:
            serve.wait_ready(timeout=900)
            sdk = CaptionClient(serve.address, timeout=3600)
            triton = grpcclient.InferenceServerClient(serve.triton_address)
            ask = lambda data: sdk.caption(data, options=options).captions[0].text  # noqa: E731
            _warm_up(ask, _scenes(max(settings.concurrency), seed=999), max(settings.concurrency))
            round_ = 0
            for share in settings.repeat_shares:
                for concurrency in settings.concurrency:
                    round_ += 1
                    sequence = _with_repeats(_scenes(settings.images, seed=1000 + round_), share, round_)
                    before = _cache_counts(triton, ensemble.CACHED_MODEL)
                    row, _ = _measure(f"service {precision} via gateway, {concurrency} concurrent, {share:.0%} "
                                      "repeated", ask, sequence, concurrency, kind="repeats", precision=precision,
                                      route="gateway", repeat_share=share)
                    after = _cache_counts(triton, ensemble.CACHED_MODEL)
                    row["cache_hits"] = after["hits"] - before["hits"]
                    row["cache_misses"] = after["misses"] - before["misses"]
                    rows.append(_progress(row))
            sdk.close()
        finally:
            code, log = serve.stop()
        if code != 0:
            raise RuntimeError(f"blip-serve exited {code}:\n{log[-4000:]}")
    return rows


def _cache_counts(client, model: str) -> dict:
    """Triton's cumulative response-cache hits and misses of a model."""
    inference = client.get_inference_statistics(model, as_json=True)["model_stats"][0].get("inference_stats", {})
    return {"hits": int(inference.get("cache_hit", {}).get("count", 0)),
            "misses": int(inference.get("cache_miss", {}).get("count", 0))}


def _decoder_delta(after: dict[str, float], before: dict[str, float]) -> dict:
    """The decoder's statistics over a row from its own counters, in the fields `_delta` gives the other models:
    executions are steps, a batch is the rows of a step, compute is the steps' time."""
    steps, rows, seconds = (after[k] - before[k] for k in ("steps", "rows", "seconds"))
    return {"executions": int(steps), "mean_batch": rows / max(1.0, steps), "compute_s": seconds,
            "compute_ms_per_execution": 1000 * seconds / max(1.0, steps)}


def _floor_fields(floor: CaptionFloor) -> dict:
    return {**asdict(floor), "total_s": floor.total_s}


def _against_floor(row: dict, floor: CaptionFloor) -> dict:
    """A row against one caption's floor. The models' compute per caption is Triton's compute time (which includes
    waiting for the CPU turn) over the captions; `other_s_per_caption`, the mean latency less the three models'
    compute per caption (means both, so that they subtract): queues, transport, the gateway, and at concurrency
    above one the other captions' compute a caption waits through."""
    captions, models = row["captions"], row["models"]
    compute = {m: models[m]["compute_s"] / captions for m in ("preprocess", "vision_encoder", "text_decoder")}
    steps_per_caption = max(1.0, models["text_decoder"]["executions"] / captions)
    latency = row["p50_ms"] / 1000
    return {"floor_s_per_caption": floor.total_s, "latency_vs_floor": latency / floor.total_s,
            "throughput_vs_floor": row["seconds_per_caption"] / floor.total_s,
            "preprocess_s_per_caption": compute["preprocess"],
            "encoder_s_per_caption": compute["vision_encoder"],
            "encoder_vs_floor": compute["vision_encoder"] / floor.encoder_s,
            "decoder_vs_floor": compute["text_decoder"] / floor.decoder_s,
            # A step reads the weights once for every request in it: its floor is shared by them.
            "decoder_floor_s_per_caption": floor.decoder_s / floor.tokens * steps_per_caption,
            "other_s_per_caption": row["mean_ms"] / 1000 - sum(compute.values())}


class _PeakMemory:
    """Samples the server's memory every second in a thread; `peak`: the processes' readings at the largest total."""

    def __init__(self, read, interval: float = 1.0):
        self.peak: dict[str, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(read, interval), daemon=True)
        self._thread.start()

    def _sample(self, read, interval: float) -> None:
        while not self._done.wait(interval):
            reading = read()
            if sum(reading.values()) > sum(self.peak.values()):
                self.peak = reading

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _overtaking(client) -> dict:
    """A long request (8 beams, exactly 64 tokens), timed alone first, then again with a short one (greedy, 5
    tokens) sent half-way through it (a fixed delay fails once the long one is faster than it)."""
    from blip_client import GenerationOptions

    image = _scenes(1, seed=99)[0]
    long_options = GenerationOptions(num_beams=8, min_new_tokens=64, max_new_tokens=64)
    started = time.perf_counter()
    client.caption(image, options=long_options)
    alone = time.perf_counter() - started
    done: dict[str, float] = {}
    started = time.perf_counter()

    def send(name, options):
        client.caption(image, options=options)
        done[name] = time.perf_counter() - started

    long = threading.Thread(target=send, args=("long", long_options))
    long.start()
    time.sleep(alone / 2)
    sent = time.perf_counter() - started
    send("short", GenerationOptions(num_beams=1, min_new_tokens=5, max_new_tokens=5))
    long.join()
    return {"long_alone_s": alone, "long_latency_s": done["long"], "short_sent_after_s": sent,
            "short_latency_s": done["short"] - sent, "short_finished_first": done["short"] < done["long"]}


def run(settings: Settings) -> dict:
    from blip_server.export import ExportOptions, export_checkpoint

    images = _scenes(settings.images)
    architecture = VisionArchitecture.from_checkpoint(settings.checkpoint)
    machine = measure_machine(architecture, settings.threads)  # before anything else loads the cores
    transformers = Transformers(settings)
    baseline, reference = run_transformers(transformers, settings, images)
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.__dict__.items()},
               "cpu_threads": settings.threads, "memory_bandwidth_gb_s": machine.bandwidth / 1e9,
               "floor": summary(machine, architecture), "transformers": baseline, "service": {}}
    texts = {}
    with tempfile.TemporaryDirectory() as work:
        for precision in settings.precisions:
            repository = Path(work) / precision
            export_checkpoint(settings.checkpoint, repository, ExportOptions(precision=precision))
            service = run_service(settings, repository, precision, images, machine)
            texts[precision] = service.pop("texts")
            results["service"][precision] = service
    # The machine may have sped up or slowed down while the service ran: transformers one by one again, at the end,
    # says by how much (the ratios are against the first measurement).
    again, again_texts = transformers.measure(images, 1, "transformers, batch 1, again at the end")
    again["identical_share"] = _identical_share(again_texts, reference)
    results["transformers_again"] = again
    one_by_one = baseline[0]["captions_per_second"]
    for precision, service in results["service"].items():
        compare_to = (reference if precision == "fp32"
                      else texts.get("fp32", {}).get(("gateway", settings.concurrency[0])))
        for row in service["rows"]:
            answers = texts[precision][(row["route"], row["concurrency"])]
            row["speedup"] = row["captions_per_second"] / one_by_one
            if compare_to is not None:
                row["identical_to"] = "transformers" if precision == "fp32" else "fp32"
                row["identical_share"] = _identical_share(answers, compare_to)
    return results


def _identical_share(answers: list[str], reference: list[str]) -> float:
    """The share of captions equal to the reference's for the same images."""
    return sum(a == b for a, b in zip(answers, reference, strict=True)) / len(answers)
