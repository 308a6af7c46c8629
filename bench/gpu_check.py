"""One prepared check for a lent GPU machine: our serving path against transformers, phase by phase.

    python bench/gpu_check.py --out /tmp/gpu-check        # BLIP-large dims on CUDA: fp32 then fp16, batches 1,8,32,128
    python bench/gpu_check.py --device cpu --preset tiny --batches 1,2 --precisions fp16,fp32 --repeats 1 --out DIR

It needs python3 with torch (a CUDA build), transformers, onnx and onnxruntime (onnxruntime-gpu for the ONNX
encoder on the GPU) and this repository, whose packages it imports from the source tree (`server/`, `bench/`:
nothing of ours need be installed); no Triton, no network, no checkpoint: it builds the BLIP architecture with
random weights (`blip_demo.random_checkpoint`; cost does not depend on weight values when every caption has
exactly `--tokens` new tokens).

A phase is one (precision, batch size); precisions run in the order given (fp32 first by default: its token ids
must equal transformers', the parity check), batch sizes in increasing order. Each phase captions the same random
images

- with our serving path, in process: the vision encoder exported by blip-export's own code
  (`export_vision_encoder_onnx`, `quantize.to_fp16` for fp16) and run by ONNX Runtime's TensorRT or CUDA provider
  (the session must hold it; inputs and outputs stay on the GPU), else PyTorch's vision model on the same GPU,
  said so in the row; then our batched beam-search decoder (`model_repository/text_decoder/1`) in that precision;
- with transformers' `BlipForConditionalGeneration.generate()` on the same device, dtype and batch;

first once untimed (the warm-up: engines, kernels, allocator), comparing ours with transformers' three ways (the
whole path's token ids, our decoder's token ids on transformers' own image embeddings, and the encoders' outputs
by cosine similarity), then in timed rounds that alternate ours and transformers' (token ids compared too),
synchronised on the phase's own device, until `--repeats` rounds or the phase's share of what is left of the time
budget is spent. Latency percentiles come with their sample counts: p99 only from 100
timed batches or more (else the maximum is reported as such).

Phases are independent: one that fails has its traceback printed and recorded, and the others go on. Each phase's
row is appended to `--out/results.jsonl` and `results.md` and `results.json` are rewritten as soon as it ends, so
a run cut short keeps what it measured. `--budget-seconds` (from the start, model building and exports included)
stops starting phases and rounds once spent; the phases left are recorded as skipped. Exit status: 0, or 1 if a
phase failed, fp32 token ids differ from transformers' or nothing was measured, 2 if the device is unusable.

fp32 is exact: no TF32 anywhere (NVIDIA_TF32_OVERRIDE=0 is set before CUDA starts, which cuBLAS, cuDNN and
TensorRT honour; torch's own switches via the decoder's `exact_float32`; ONNX Runtime's CUDA provider with
`use_tf32` 0). TensorRT engines are built once per precision: one optimisation profile from batch 1 to the
largest batch asked for, engine and timing caches under the work directory (`--workdir`, kept if given).
"""

from __future__ import annotations

import os

# Before torch, CUDA or TensorRT start: float32 must stay float32 in cuBLAS, cuDNN and TensorRT engine builds.
os.environ["NVIDIA_TF32_OVERRIDE"] = "0"

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

# The machine it runs on has this repository but not its packages installed: the product's (blip_server), the
# lab's (blip_demo, for the random architecture) and the decoder's modules are imported from the source tree.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "server"), str(ROOT / "bench"), str(ROOT / "model_repository" / "text_decoder" / "1"),
                str(ROOT / "server" / "blip_server" / "shared")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from blip_demo.random_checkpoint import CheckpointSpec, model_configs, randomise  # noqa: E402

BOS, EOS, PAD, VOCAB = 30522, 102, 0, 30524  # BERT's layout, as in the Salesforce checkpoints
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
GPU_PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider"}
P99_SAMPLES = 100  # fewer timed batches than this: no p99 (the maximum of a few samples is not one)
POOL = 4  # distinct pixel batches a phase cycles through


def build_model(preset: str):
    """The architecture of `preset` with random weights, float32 on the CPU; -> (model, image size)."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    spec = CheckpointSpec(preset=preset, seed=0)
    vision, text = model_configs(spec, VOCAB)
    text.update(bos_token_id=BOS, sep_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).eval()
    randomise(model, spec, eos_token_id=EOS)
    return model, vision["image_size"]


# -- the encoder -----------------------------------------------------------------------------------------------

def tensorrt_options(precision: str, device_index: int, workdir: Path, batches: list[int], size: int) -> dict:
    """TensorRT through ONNX Runtime: one optimisation profile for every batch size asked for (so an engine is
    built once, not per shape), engine and timing caches in the work directory, FP16 kernels for fp16 only (fp32
    also has TF32 off: NVIDIA_TF32_OVERRIDE=0)."""
    shape = f"PIXEL_VALUES:{{}}x3x{size}x{size}"
    return {  # strings, as ONNX Runtime parses provider options
        "device_id": str(device_index),
        "trt_fp16_enable": "1" if precision == "fp16" else "0",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(workdir / "tensorrt" / precision),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(workdir / "tensorrt"),
        "trt_max_workspace_size": str(4 << 30),
        "trt_profile_min_shapes": shape.format(1),
        "trt_profile_opt_shapes": shape.format(max(batches)),
        "trt_profile_max_shapes": shape.format(max(batches)),
    }


def gpu_providers(wanted: list[str], available: list[str], precision: str, device_index: int, workdir: Path,
                  batches: list[int], size: int) -> list:
    """ONNX Runtime's providers for a GPU session, in the order wanted, among those this onnxruntime has."""
    providers = []
    for name in wanted:
        provider = GPU_PROVIDERS[name]
        if provider not in available:
            continue
        if name == "tensorrt":
            (workdir / "tensorrt" / precision).mkdir(parents=True, exist_ok=True)
            providers.append((provider, tensorrt_options(precision, device_index, workdir, batches, size)))
        else:  # use_tf32 0: fp32 products stay fp32 (an fp16 graph's are fp16 anyway)
            providers.append((provider, {"device_id": str(device_index), "use_tf32": "0"}))
    return providers


def held_gpu_provider(session, providers: list) -> str | None:
    """The GPU provider the session really holds (ONNX Runtime silently builds a CPU-only session when a GPU
    provider cannot be created: missing CUDA, cuDNN or TensorRT libraries), its CPU fallback for failing runs
    switched off; None if it holds none."""
    wanted = [p[0] if isinstance(p, tuple) else p for p in providers]
    held = [p for p in session.get_providers() if p in wanted]
    if not held:
        return None
    session.disable_fallback()
    return held[0]


class Encoder:
    """The vision encoder as our serving path runs it: the exported ONNX graph on ONNX Runtime (on a GPU: the
    TensorRT or CUDA provider, inputs and outputs bound to GPU memory), else PyTorch's vision model on the GPU."""

    def __init__(self, model, onnx_path: Path, precision: str, device: torch.device, workdir: Path,
                 batches: list[int], wanted: list[str]):
        self.device, self.session, self.note = device, None, None
        config = model.config.vision_config
        self.tokens = (config.image_size // config.patch_size) ** 2 + 1
        self.hidden = config.hidden_size
        self.vision = model.vision_model
        if device.type == "cpu":
            import onnxruntime as ort

            self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            self.provider = self.session.get_providers()[0]
            self.kind = f"onnxruntime {self.provider}"
            return
        try:
            import onnxruntime as ort
        except ImportError:
            self._on_torch("onnxruntime is not installed")
            return
        if hasattr(ort, "preload_dlls"):  # the CUDA and cuDNN libraries torch's wheels brought, for onnxruntime-gpu
            try:
                ort.preload_dlls()
            except Exception as exc:  # noqa: BLE001 - the session check below says whether it mattered
                print(f"gpu_check: onnxruntime.preload_dlls() failed: {exc}", flush=True)
        providers = gpu_providers(wanted, ort.get_available_providers(), precision, device.index, workdir, batches,
                                  config.image_size)
        if not providers:
            self._on_torch(f"onnxruntime {ort.__version__} has no GPU provider among {wanted} (it has "
                           f"{', '.join(ort.get_available_providers())}; install onnxruntime-gpu)")
            return
        while providers:
            try:
                session = ort.InferenceSession(str(onnx_path), providers=providers)
                held = held_gpu_provider(session, providers)
                if held is None:
                    self._on_torch(f"onnxruntime could not create {', '.join(p[0] for p in providers)} (the session "
                                   f"holds {', '.join(session.get_providers())}; its log above says why)")
                    return
                self.session, self.provider = session, held
                self.kind = f"onnxruntime {held} on {device}"
                self._warm_up()
                return
            except Exception as exc:  # noqa: BLE001 - TensorRT failing to build: the next provider, said so
                if len(providers) == 1:
                    raise
                self.note = f"{providers[0][0]} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                print(f"gpu_check: encoder: {self.note}; trying {providers[1][0]}", flush=True)
                self.session, providers = None, providers[1:]

    def _warm_up(self) -> None:
        """One run: it builds TensorRT's engine (the whole profile at once), so that a failure shows here."""
        size = self.vision.config.image_size
        self(torch.zeros((1, 3, size, size), device=self.device))

    def _on_torch(self, why: str) -> None:
        self.provider = None
        self.kind = f"torch vision model on {self.device}"
        self.note = why
        print(f"gpu_check: encoder: {self.kind}, because {why}", flush=True)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels float32 [n, 3, H, W] on the device -> image embeddings [n, tokens, hidden] on the device."""
        if self.session is None:
            with torch.inference_mode():
                return self.vision(pixel_values=pixels.to(self.vision.dtype)).last_hidden_state
        if self.device.type == "cpu":
            return torch.from_numpy(self.session.run(None, {"PIXEL_VALUES": pixels.numpy()})[0])
        pixels = pixels.contiguous()
        out = torch.empty((len(pixels), self.tokens, self.hidden), dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        binding.bind_input("PIXEL_VALUES", "cuda", self.device.index, np.float32, tuple(pixels.shape),
                           pixels.data_ptr())
        binding.bind_output("IMAGE_EMBEDS", "cuda", self.device.index, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.synchronize(self.device)  # torch's writes to the pixels are done before ONNX Runtime's stream reads
        self.session.run_with_iobinding(binding)  # returns once its stream has finished
        return out


# -- one precision ---------------------------------------------------------------------------------------------

class Setup:
    """Everything a precision's phases share: the model in that precision on the device, our encoder and decoder."""

    def __init__(self, master, size: int, precision: str, device: torch.device, workdir: Path, batches: list[int],
                 wanted: list[str], beams: int, tokens: int):
        from blip_text_decoder import BlipTextDecoder, DecoderConfig, exact_float32
        from generation_options import GenerationOptions

        from blip_server.checkpoint import decoder_config

        self.precision, self.device, self.dtype, self.size = precision, device, DTYPES[precision], size
        self.beams, self.tokens = beams, tokens
        if exact_float32(device, self.dtype):  # torch's TF32 switches off, for our decoder and transformers alike
            print("gpu_check: float32 on the GPU without TF32", flush=True)
        self.model = copy.deepcopy(master).to(device=device, dtype=self.dtype).eval()
        print(f"gpu_check: {precision}: exporting the encoder as blip-export does", flush=True)
        onnx_path = export_encoder(master, size, precision, workdir)
        self.encoder = Encoder(self.model, onnx_path, precision, device, workdir, batches, wanted)
        print(f"gpu_check: {precision}: encoder {self.encoder.kind}", flush=True)
        self.decoder = BlipTextDecoder(DecoderConfig(**decoder_config(self.model.config.text_config)),
                                       self.model.text_decoder.state_dict(), device=device, dtype=self.dtype)
        self.options = GenerationOptions(num_beams=beams, max_new_tokens=tokens, min_new_tokens=tokens)

    def ours(self, pixels: torch.Tensor, embeds: torch.Tensor | None = None) -> list[list[int]]:
        """Our path: encoder then decoder (or the decoder alone on given embeddings)."""
        from caption_generation import generate

        embeds = self.encoder(pixels) if embeds is None else embeds
        results = generate(self.decoder, embeds, [[BOS]] * len(pixels), [self.options] * len(pixels))
        return [r[0].tokens for r in results]

    def theirs(self, pixels: torch.Tensor) -> list[list[int]]:
        with torch.inference_mode():
            out = self.model.generate(pixel_values=pixels.to(self.dtype), num_beams=self.beams,
                                      max_new_tokens=self.tokens, min_new_tokens=self.tokens)
        return out.tolist()

    def their_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.vision_model(pixel_values=pixels.to(self.dtype)).last_hidden_state


def export_encoder(master, size: int, precision: str, workdir: Path) -> Path:
    """The encoder as blip-export writes it (fp32, or fp16 inside with fp32 inputs and outputs), once per run."""
    from blip_server.export import export_vision_encoder_onnx
    from blip_server.quantize import to_fp16

    fp32 = workdir / "encoder-fp32.onnx"
    if not fp32.exists():
        export_vision_encoder_onnx(master.vision_model, fp32, size, size)
    if precision == "fp32":
        return fp32
    path = workdir / f"encoder-{precision}.onnx"
    if not path.exists():
        shutil.copyfile(fp32, path)
        to_fp16(path)
    return path


# -- measuring -------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run, pixels: torch.Tensor, device: torch.device) -> tuple[list, float]:
    _sync(device)
    started = time.perf_counter()
    output = run(pixels)
    _sync(device)
    return output, time.perf_counter() - started


def latency(seconds: list[float], batch: int) -> dict:
    """Throughput and latency of timed batches, each percentile with the samples it came from."""
    n = len(seconds)
    return {
        "samples": n,
        "captions_per_second": batch * n / sum(seconds),
        "p50_batch_ms": statistics.median(seconds) * 1000,
        "p90_batch_ms": float(np.percentile(seconds, 90)) * 1000 if n >= 10 else None,
        "p99_batch_ms": float(np.percentile(seconds, 99)) * 1000 if n >= P99_SAMPLES else None,
        "max_batch_ms": max(seconds) * 1000,
    }


def _differing(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x != y for x, y in zip(a, b, strict=True))


def run_phase(setup: Setup, batch: int, row: dict, repeats: int, phase_deadline: float, deadline: float) -> None:
    """Fills `row`: correctness (untimed, also the warm-up), then timed rounds alternating ours and transformers'."""
    from blip_server.quantize import encoder_cosine

    device = setup.device
    generator = torch.Generator().manual_seed(1000 + batch)
    pool = [torch.randn(batch, 3, setup.size, setup.size, generator=generator).to(device)
            for _ in range(min(POOL, max(repeats, 1)))]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ours, theirs = setup.ours(pool[0]), setup.theirs(pool[0])
    their_embeds = setup.their_embeds(pool[0])
    ours_on_their_embeds = setup.ours(pool[0], their_embeds)
    row["encoder_cosine"] = encoder_cosine(setup.encoder(pool[0]).float().cpu().numpy(),
                                           their_embeds.float().cpu().numpy())
    row["decoder_captions_differing"] = _differing(ours_on_their_embeds, theirs)
    differing, captions = _differing(ours, theirs), len(ours)

    seconds = {"ours": [], "transformers": []}
    row["stopped_by"] = "repeats"
    for i in range(repeats):
        now = time.monotonic()
        if i and now >= deadline:
            row["stopped_by"] = "time budget"
            break
        if i and now >= phase_deadline:
            row["stopped_by"] = "phase's share of the time budget"
            break
        pixels = pool[i % len(pool)]
        ours, s = _timed(setup.ours, pixels, device)
        seconds["ours"].append(s)
        theirs, s = _timed(setup.theirs, pixels, device)
        seconds["transformers"].append(s)
        differing += _differing(ours, theirs)
        captions += len(ours)
    for name, values in seconds.items():
        row[name] = latency(values, batch)
    row["speedup"] = row["ours"]["captions_per_second"] / row["transformers"]["captions_per_second"]
    row["captions"], row["captions_differing"] = captions, differing
    if device.type == "cuda":
        row["torch_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20


# -- results ---------------------------------------------------------------------------------------------------

class Results:
    """Rows as they come: one JSON line per phase appended to results.jsonl (flushed to disk), results.md and
    results.json rewritten after every phase."""

    def __init__(self, out: Path | None, run: dict):
        self.out, self.run, self.rows = out, run, []
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.jsonl").write_text("")
            self._rewrite()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.out is not None:
            with (self.out / "results.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._rewrite()
        print(markdown_row(row), flush=True)
        if row.get("traceback"):
            print(row["traceback"], file=sys.stderr, flush=True)

    def _rewrite(self) -> None:
        (self.out / "results.json").write_text(json.dumps({"run": self.run, "rows": self.rows}, indent=2) + "\n")
        (self.out / "results.md").write_text(markdown(self.run, self.rows))


HEADER = ("| precision | batch | status | encoder | ours captions/s | ours p50 / p99 / max ms "
          "| transformers captions/s | transformers p50 / p99 / max ms | timed batches | speed-up "
          "| token ids differing (path; our decoder on their embeddings) | encoder cosine |\n"
          "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def _ms(stats: dict) -> str:
    p99 = f"{stats['p99_batch_ms']:.0f}" if stats["p99_batch_ms"] is not None else f"n/a (<{P99_SAMPLES})"
    return f"{stats['p50_batch_ms']:.0f} / {p99} / {stats['max_batch_ms']:.0f}"


def markdown_row(row: dict) -> str:
    head = f"| {row['precision']} | {row['batch']} | {row['status']} |"
    if row["status"] != "ok":
        return f"{head} {row.get('encoder') or ''} | {row.get('error', '')} |" + " |" * 7
    o, t = row["ours"], row["transformers"]
    return (f"{head} {row['encoder']} | {o['captions_per_second']:.1f} | {_ms(o)} | {t['captions_per_second']:.1f} | "
            f"{_ms(t)} | {o['samples']} ({row['stopped_by']}) | {row['speedup']:.2f}x | "
            f"{row['captions_differing']}/{row['captions']}; {row['decoder_captions_differing']}/{row['batch']} | "
            f"{row['encoder_cosine']:.6f} |")


def markdown(run: dict, rows: list[dict]) -> str:
    lines = [f"# gpu_check: {run['preset']} architecture, random weights, {run['beams']} beams, exactly "
             f"{run['tokens']} new tokens", "",
             f"{run['device_name']}; torch {run['torch']}, transformers {run['transformers']}, onnxruntime "
             f"{run['onnxruntime']}; NVIDIA_TF32_OVERRIDE={run['NVIDIA_TF32_OVERRIDE']}; time budget "
             f"{run['budget_seconds']:.0f} s. p99 needs {P99_SAMPLES} timed batches; fewer: p50 and the maximum.",
             "", HEADER] + [markdown_row(r) for r in rows]
    notes = [f"- {r['precision']} batch {r['batch']}: encoder {r['encoder']} because {r['encoder_note']}"
             for r in rows if r.get("encoder_note")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


# -- the run ---------------------------------------------------------------------------------------------------

def _versions() -> dict:
    import transformers

    try:
        import onnxruntime

        ort_version = f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"
    except ImportError:
        ort_version = "not installed"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnxruntime": ort_version}


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="large", choices=("tiny", "base", "large"))
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--precisions", default="fp32,fp16", help="in the order to run them")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--repeats", type=int, default=P99_SAMPLES, help="timed batches per phase, at most")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens per caption (min = max)")
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--budget-seconds", type=float, default=450.0,
                        help="stop starting phases and timed rounds after this long (default: a 10-minute GPU "
                             "session's command, with room for the last phase and the writes)")
    parser.add_argument("--encoder-providers", default="tensorrt,cuda",
                        help="ONNX Runtime GPU providers to try for the encoder, in order (tensorrt, cuda)")
    parser.add_argument("--out", type=Path, help="directory for results.jsonl, results.md and results.json")
    parser.add_argument("--workdir", type=Path,
                        help="where the ONNX encoders and TensorRT caches go (kept); default: a temporary directory")
    # Tests only: make the phase PRECISION:BATCH raise, to check that the other phases are kept.
    parser.add_argument("--fail-phase", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    precisions = args.precisions.split(",")
    batches = sorted(int(b) for b in args.batches.split(","))
    wanted = args.encoder_providers.split(",")
    if unknown := [p for p in precisions if p not in DTYPES] + [p for p in wanted if p not in GPU_PROVIDERS]:
        parser.error(f"unknown precision or provider: {', '.join(unknown)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"gpu_check: no CUDA device visible to torch {torch.__version__}", file=sys.stderr)
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    run = {"command": [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "preset": args.preset, "device": str(device),
           "device_name": device_name, "beams": args.beams, "tokens": args.tokens,
           "budget_seconds": args.budget_seconds, "repeats": args.repeats,
           "NVIDIA_TF32_OVERRIDE": os.environ.get("NVIDIA_TF32_OVERRIDE"), "python": sys.version.split()[0],
           "cuda": torch.version.cuda, **_versions()}
    results = Results(args.out, run)
    print(f"{args.preset} architecture, random weights, {args.beams} beams, exactly {args.tokens} new tokens, on "
          f"{device_name}; torch {run['torch']}, transformers {run['transformers']}, onnxruntime {run['onnxruntime']}"
          f"\n\n{HEADER}", flush=True)

    deadline = started + args.budget_seconds
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    phases = [(p, b) for p in precisions for b in batches]
    master = None
    try:
        for precision in precisions:
            setup, setup_failure = None, None
            for batch in batches:
                left = len(phases) - len(results.rows)
                row = {"precision": precision, "batch": batch, "status": "ok", "encoder": None}
                if time.monotonic() >= deadline:
                    row.update(status="skipped", error="time budget spent before it started")
                    results.add(row)
                    continue
                phase_started = time.monotonic()
                try:
                    if setup_failure is not None:
                        raise RuntimeError(f"the {precision} setup failed (see its first phase): {setup_failure}")
                    if setup is None:
                        try:
                            if master is None:
                                print(f"gpu_check: building the {args.preset} architecture", flush=True)
                                master, size = build_model(args.preset)
                            setup = Setup(master, size, precision, device, workdir, batches, wanted, args.beams,
                                          args.tokens)
                        except Exception as exc:
                            setup_failure = f"{type(exc).__name__}: {exc}"
                            raise
                        finally:
                            row["setup_seconds"] = time.monotonic() - phase_started
                    row["encoder"], row["encoder_note"] = setup.encoder.kind, setup.encoder.note
                    if args.fail_phase == f"{precision}:{batch}":
                        raise RuntimeError("injected failure (--fail-phase): this phase fails on purpose")
                    # This phase's share of what is left of the budget, its setup and warm-up counted in it.
                    share = max(0.0, deadline - time.monotonic()) / left
                    run_phase(setup, batch, row, args.repeats, time.monotonic() + share, deadline)
                except Exception as exc:  # noqa: BLE001 - a failing phase must not lose the others
                    row.update(status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                               traceback=traceback.format_exc())
                row["seconds"] = time.monotonic() - phase_started
                results.add(row)
                if row["status"] == "failed" and device.type == "cuda":
                    torch.cuda.empty_cache()  # what the failed phase held (out of memory, say), for the next one
            setup = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    failed = [r for r in results.rows if r["status"] == "failed"]
    skipped = [r for r in results.rows if r["status"] == "skipped"]
    fp32_differing = [r for r in results.rows if r["status"] == "ok" and r["precision"] == "fp32"
                      and (r["captions_differing"] or r["decoder_captions_differing"])]
    print(f"\n{len(results.rows) - len(failed) - len(skipped)} phases measured, {len(failed)} failed, {len(skipped)} "
          f"skipped (time budget); fp32 token ids differing from transformers' in {len(fp32_differing)} phases; "
          f"{time.monotonic() - started:.0f} s" + (f"; results in {args.out}" if args.out else ""), flush=True)
    if len(skipped) == len(results.rows):
        print("gpu_check: nothing was measured", file=sys.stderr)
    return 1 if failed or fp32_differing or len(skipped) == len(results.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
