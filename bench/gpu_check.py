"""One short, prepared check for a GPU machine: our encoder and decoder against transformers, side by side.

    python bench/gpu_check.py --out /tmp/gpu-check                        # BLIP-large dims, CUDA, fp16 and fp32
    python bench/gpu_check.py --device cpu --preset tiny --batches 1,2   # the same code path on a CPU (a test)

It needs python3 with torch, transformers and onnx (onnxruntime-gpu optional) and this repository; no Triton,
no network, no checkpoint: it builds the BLIP-large architecture with random weights (cost does not depend on
weight values when every caption has exactly `--tokens` new tokens). For each precision and batch size it
captions the same random images

- with our serving path, in process: the vision encoder exported to ONNX and run by ONNX Runtime's TensorRT or
  CUDA provider when onnxruntime has one (else the PyTorch vision model), then our batched beam-search decoder
  (`model_repository/text_decoder/1`);
- with transformers' `BlipForConditionalGeneration.generate()` on the same device, dtype and batch;

and prints captions per second and p50/p99 latency of a batch for both, their ratio, and whether the generated
token ids agree (in fp32 they must; fp16 may differ on near-ties). Results go to `--out` as JSON and markdown.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "server"), str(ROOT / "model_repository" / "text_decoder" / "1"),
                str(ROOT / "server" / "blip_server" / "shared")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from blip_server.random_checkpoint import CheckpointSpec, model_configs, randomise  # noqa: E402

BOS, EOS, PAD, VOCAB = 30522, 102, 0, 30524  # BERT's layout, as in the Salesforce checkpoints


def build_model(preset: str, device: str, dtype: torch.dtype):
    from transformers import BlipConfig, BlipForConditionalGeneration

    spec = CheckpointSpec(preset=preset, seed=0)
    vision, text = model_configs(spec, VOCAB)
    text.update(bos_token_id=BOS, sep_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).eval()
    randomise(model, spec, eos_token_id=EOS)
    return model.to(device=device, dtype=dtype), vision["image_size"]


class Encoder:
    """The vision model as our serving path runs it: ONNX Runtime (TensorRT/CUDA provider) where available."""

    def __init__(self, model, size: int, device: str, dtype: torch.dtype, workdir: Path):
        self.kind, self.device, self.dtype = "torch", device, dtype
        self.vision = model.vision_model
        try:
            import onnxruntime as ort
        except ImportError:
            return
        providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in ort.get_available_providers()]
        if device != "cpu" and not providers:
            return  # onnxruntime without GPU providers: the PyTorch vision model on the GPU instead
        path = workdir / f"encoder-{str(dtype).split('.')[-1]}.onnx"
        self._export(model, size, path, dtype)
        chosen = [(p, {"trt_fp16_enable": dtype == torch.float16}) if p.startswith("Tensorrt") else p for p in providers]
        self.session = ort.InferenceSession(str(path), providers=chosen + ["CPUExecutionProvider"])
        self.kind = f"onnxruntime ({self.session.get_providers()[0]})"

    @staticmethod
    def _export(model, size: int, path: Path, dtype: torch.dtype) -> None:
        class Vision(torch.nn.Module):
            def __init__(self, vision):
                super().__init__()
                self.vision = vision

            def forward(self, pixel_values):
                return self.vision(pixel_values=pixel_values).last_hidden_state

        vision = Vision(copy.deepcopy(model.vision_model)).float().cpu().eval()
        torch.onnx.export(vision, (torch.randn(2, 3, size, size),), str(path), input_names=["PIXEL_VALUES"],
                          output_names=["IMAGE_EMBEDS"], opset_version=17, dynamo=False,
                          dynamic_axes={"PIXEL_VALUES": {0: "batch"}, "IMAGE_EMBEDS": {0: "batch"}})
        if dtype == torch.float16:
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(path))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.kind == "torch":
            with torch.inference_mode():
                return self.vision(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state
        embeds = self.session.run(None, {"PIXEL_VALUES": pixels.float().cpu().numpy()})[0]
        return torch.from_numpy(embeds)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(run, batches: list[torch.Tensor], device: str) -> tuple[list, list[float]]:
    outputs, seconds = [], []
    run(batches[0])  # warm-up (kernels, allocator, engines)
    for batch in batches:
        _sync(device)
        started = time.perf_counter()
        outputs.append(run(batch))
        _sync(device)
        seconds.append(time.perf_counter() - started)
    return outputs, seconds


def measure(preset: str, device: str, dtype: torch.dtype, batch_sizes: list[int], repeats: int, tokens: int,
            beams: int, workdir: Path) -> list[dict]:
    from blip_text_decoder import BlipTextDecoder, DecoderConfig
    from caption_generation import generate
    from generation_options import GenerationOptions

    from blip_server.checkpoint import decoder_config

    model, size = build_model(preset, device, dtype)
    encoder = Encoder(model, size, device, dtype, workdir)
    decoder = BlipTextDecoder(DecoderConfig(**decoder_config(model.config.text_config)), model.text_decoder.state_dict(),
                              device=device, dtype=dtype)
    options = GenerationOptions(num_beams=beams, max_new_tokens=tokens, min_new_tokens=tokens)

    def ours(pixels):
        embeds = encoder(pixels)
        results = generate(decoder, embeds, [[BOS]] * len(pixels), [options] * len(pixels))
        return [r[0].tokens for r in results]

    def theirs(pixels):
        with torch.inference_mode():
            out = model.generate(pixel_values=pixels.to(device, dtype), num_beams=beams, max_new_tokens=tokens,
                                 min_new_tokens=tokens)
        return out.tolist()

    rows = []
    generator = torch.Generator().manual_seed(1)
    for batch in batch_sizes:
        batches = [torch.randn(batch, 3, size, size, generator=generator) for _ in range(repeats)]
        row = {"precision": str(dtype).split(".")[-1], "batch": batch, "encoder": encoder.kind}
        results = {}
        for name, run in (("ours", ours), ("transformers", theirs)):
            outputs, seconds = _timed(run, batches, device)
            results[name] = [tokens for output in outputs for tokens in output]
            row[name] = {
                "captions_per_second": batch * len(seconds) / sum(seconds),
                "p50_batch_ms": statistics.median(seconds) * 1000,
                "p99_batch_ms": float(np.percentile(seconds, 99)) * 1000,
            }
        row["speedup"] = row["ours"]["captions_per_second"] / row["transformers"]["captions_per_second"]
        row["captions_differing"] = sum(a != b for a, b in zip(results["ours"], results["transformers"]))
        row["captions"] = len(results["ours"])
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    o, t = row["ours"], row["transformers"]
    return (f"| {row['precision']} | {row['batch']} | {o['captions_per_second']:.1f} | {o['p50_batch_ms']:.0f} | "
            f"{o['p99_batch_ms']:.0f} | {t['captions_per_second']:.1f} | {t['p50_batch_ms']:.0f} | "
            f"{t['p99_batch_ms']:.0f} | {row['speedup']:.2f}x | {row['captions_differing']}/{row['captions']} |")


HEADER = ("| precision | batch | ours captions/s | ours p50 ms | ours p99 ms | transformers captions/s | "
          "transformers p50 ms | transformers p99 ms | speed-up | token ids differing |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="large", choices=("tiny", "base", "large"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precisions", default="fp16,fp32")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per batch size")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens per caption (min = max)")
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--out", type=Path, help="directory for results.json and results.md")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch", file=sys.stderr)
        return 2
    dtypes = {"fp16": torch.float16, "fp32": torch.float32}
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{args.preset} architecture, random weights, {args.beams} beams, exactly {args.tokens} new tokens, "
          f"on {device_name}, torch {torch.__version__}\n\n{HEADER}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for precision in args.precisions.split(","):
            rows += measure(args.preset, args.device, dtypes[precision], [int(b) for b in args.batches.split(",")],
                            args.repeats, args.tokens, args.beams, Path(workdir))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"device": device_name, "preset": args.preset,
                                                            "rows": rows}, indent=2))
        (args.out / "results.md").write_text(HEADER + "\n" + "\n".join(_line(r) for r in rows) + "\n")
    fp32_mismatches = sum(r["captions_differing"] for r in rows if r["precision"] == "float32")
    return 1 if fp32_mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
