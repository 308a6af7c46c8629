"""Lower-precision vision encoders: fp16 for GPUs, int8 for CPUs, each checked against the fp32 encoder.

- fp16: weights and arithmetic in fp16 (`onnxruntime.transformers.float16`), inputs and outputs fp32;
- int8 `dynamic`: weights quantised per channel ahead of time, activations at run time
  (`onnxruntime.quantization.quantize_dynamic`);
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


def quantize_int8(path: Path, method: str, calibration: np.ndarray) -> None:
    """Quantise the fp32 encoder at `path` to int8 in place."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if method not in INT8_METHODS:
        raise ValueError(f"int8 method {method!r}: choose from {', '.join(INT8_METHODS)}")
    with tempfile.TemporaryDirectory() as work:
        output = Path(work) / "model.onnx"
        if method == "dynamic":
            quantize_dynamic(str(path), str(output), weight_type=QuantType.QInt8, per_channel=True)
        else:
            class Reader(CalibrationDataReader):
                def __init__(self):
                    self._batches = iter([{"PIXEL_VALUES": calibration[i: i + 1]} for i in range(len(calibration))])

                def get_next(self):
                    return next(self._batches, None)

            quantize_static(str(path), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        output.replace(path)
