"""Lower-precision vision encoders: fp16 for GPUs, int8 for CPUs, each checked against the fp32 encoder.

- fp16: weights and arithmetic in fp16 (`onnxruntime.transformers.float16`), inputs and outputs fp32;
- int8 `dynamic`: linear layers' weights quantised per channel ahead of time, activations at run time
  (`onnxruntime.quantization.quantize_dynamic`). Which layers stay fp32 is measured, not guessed: the plans
  in `DYNAMIC_PLANS` keep more and more of them fp32, and the first whose outputs reach `TARGET_COSINE` to
  fp32 is kept (else the closest). On the BLIP-large architecture, quantising everything gives 0.99887 and
  keeping the MLP output layers (`fc2`) of the first quarter of the layers fp32 gives 0.99903, at the same
  speed; the small demo model needs its attention projections fp32 (0.948 -> 0.998);
- int8 `static`: weights and activations quantised with ranges calibrated on generated images, QDQ format
  (`quantize_static`).

Quality is measured, not assumed: `encoder_cosine` is the smallest cosine similarity between an encoder's output
vectors and the fp32 ones on the same images.
"""

from __future__ import annotations

import logging
import random
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

INT8_METHODS = ("dynamic", "static")
TARGET_COSINE = 0.999
# Dynamic int8 plans, in order of how much stays fp32: (name, which MatMul nodes stay fp32).
DYNAMIC_PLANS = (
    ("all linear layers int8", lambda layer, kind, layers: False),
    ("fc2 of the first quarter of layers fp32", lambda layer, kind, layers: kind == "fc2" and layer < _quarter(layers)),
    ("attention projections and fc2 of the first quarter fp32",
     lambda layer, kind, layers: kind in ("qkv", "projection") or (kind == "fc2" and layer < _quarter(layers))),
)


def _quarter(layers: int) -> int:
    return max(1, layers // 4)


def encoder_cosine(actual, expected) -> float:
    """The smallest cosine similarity between corresponding output vectors ([..., hidden])."""
    a, b = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    cosines = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
    return float(cosines.min())


def to_fp16(path: Path) -> None:
    """Weights and arithmetic in fp16; the graph's inputs and outputs stay fp32 (the other models' tensors)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(path))


def calibration_pixels(image_processor, count: int, seed: int) -> np.ndarray:
    """Pixel values of generated images (the demo's scenes and photographic noise), as the checkpoint's
    processor makes them: what quantisation ranges are calibrated and checked on."""
    from PIL import Image

    from blip_server.demo.scenes import render

    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    images = []
    for i in range(count):
        if i % 2:
            images.append(render(rng).image)
        else:
            base = noise.normal(128, 50, size=(64, 64, 3)).clip(0, 255).astype(np.uint8)
            images.append(Image.fromarray(base).resize((320, 240), Image.Resampling.BICUBIC))
    return image_processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)


def _linear_layers(path: Path) -> dict[str, tuple[int, str]]:
    """The encoder's linear MatMul nodes: name -> (layer, kind), kind one of qkv, projection, fc1, fc2."""
    import re

    import onnx

    found = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        match = re.search(r"layers\.(\d+)/(?:self_attn|mlp)/(qkv|projection|fc1|fc2)/", node.name)
        if node.op_type == "MatMul" and match:
            found[node.name] = (int(match.group(1)), match.group(2))
    return found


def quantize_int8(path: Path, method: str, calibration: np.ndarray, cosine) -> tuple[float, str]:
    """Quantise the fp32 encoder at `path` to int8 in place; `cosine(candidate path)` measures a candidate
    against fp32. Returns (its cosine, what stayed fp32)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if method not in INT8_METHODS:
        raise ValueError(f"int8 method {method!r}: choose from {', '.join(INT8_METHODS)}")
    with tempfile.TemporaryDirectory() as work:
        output = Path(work) / "model.onnx"
        if method == "static":
            class Reader(CalibrationDataReader):
                def __init__(self):
                    self._batches = iter([{"PIXEL_VALUES": calibration[i: i + 1]} for i in range(len(calibration))])

                def get_next(self):
                    return next(self._batches, None)

            quantize_static(str(path), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            result = cosine(output), "static QDQ, every quantisable node"
            output.replace(path)
            return result
        linear = _linear_layers(path)
        layers = 1 + max((layer for layer, _ in linear.values()), default=0)
        best = None
        for i, (plan, keep) in enumerate(DYNAMIC_PLANS):
            candidate = Path(work) / f"plan{i}.onnx"
            quantize_dynamic(str(path), str(candidate), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"],
                             nodes_to_exclude=[n for n, (layer, kind) in linear.items() if keep(layer, kind, layers)])
            measured = cosine(candidate)
            log.info("int8 plan %r: smallest cosine similarity to fp32 %.6f", plan, measured)
            if best is None or measured > best[0]:
                best = (measured, plan, candidate)
            if measured >= TARGET_COSINE:
                break
        best[2].replace(path)
        return best[0], best[1]
