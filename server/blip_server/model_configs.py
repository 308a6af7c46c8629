"""The `config.pbtxt` files an export writes besides the template's: per target and per device.

- Every export: the generation options' parts of the ensemble's, `preprocess`'s and `text_decoder`'s configs
  (their option inputs, the ensemble's wiring of them, the `default_*` and `limit_*` parameters), written from the
  declaration of the options (`blip_server.shared.generation_options`) between `# BEGIN <block>` and
  `# END <block>` lines of the template; `python -m blip_server.model_configs` writes them into the template
  itself, and docs/limits.md's table of the options.
- Every export: `blip_caption_cached`, the ensemble's config with Triton's response cache on (the template's
  `blip_caption` caches nothing: unseeded samples go there).
- Every export: `preprocess/config.pbtxt` gains what was served (source checkpoint, precision, image size), so
  any gateway in front of any replica can describe the model without the export's files.
- Every export: `configs/gpu.pbtxt` for `vision_encoder` and `text_decoder`, chosen by Triton's
  `--model-config-name=gpu` (a model without one keeps its `config.pbtxt`): `KIND_GPU` instances.
- `triton-container`: the encoder on Triton's native `onnxruntime` backend (NVIDIA's image), CPU by default; its
  GPU config adds the TensorRT execution accelerator (in the export's precision: FP32 for an fp32 export, which
  must be exact, FP16 for fp16; engine and timing caches on a volume, in a folder named after the
  ONNX file's content; one optimisation profile for batch 1..max_batch_size) and warm-up requests, so the model
  reports ready only once its engines are built.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from blip_server.repository import CACHED_ENSEMBLE, ENSEMBLE, parse_config, template_directory
from blip_server.shared.generation_options import LIMITS, OPTIONS, Limit, Option, render_parameter

GPU_CONFIG = "gpu"
# Where the container's TensorRT engines and timing cache live: a volume, so restarts skip the engine build.
TENSORRT_CACHE = "/cache/tensorrt"


@dataclass(frozen=True)
class EncoderShape:
    height: int
    width: int
    tokens: int  # patches + the class token
    hidden: int


def _write(path: Path, config: mc.ModelConfig, header: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
                    + text_format.MessageToString(config))


def _set_parameter(config: mc.ModelConfig, key: str, value) -> None:
    config.parameters[key].string_value = str(value)


def add_parameters(path: Path, comment: str, **values) -> None:
    """Append string parameters to a config.pbtxt, keeping its text (and comments) as it is."""
    extra = mc.ModelConfig()
    for key, value in values.items():
        _set_parameter(extra, key, value)
    with path.open("a") as f:
        f.write(f"# {comment}\n" + text_format.MessageToString(extra))


def set_parameters(path: Path, **values) -> None:
    """Set string parameters of a config.pbtxt, keeping its text and comments: a parameter's value is replaced
    where it is, one the file lacks is appended."""
    import re

    text = path.read_text()
    missing = {}
    for key, value in values.items():
        rendered = text_format.MessageToString(mc.ModelParameter(string_value=str(value)), as_one_line=True)
        pattern = re.compile(r'(parameters \{ key: "' + re.escape(key) + r'" value: )\{[^}]*\}')
        text, found = pattern.subn(lambda m, rendered=rendered: m.group(1) + "{ " + rendered + " }", text)
        if not found:
            missing[key] = value
    path.write_text(text)
    if missing:
        add_parameters(path, "Set by blip-export.", **missing)


def _gpu_instances(config: mc.ModelConfig) -> None:
    del config.instance_group[:]
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_GPU)


# TensorRT's precision for each export precision. int8 (ONNX Runtime's dynamic quantisation, torch's int8 linear
# layers) is the CPU's: its GPU configs refuse to load (the models check the `precision` parameter).
TENSORRT_PRECISION = {"fp32": "FP32", "fp16": "FP16"}


def write_python_gpu_configs(repository: Path, precision: str) -> None:
    """`configs/gpu.pbtxt` for the Python-backend encoder (ONNX Runtime's CUDA provider) and decoder."""
    for model in ("vision_encoder", "text_decoder"):
        directory = repository / model
        if not (directory / "1" / "model.py").is_file():
            continue  # the container's encoder is native onnxruntime: its GPU config is written below
        config = parse_config(directory / "config.pbtxt")
        _gpu_instances(config)
        _set_parameter(config, "threads", 1)  # the GPU does the work: one CPU thread feeds it
        _set_parameter(config, "precision", precision)
        if model == "vision_encoder":
            _set_parameter(config, "images_per_run", 0)  # a GPU runs the whole batch at once
        if model == "text_decoder":
            _set_parameter(config, "dtype", "float16" if precision == "fp16" else "float32")
        _write(directory / "configs" / f"{GPU_CONFIG}.pbtxt", config,
               f"{model} on a GPU (tritonserver --model-config-name={GPU_CONFIG}); written by blip-export.\n"
               "Same model as config.pbtxt, one instance on each GPU Triton assigns it.")


def write_cached_ensemble(repository: Path) -> None:
    """`blip_caption_cached`: the ensemble's config (its options' blocks written) under that name, with Triton's
    response cache on; the same steps, so the same models answer it."""
    config = parse_config(repository / ENSEMBLE / "config.pbtxt")
    config.name = CACHED_ENSEMBLE
    config.response_cache.enable = True
    _write(repository / CACHED_ENSEMBLE / "config.pbtxt", config,
           f"{ENSEMBLE}'s config with Triton's response cache on; written by blip-export (model_configs.py).\n"
           "The gateway sends it deterministic requests (beam search, greedy, seeded sampling): a request whose\n"
           "inputs equal an earlier one's is answered with that one's response without running any step. The\n"
           "cache is the server's (blip-serve --response-cache-mb; with 0 this config loads and caches nothing).")
    (repository / CACHED_ENSEMBLE / "1").mkdir(exist_ok=True)


def engine_cache_path(model: Path) -> str:
    """Where TensorRT engines of `model` (an ONNX file) are cached: ONNX Runtime names engines after the graph's
    name and shapes, not its weights, so a re-exported fine-tune of the same architecture would load the old
    engines from a shared folder and serve the old weights. A folder per content avoids that."""
    with model.open("rb") as f:
        return f"{TENSORRT_CACHE}/{hashlib.file_digest(f, 'sha256').hexdigest()[:16]}"


def write_container_encoder_configs(directory: Path, shape: EncoderShape, precision: str) -> None:
    """The encoder's `config.pbtxt` (CPU) and, for fp32 and fp16, `configs/gpu.pbtxt` (TensorRT) for the native
    onnxruntime backend."""
    config = parse_config(directory / "config.pbtxt")
    config.backend = "onnxruntime"
    config.ClearField("parameters")
    del config.input[0].dims[:]
    config.input[0].dims.extend([3, shape.height, shape.width])
    del config.output[0].dims[:]
    config.output[0].dims.extend([shape.tokens, shape.hidden])
    del config.instance_group[:]
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    _write(directory / "config.pbtxt", config,
           "The checkpoint's BlipVisionModel (1/model.onnx) on Triton's onnxruntime backend, on CPU.\n"
           f"configs/{GPU_CONFIG}.pbtxt runs it on GPUs with TensorRT; written by blip-export.")
    for module in ("model.py", "cpu_turns.py"):  # the Python model's, unused by the native backend
        (directory / "1" / module).unlink(missing_ok=True)
    if precision not in TENSORRT_PRECISION:
        return  # int8: CPU only (the decoder's GPU config refuses to load)

    gpu = mc.ModelConfig()
    gpu.CopyFrom(config)
    _gpu_instances(gpu)
    batch = config.max_batch_size
    pixels = f"{config.input[0].name}:{{}}x3x{shape.height}x{shape.width}"
    tensorrt = gpu.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    for key, value in {
        "precision_mode": TENSORRT_PRECISION[precision],
        "max_workspace_size_bytes": str(4 << 30),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": engine_cache_path(directory / "1" / "model.onnx"),
        # No trt_timing_cache_path: the key is not known to be in Triton 24.10's onnxruntime backend (an unknown key
        # fails the load); without it ONNX Runtime keeps the timing cache in trt_engine_cache_path.
        "trt_timing_cache_enable": "1",
        "trt_profile_min_shapes": pixels.format(1),
        "trt_profile_opt_shapes": pixels.format(batch),
        "trt_profile_max_shapes": pixels.format(batch),
    }.items():
        tensorrt.parameters[key] = value
    for size in sorted({1, batch}):
        warmup = gpu.model_warmup.add(name=f"batch {size}", batch_size=size, count=1)
        warmup.inputs[config.input[0].name].CopyFrom(mc.ModelWarmup.Input(
            data_type=mc.TYPE_FP32, dims=[3, shape.height, shape.width], random_data=True))
    _write(directory / "configs" / f"{GPU_CONFIG}.pbtxt", gpu,
           "The encoder on GPUs (tritonserver --model-config-name=gpu): ONNX Runtime's TensorRT execution provider\n"
           f"in {TENSORRT_PRECISION[precision]}, one optimisation profile for batch 1..{batch}, "
           f"engines in a folder of {TENSORRT_CACHE} named after model.onnx's content\n"
           "with its timing cache "
           "(mount a volume there: a restart then loads the engines instead of building\n"
           "them for minutes). FP32 runs without TF32 (blip-tritonserver sets NVIDIA_TF32_OVERRIDE=0).\n"
           "The warm-up requests build the engines before the model reports ready. Written by blip-export.")


# -- the generation options' parts of the configs, from their declaration ----------------------------------------

_BLOCK = re.compile(r"^([ \t]*)# BEGIN (?P<name>[^\n]+)\n(?:.*?\n)??[ \t]*# END (?P=name)\n", re.DOTALL | re.MULTILINE)
# The models whose config.pbtxt holds generated blocks.
OPTION_CONFIGS = ("blip_caption", "preprocess", "text_decoder")


def option_blocks(options: Sequence[Option] = OPTIONS, limits: Sequence[Limit] = LIMITS) -> dict[str, list[str]]:
    """The lines of each generated block, by block name."""
    request = [o for o in options if o.request]
    return {
        # The ensemble's and preprocess's inputs: [1] a value, [-1] a list of values.
        "generation option inputs": [f'{{ name: "{o.tensor}" data_type: TYPE_{o.dtype} '
                                     f'dims: [ {-1 if o.repeated else 1} ] optional: true }},' for o in request],
        "generation option input_map": [f'input_map {{ key: "{o.tensor}" value: "{o.tensor}" }}' for o in request],
        # Unset (None) and empty defaults are not stated: a parameter's empty value means unset.
        "generation option defaults": [
            f'parameters {{ key: "default_{o.name}" value: {{ string_value: "{render_parameter(o.default)}" }} }}'
            for o in options if render_parameter(o.default) not in ("", "None")],
        "generation option limits": [f'parameters {{ key: "limit_{limit.name}" value: {{ string_value: '
                                     f'"{limit.default}" }} }}' for limit in limits],
    }


def write_option_blocks(text: str, options: Sequence[Option] = OPTIONS, limits: Sequence[Limit] = LIMITS) -> str:
    """`text` (a config.pbtxt) with each generated block rewritten from the declaration; raises KeyError for a
    block of an unknown name."""
    blocks = option_blocks(options, limits)

    def render(match: re.Match[str]) -> str:
        indent, name = match.group(1), match.group("name")
        lines = [f"{indent}# BEGIN {name}", *(indent + line for line in blocks[name]), f"{indent}# END {name}"]
        return "\n".join(lines) + "\n"

    return _BLOCK.sub(render, text)


def write_option_configs(repository: Path) -> None:
    """The generated blocks of a repository's configs (an export's, or the template), from the declaration."""
    for model in OPTION_CONFIGS:
        path = repository / model / "config.pbtxt"
        path.write_text(write_option_blocks(path.read_text()))


def limits_table(options: Sequence[Option] = OPTIONS) -> str:
    """docs/limits.md's table of the generation options (between its `<!-- BEGIN options -->` and
    `<!-- END options -->` lines)."""
    by_name = {limit.name: limit for limit in LIMITS}

    def bound(value: object) -> str:
        if isinstance(value, str) and value.startswith("limit_"):
            return f"`{value}` ({by_name[value[len('limit_'):]].default})"
        if isinstance(value, str):
            return f"`{value}`"
        return "2^63-1" if value == 2**63 - 1 else f"{value:g}" if isinstance(value, float) else str(value)

    def allowed(o: Option) -> str:
        if o.allowed:
            return o.allowed.format(**{f"limit_{name}": bound(f"limit_{name}") for name in by_name})
        if o.choices:
            return ", ".join(render_parameter(c) for c in o.choices)
        if o.low is None and o.high is None:
            return "true, false" if o.kind is bool else "any"
        low = bound(o.low)
        text = (f"greater than {low}" if o.above_low else f"{low}") + (
            f", at most {bound(o.high)}" if o.above_low else f" to {bound(o.high)}")
        return text + (" and the positions the prompt leaves" if o.fits_positions else "")

    rows = ["| option | type | default | allowed | Triton input |", "| --- | --- | --- | --- | --- |"]
    for o in options:
        kind = f"list of {o.kind.__name__}" if o.repeated else o.kind.__name__
        default = "unset" if o.default is None else f"`{render_parameter(o.default)}`"
        tensor = f"`{o.tensor}` {o.dtype}" if o.request else "none: the checkpoint's generation config"
        rows.append(f"| `{o.name}` | {kind} | {default} | {allowed(o)} | {tensor} |")
    return "\n".join(rows) + "\n"


LIMITS_DOC = Path(__file__).resolve().parents[2] / "docs" / "limits.md"
_DOC_BLOCK = re.compile(r"(<!-- BEGIN options -->\n).*?(<!-- END options -->\n)", re.DOTALL)


def write_limits_doc(text: str) -> str:
    return _DOC_BLOCK.sub(lambda m: m.group(1) + limits_table() + m.group(2), text)


def main() -> int:
    """Rewrite the template's generated blocks and docs/limits.md's table from the declaration."""
    write_option_configs(template_directory())
    LIMITS_DOC.write_text(write_limits_doc(LIMITS_DOC.read_text()))
    print(f"wrote the generation options into {template_directory()} and {LIMITS_DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
