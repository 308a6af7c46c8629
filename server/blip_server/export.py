"""`blip-export`: a HuggingFace BLIP captioning checkpoint -> a complete Triton model repository.

The repository is the template in `model_repository/` (configs and Python models) plus what the checkpoint
provides:

- `vision_encoder/1/model.onnx`: BlipVisionModel with a dynamic batch axis, verified against PyTorch;
- `text_decoder/1/decoder.safetensors` + `decoder_config.json`: the text decoder's weights and sizes;
- `preprocess/1/image_processor.json`, `preprocess.json` and both models' `tokenizer.json`: preprocessing,
  special token ids and the tokenizer, all read from the checkpoint;
- the modules of `blip_server.shared` next to the models that import them (`generation_options.py` in both,
  `image_header.py` in `preprocess`), so the gateway and both models check options and images alike;
- `configs/gpu.pbtxt` beside the encoder's and decoder's `config.pbtxt`: the same models on GPUs, picked with
  Triton's `--model-config-name=gpu` (`blip-serve --device cuda` does);
- `blip_export.json`: what was exported, from where, and how.

`--target triton-container` serves the encoder with the native `onnxruntime` backend of NVIDIA's
`nvcr.io/nvidia/tritonserver:24.10-py3` image instead (TensorRT in its GPU config); `--precision fp16` exports an
fp16 encoder (inputs and outputs stay fp32), checked against PyTorch's fp32 encoder by cosine similarity, and
has the GPU decoder run in fp16.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from blip_server.checkpoint import (
    GENERATION_OPTIONS,
    check_layout,
    content_digest,
    decoder_config,
    generation_settings,
    image_settings,
)
from blip_server.config import IMAGE_PROCESSORS, PRECISIONS
from blip_server.errors import ExportError
from blip_server.model_configs import (
    EncoderShape,
    add_parameters,
    set_parameters,
    write_cached_ensemble,
    write_container_encoder_configs,
    write_option_configs,
    write_python_gpu_configs,
)
from blip_server.repository import MANIFEST, SHARED_BY_MODEL, read_manifest, shared_directory, template_directory
from blip_server.repository_copy import RepositoryCopyError, check_replaceable, replace_directory

log = logging.getLogger(__name__)

TARGETS = ("embedded", "triton-container")
# Smallest cosine similarity between a lower precision encoder's output vectors and PyTorch's fp32 ones that
# an export accepts (int8 is measured higher on real architectures: see the README; this floor catches breakage).
MIN_COSINE = {"fp16": 0.999, "int8": 0.98}


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """How to export.

    precision: numeric precision of the exported encoder and decoder.
    target: `embedded` (the pip-installed tritonserver: Python backend only) or `triton-container`
        (NVIDIA's image: the encoder runs on the native onnxruntime backend).
    opset: ONNX opset of the encoder graph.
    tolerance: largest |onnx - torch| accepted when verifying an fp32 encoder, relative to max |torch|.
    int8_method: how an int8 encoder is quantised, `dynamic` or `static` (see `quantize`).
    image_processor: which backend of transformers' BlipImageProcessor the pixels equal: `pil` (what
        `AutoProcessor` picks without torchvision installed, as in a plain install of this package) or
        `torchvision` (what it picks with torchvision installed).
    """

    precision: str = "fp32"
    target: str = "embedded"
    opset: int = 17
    tolerance: float = 1e-4
    int8_method: str = "dynamic"
    image_processor: str = "pil"


def export_fingerprint(options: ExportOptions) -> str:
    """What an export depends on besides the checkpoint: the options, the model repository template and the code
    that writes it. Two exports with the same checkpoint content and fingerprint are the same export."""
    from blip_server import checkpoint as checkpoint_module
    from blip_server import model_configs as model_configs_module
    from blip_server import quantize as quantize_module

    digest = hashlib.sha256(repr(sorted(vars(options).items())).encode())
    template = template_directory()
    sources = sorted(p for p in template.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    sources += sorted(shared_directory().glob("*.py"))
    sources += [Path(m.__file__) for m in (checkpoint_module, model_configs_module, quantize_module)]
    sources.append(Path(__file__))
    for path in sources:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def export_checkpoint(checkpoint: str | Path, output: str | Path, options: ExportOptions = ExportOptions()) -> dict:
    """Export `checkpoint` into the directory `output`; returns the manifest.

    Idempotent: an `output` that already holds this export (same checkpoint content, options and export code) is
    kept as it is; one holding another export is replaced in one step once the new one is complete; a directory
    holding anything else is refused.
    """
    checkpoint, output = Path(checkpoint).resolve(), Path(output)
    if options.precision not in PRECISIONS:
        raise ExportError(f"precision {options.precision!r} is not supported; choose from {', '.join(PRECISIONS)}")
    if options.target not in TARGETS:
        raise ExportError(f"target {options.target!r} is not supported; choose from {', '.join(TARGETS)}")
    if options.image_processor not in IMAGE_PROCESSORS:
        raise ExportError(f"image processor {options.image_processor!r} is not supported; choose from "
                          f"{', '.join(IMAGE_PROCESSORS)}")
    check_layout(checkpoint)
    identity = {"checkpoint_sha256": content_digest(checkpoint), "export_fingerprint": export_fingerprint(options)}
    existing = read_manifest(output)
    if existing and all(existing.get(key) == value for key, value in identity.items()):
        log.info("%s already holds this export of %s: kept", output, checkpoint)
        return existing
    try:
        check_replaceable(output)
    except RepositoryCopyError as exc:
        raise ExportError(str(exc)) from None
    # Build beside the destination and move it into place at the end: no reader ever sees half a repository.
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.parent / f".{output.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        manifest = _export(checkpoint, partial, options, identity)
        _readable_by_all(partial)
        replace_directory(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def _export(checkpoint: Path, output: Path, options: ExportOptions, identity: dict[str, str]) -> dict:
    import torch
    import transformers
    from transformers import AutoProcessor, BlipForConditionalGeneration

    started = time.monotonic()
    log.info("loading %s", checkpoint)
    try:
        # The checkpoint the operator named: a local directory (a hub snapshot) whose files' digests the manifest
        # records. A hub id is taken as transformers takes it; pinning a revision is the operator's download step.
        processor = AutoProcessor.from_pretrained(checkpoint)  # nosec B615
        model = BlipForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()  # nosec B615
    except Exception as exc:
        raise ExportError(f"transformers could not load {checkpoint}: {exc}") from exc
    vision_config, text_config = model.config.vision_config, model.config.text_config
    images = image_settings(processor.image_processor, vision_config.image_size)
    if options.image_processor == "torchvision" and images["resample"] != Image.Resampling.BICUBIC:
        raise ExportError(f"--image-processor torchvision supports bicubic resampling only; this checkpoint "
                          f"resamples with {images['resample']}")
    images["backend"] = options.image_processor

    shutil.copytree(template_directory(), output, ignore=shutil.ignore_patterns("__pycache__", ".gitkeep"),
                    dirs_exist_ok=True)
    preprocess, encoder, decoder = (output / name / "1" for name in ("preprocess", "vision_encoder", "text_decoder"))
    write_option_configs(output)  # the options' inputs and parameters, from their declaration
    write_cached_ensemble(output)  # blip_caption with the response cache, from the config just written

    log.info("exporting the vision encoder to ONNX")
    cosine = _export_vision_encoder(model.vision_model, encoder / "model.onnx", images["height"], images["width"],
                                    options, processor.image_processor)

    log.info("writing the text decoder")
    _write_json(decoder / "decoder_config.json", decoder_config(text_config))
    _save_decoder_weights(model.text_decoder, decoder / "decoder.safetensors")
    tokenizer = processor.tokenizer
    for directory in (preprocess, decoder):
        tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))
    _write_json(decoder / "decoding.json",
                {"clean_up_tokenization_spaces": bool(tokenizer.clean_up_tokenization_spaces)})
    _write_json(preprocess / "image_processor.json", images)
    _write_json(preprocess / "preprocess.json", {"bos_token_id": text_config.bos_token_id,
                                                 "max_position_embeddings": text_config.max_position_embeddings})
    for model, modules in SHARED_BY_MODEL.items():
        for module in modules:
            shutil.copy2(shared_directory() / module, output / model / "1" / module)

    add_parameters(output / "preprocess" / "config.pbtxt", "What is served (blip-export); GetModelInfo reports it.",
                   source_checkpoint=checkpoint, precision=options.precision,
                   image_height=images["height"], image_width=images["width"])
    set_parameters(output / "preprocess" / "config.pbtxt", **_generation_defaults(checkpoint))
    if options.target == "triton-container":
        tokens = (images["height"] // vision_config.patch_size) * (images["width"] // vision_config.patch_size) + 1
        shape = EncoderShape(images["height"], images["width"], tokens, vision_config.hidden_size)
        write_container_encoder_configs(output / "vision_encoder", shape, options.precision)
    if options.precision == "int8":
        add_parameters(output / "text_decoder" / "config.pbtxt", "The decoder's linear layers in int8 (blip-export).",
                       quantization="int8")
    write_python_gpu_configs(output, options.precision)

    manifest = {
        "format": 1,
        "source": str(checkpoint),
        **identity,
        **asdict(options),
        "image_size": [images["height"], images["width"]],
        "encoder_cosine_to_fp32": cosine,
        "vocab_size": text_config.vocab_size,
        "special_token_ids": {k: decoder_config(text_config)[k]
                              for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]},
    }
    _write_json(output / MANIFEST, manifest)
    log.info("exported in %.1f s", time.monotonic() - started)
    return manifest


def _generation_defaults(checkpoint: Path) -> dict[str, str]:
    """`default_*` parameters of preprocess for what the checkpoint's generation_config.json sets, checked
    against the limits (a default no request could use is an error now, not on every request)."""
    from blip_server.shared.generation_options import GenerationLimits, GenerationOptions, OptionError

    settings = generation_settings(checkpoint)
    render = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
    defaults = {f"default_{k}": render(v) for k, v in settings.items() if k in GENERATION_OPTIONS}
    for length, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        if length in settings and new not in settings:  # counted in total tokens: BOS alone, without a prompt
            defaults[f"default_{length}"] = str(settings[length])
            defaults[f"default_{new}"] = str(max(0, settings[length] - 1))
    probe = GenerationOptions().with_values(**{k: v for k, v in settings.items() if k in GENERATION_OPTIONS})
    try:
        probe.validate(GenerationLimits(), prompt_tokens=1, max_positions=1 << 30)
    except OptionError as exc:
        raise ExportError(f"the checkpoint's generation_config.json: {exc}") from None
    if defaults:
        log.info("generation defaults from the checkpoint: %s", defaults)
    return defaults


def _readable_by_all(directory: Path) -> None:
    """Every file of the repository readable, and every directory searchable, by every user: Triton runs as
    another user than the export (uid 1000 and 10001 in the images), and some writers create files for their owner
    alone (safetensors writes 0600)."""
    for path in (directory, *directory.rglob("*")):
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | (0o755 if path.is_dir() else 0o444))


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _save_decoder_weights(text_decoder, path: Path) -> None:
    from safetensors.torch import save_file

    # Tied tensors (LM head = word embeddings) share storage; safetensors wants each saved on its own.
    tensors = {name: tensor.detach().clone().contiguous() for name, tensor in text_decoder.state_dict().items()}
    save_file(tensors, str(path))


def export_vision_encoder_onnx(vision_model, path: Path, height: int, width: int, opset: int = 17):
    """A BlipVisionModel (float32, on the CPU) as the fp32 ONNX graph every export starts from: PIXEL_VALUES
    [batch, 3, height, width] -> IMAGE_EMBEDS [batch, tokens, hidden], the batch axis dynamic. Not verified here
    (`blip-export` checks it against PyTorch afterwards); `quantize.to_fp16` turns it into the fp16 encoder.
    Returns the exported module (pixel_values -> last_hidden_state)."""
    import torch

    class VisionEncoder(torch.nn.Module):
        def __init__(self, vision):
            super().__init__()
            self.vision = vision

        def forward(self, pixel_values):
            return self.vision(pixel_values=pixel_values).last_hidden_state

    wrapper = VisionEncoder(vision_model).eval()
    # The TorchScript-based exporter: deterministic, no extra dependency, fine for a ViT (torch is pinned).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper,
            (_example_pixels(height, width),),
            str(path),
            input_names=["PIXEL_VALUES"],
            output_names=["IMAGE_EMBEDS"],
            dynamic_axes={"PIXEL_VALUES": {0: "batch"}, "IMAGE_EMBEDS": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return wrapper


def _example_pixels(height: int, width: int):
    import torch

    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))


def _export_vision_encoder(vision_model, path: Path, height: int, width: int, options: ExportOptions,
                           image_processor) -> float | None:
    """model.onnx at `path`, in the options' precision; returns the cosine similarity of a lower precision's
    outputs to PyTorch's fp32 ones (None for fp32, whose largest difference is checked instead)."""
    import numpy as np
    import onnxruntime
    import torch

    from blip_server.quantize import calibration_pixels, encoder_cosine, quantize_int8, to_fp16

    wrapper = export_vision_encoder_onnx(vision_model, path, height, width, options.opset)
    example = _example_pixels(height, width)
    if options.precision != "fp32":  # checked on images like those it will see, apart from calibration's
        example = torch.from_numpy(calibration_pixels(image_processor, 4, seed=1))
    with torch.inference_mode():
        expected = wrapper(example).numpy()
    def run(model: Path) -> np.ndarray:
        session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        return session.run(None, {"PIXEL_VALUES": example.numpy()})[0]

    if options.precision == "fp16":
        to_fp16(path)
    elif options.precision == "int8":
        _, plan = quantize_int8(path, options.int8_method, calibration_pixels(image_processor, 16, seed=0),
                                cosine=lambda candidate: encoder_cosine(run(candidate), expected))
        log.info("int8 vision encoder: %s", plan)
    actual = run(path)
    if options.precision == "fp32":
        error = float(np.abs(actual - expected).max()) / max(1.0, float(np.abs(expected).max()))
        if not np.isfinite(error) or error > options.tolerance:
            raise ExportError(f"the ONNX vision encoder differs from PyTorch by {error:.2e} "
                              f"(tolerance {options.tolerance})")
        log.info("ONNX vision encoder verified: relative max difference %.2e", error)
        return None
    cosine = encoder_cosine(actual, expected)
    least = MIN_COSINE[options.precision]
    if not cosine >= least:
        raise ExportError(f"the {options.precision} vision encoder's outputs have a cosine similarity of "
                          f"{cosine:.5f} to PyTorch's fp32 ones (at least {least} needed)")
    log.info("%s ONNX vision encoder verified: smallest cosine similarity to fp32 %.6f", options.precision, cosine)
    return cosine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="blip-export", description="Export a HuggingFace BLIP captioning checkpoint to a Triton model repository."
    )
    parser.add_argument("--model", required=True, help="HuggingFace checkpoint directory (a hub snapshot)")
    parser.add_argument("--output", required=True,
                        help="model repository to write: a new or empty directory, or an earlier export (kept when "
                             "it is this same export, else replaced once the new one is complete)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--target", choices=TARGETS, default="embedded")
    parser.add_argument("--image-processor", choices=IMAGE_PROCESSORS, default="pil",
                        help="which BlipImageProcessor backend the pixels equal: pil (transformers without "
                             "torchvision installed) or torchvision (with it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        export_checkpoint(args.model, args.output, ExportOptions(precision=args.precision, target=args.target,
                                                                    image_processor=args.image_processor))
    except ExportError as exc:
        print(f"blip-export: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. an output volume this user may not write
        print(f"blip-export: error: cannot write {args.output}: {exc.strerror or exc} ({exc.filename or args.output}; "
              f"running as uid {os.getuid()})", file=sys.stderr)
        return 2
    print(Path(args.output).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
