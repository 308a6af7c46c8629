"""Side-by-side benchmark: the Triton service against transformers, same checkpoint, images and options.

    python bench/benchmark.py --model models/blip-demo --images 64 --concurrency 8
    python -m blip_server.random_checkpoint --preset base --output /tmp/blip-base-random
    python bench/benchmark.py --model /tmp/blip-base-random --images 16 --concurrency 8 --min-new-tokens 20

Three ways to caption the same images, one after the other in one run:

- `transformers, one by one`: what `pipeline`-style code does per request: load the image, run the processor,
  `generate()` for one image;
- `transformers, batched`: a hand-rolled loop that at least batches `--batch-size` images per `generate()`;
- `service`: `blip-serve` on the exported checkpoint, `--concurrency` clients at once, through the typed gateway
  with the client SDK and straight to the `blip_caption` ensemble with tritonclient.

It reports throughput, latency percentiles and the speed-up ratios, and checks that the service's captions equal
transformers' (a benchmark of wrong answers is worthless). With a random checkpoint, fix the caption length
(`--min-new-tokens` = `--max-new-tokens`) so that both sides do the same work.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _scenes(count: int, seed: int) -> list[bytes]:
    from blip_server.demo.scenes import encode, render

    rng = random.Random(seed)
    return [encode(render(rng), rng, fmt="JPEG", quality=90, orientation=1) for _ in range(count)]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _summary(name: str, seconds: float, latencies: list[float], images: int) -> dict:
    return {
        "name": name,
        "images_per_second": images / seconds,
        "p50_ms": _percentile(latencies, 50) * 1000,
        "p95_ms": _percentile(latencies, 95) * 1000,
        "seconds": seconds,
    }


def run_transformers(checkpoint: str, images: list[bytes], options: dict, batch_size: int, threads: int):
    import io

    import torch
    from PIL import Image, ImageOps
    from transformers import AutoProcessor, BlipForConditionalGeneration

    torch.set_num_threads(threads)
    model = BlipForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)

    def load(data):
        return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")

    def caption(batch):
        inputs = processor(images=[load(d) for d in batch], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, **options)
        return processor.batch_decode(out, skip_special_tokens=True)

    caption(images[:1])  # warm-up
    results = []
    for size, name in ((1, "transformers, one by one"), (batch_size, f"transformers, batched ({batch_size})")):
        latencies, texts = [], []
        started = time.perf_counter()
        for i in range(0, len(images), size):
            t = time.perf_counter()
            texts += caption(images[i : i + size])
            latencies += [time.perf_counter() - t] * len(images[i : i + size])
        results.append((_summary(name, time.perf_counter() - started, latencies, len(images)), texts))
    return results


def run_service(repository: Path, images: list[bytes], options: dict, concurrency: int):
    """`blip-serve` on the exported repository, called the two ways users call it: the typed gateway with the
    client SDK, and the `blip_caption` ensemble directly with tritonclient."""
    import tritonclient.grpc as grpcclient

    from blip_client import CaptionClient, GenerationOptions

    from blip_server import ensemble
    from blip_server.processes import ServeProcess

    def caption_inputs(data, **options):
        return ensemble.inputs(grpcclient, data, None, **options)

    def captions(result):
        return [([c.text for c in item], [c.score for c in item]) for item in ensemble.captions(result)]

    def timed(call):
        def run(data):
            t = time.perf_counter()
            text = call(data)
            return text, time.perf_counter() - t
        return run

    def measure(name, ask):
        for data in images[: min(len(images), concurrency)]:  # warm-up
            ask(data)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            answers = list(pool.map(ask, images))
        seconds = time.perf_counter() - started
        return _summary(name, seconds, [a[1] for a in answers], len(images)), [a[0] for a in answers]

    with tempfile.TemporaryDirectory() as cache:
        serve = ServeProcess("--model", str(repository), cache=Path(cache))
        try:
            serve.wait_ready()
            sdk = CaptionClient(serve.address, timeout=600)
            generation = GenerationOptions(**options)
            gateway = measure(f"service via gateway + SDK, {concurrency} concurrent clients",
                              timed(lambda data: sdk.caption(data, options=generation).captions[0].text))
            triton = grpcclient.InferenceServerClient(f"127.0.0.1:{serve.ports['grpc']}")
            direct = measure(f"service via Triton gRPC, {concurrency} concurrent clients", timed(
                lambda data: captions(triton.infer("blip_caption", caption_inputs(data, **options)))[0][0][0]))
            stats = triton.get_inference_statistics("text_decoder", as_json=True)["model_stats"][0]
            sdk.close()
        finally:
            code, log = serve.stop()
        if code != 0:
            raise RuntimeError(f"blip-serve exited {code}:\n{log[-4000:]}")
    mean_batch = int(stats["inference_count"]) / max(1, int(stats["execution_count"]))
    return [gateway, direct], mean_batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF checkpoint directory")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--min-new-tokens", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for transformers (0: all cores)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    import os

    from blip_server.export import export_checkpoint

    options = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens)
    images = _scenes(args.images, args.seed)
    threads = args.threads or len(os.sched_getaffinity(0))
    baseline = run_transformers(args.model, images, options, args.batch_size, threads)
    with tempfile.TemporaryDirectory() as directory:
        export_checkpoint(args.model, Path(directory) / "repository")
        service, mean_batch = run_service(Path(directory) / "repository", images, options, args.concurrency)
    rows = [summary for summary, _ in baseline] + [summary for summary, _ in service]
    reference = baseline[0][1]
    mismatches = sum(a != b for _, texts in service for a, b in zip(texts, reference))

    one_by_one = rows[0]["images_per_second"]
    print(f"\n{args.images} images, {options}, model {args.model}, {threads} CPU threads\n")
    print("| how | images/s | p50 latency ms | p95 latency ms | speed-up vs one by one |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['name']} | {row['images_per_second']:.2f} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | "
              f"{row['images_per_second'] / one_by_one:.2f}x |")
    print(f"\ndecoder mean batch size: {mean_batch:.1f}; "
          f"captions differing from transformers one by one: {mismatches} of {len(images) * len(service)}")
    if args.json:
        args.json.write_text(json.dumps({"options": options, "rows": rows, "decoder_mean_batch": mean_batch,
                                         "mismatches": mismatches}, indent=2))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
