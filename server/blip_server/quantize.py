"""Lower-precision vision encoders: fp16 for GPUs, int8 for CPUs, each checked against the fp32 encoder.

- fp16: weights and arithmetic in fp16 (`onnxruntime.transformers.float16`), inputs and outputs fp32;
- int8 `dynamic`: linear layers' weights quantised per channel ahead of time (`onnxruntime.quantization.
  quantize_dynamic`), activations at run time with one scale per row (per image token; `per_row_activations`):
  ONNX's DynamicQuantizeLinear takes one scale for the whole tensor, every image of a batched run included, so
  an image's embeddings (and its captions) depended on the images that shared its run. Which layers stay fp32
  is measured, not guessed: the plans
  in `DYNAMIC_PLANS` keep more and more of them fp32, and the first whose outputs reach `TARGET_COSINE` to
  fp32 is kept (else the closest). On the BLIP-large architecture, quantising everything gives 0.99887 and
  keeping the MLP output layers (`fc2`) of the first quarter of the layers fp32 gives 0.99903, at the same
  speed; the small demo model needs its attention projections fp32 (0.948 -> 0.998);
- int8 `static`: weights and activations quantised with ranges calibrated on generated images
  (`calibration_images`), QDQ format (`quantize_static`).

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


def calibration_images(count: int, seed: int) -> list:
    """`count` generated RGB images (Pillow), the same for the same seed, three kinds in turn:

    - photographic-like noise: 64x64 Gaussian noise (mean 128, deviation 50 a channel) resized bicubically to
      320x240, soft blotches of colour at every scale a resize leaves;
    - flat shapes on a plain light background: one to three ellipses, rectangles and triangles in saturated
      colours of any hue, 1/8 to 2/5 of a square canvas of 160 to 640 pixels a side;
    - the same kind of shapes on a linear gradient between two random colours, in any direction, with a fine
      grain (Gaussian, deviation 8) over the whole image.

    Drawn here with Pillow and numpy alone: no data set, and nothing of the demo model's (its scenes, flat shapes
    on white, are one case of the second kind)."""
    import colorsys

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    images = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            base = noise.normal(128, 50, size=(64, 64, 3)).clip(0, 255).astype(np.uint8)
            images.append(Image.fromarray(base).resize((320, 240), Image.Resampling.BICUBIC))
            continue
        side = rng.randint(160, 640)
        if kind == 1:
            image = Image.new("RGB", (side, side), tuple(rng.randint(225, 255) for _ in range(3)))
        else:
            angle = rng.uniform(0, 2 * np.pi)
            y, x = np.mgrid[0:side, 0:side] / (side - 1)
            along = x * np.cos(angle) + y * np.sin(angle)
            along = (along - along.min()) / (along.max() - along.min())
            start, end = (np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float64) for _ in range(2))
            image = Image.fromarray((start + along[..., None] * (end - start)).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 3)):
            extent = rng.randint(side // 8, side * 2 // 5)
            left, top = rng.randint(0, side - extent), rng.randint(0, side - extent)
            box = (left, top, left + extent - 1, top + extent - 1)
            hue, saturation, value = rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)
            fill = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value))
            shape = rng.choice(("ellipse", "rectangle", "triangle"))
            if shape == "ellipse":
                draw.ellipse(box, fill=fill)
            elif shape == "rectangle":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
        if kind == 2:
            grainy = np.asarray(image, dtype=np.float64) + noise.normal(0, 8, size=(side, side, 3))
            image = Image.fromarray(grainy.clip(0, 255).astype(np.uint8))
        images.append(image)
    return images


def calibration_pixels(image_processor, count: int, seed: int) -> np.ndarray:
    """Pixel values of `calibration_images(count, seed)` as the checkpoint's processor makes them: what int8
    ranges are calibrated on, and lower precision encoders checked on."""
    return image_processor(images=calibration_images(count, seed), return_tensors="np")["pixel_values"].astype(
        np.float32)


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


def per_row_activations(model) -> int:
    """Rewrite every DynamicQuantizeLinear of a `quantize_dynamic` graph (one scale and zero point for the whole
    tensor) to quantise each row over its last axis with a scale of its own: symmetric, max |x| -> 127, stored
    as uint8 with the zero point 128 that the products take as a scalar. The integer product is exact, so a
    row's output depends on that row alone. Returns how many were rewritten.

    Each row is quantised by one QuantizeLinear over the rows flattened ([rows, K], a scale per row on axis 0):
    Div, Round, Add and Cast instead cost 0.3 s of a BLIP-large image's 1.3 s. Each product becomes ONNX
    Runtime's MatMulIntegerToFloat with a unit activation scale, followed by a Mul by the rows' scales: ONNX
    Runtime fuses MatMulInteger + Cast + Mul(activation scale x weight scale) into that op itself only while the
    activation scale is computed, and its activation scale is one number (given the rows' scales, the fused op
    applied the first row's to every row: the demo encoder's cosine to fp32 fell to 0.52).
    (Exactness assumes a CPU whose u8 x s8 kernels accumulate in 32 bits, as AVX-512 VNNI's and AVX-VNNI's do;
    ONNX Runtime's AVX2-only kernels saturate 16-bit pair sums.)
    """
    from onnx import helper, numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    # ReduceMax takes its axes as an input from opset 18, as an attribute before
    reduce = ({"inputs": ["per_row_axes"], "attributes": {}} if opset >= 18
              else {"inputs": [], "attributes": {"axes": [-1]}})
    constants = [numpy_helper.from_array(np.array([-1], dtype=np.int64), "per_row_axes")] if opset >= 18 else []
    constants += [
        numpy_helper.from_array(np.array(127.0, dtype=np.float32), "per_row_levels"),
        numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "per_row_smallest"),
        numpy_helper.from_array(np.array([128], dtype=np.uint8), "per_row_zero_points"),
        numpy_helper.from_array(np.array(128, dtype=np.uint8), "per_row_zero_point"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "per_row_unit_scale"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "per_row_flat"),
    ]
    producers = {name: node for node in model.graph.node for name in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only(name: str, op_type: str):
        found = [n for n in consumers.get(name, []) if n.op_type == op_type]
        if len(found) != 1:
            raise ValueError(f"per_row_activations: expected one {op_type} reading {name!r}, found {len(found)}")
        return found[0]

    replaced: dict[str, list] = {}  # a node's name -> the nodes in its place ([] to drop it)
    for node in model.graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            continue
        x, (quantised, scale, zero_point) = node.input[0], node.output
        p = node.name + "_per_row"
        replaced[node.name] = [
            helper.make_node("Abs", [x], [p + "_abs"], name=p + "_abs"),
            helper.make_node("ReduceMax", [p + "_abs", *reduce["inputs"]], [p + "_max"], name=p + "_max", keepdims=1,
                             **reduce["attributes"]),
            helper.make_node("Max", [p + "_max", "per_row_smallest"], [p + "_range"], name=p + "_range"),
            helper.make_node("Div", [p + "_range", "per_row_levels"], [p + "_scale"], name=p + "_scale"),
            helper.make_node("Reshape", [p + "_scale", "per_row_flat"], [p + "_scales"], name=p + "_scales"),
            helper.make_node("Shape", [p + "_scales"], [p + "_rows"], name=p + "_rows"),
            helper.make_node("Expand", ["per_row_zero_points", p + "_rows"], [p + "_zero_points"],
                             name=p + "_zero_points"),
            helper.make_node("Flatten", [x], [p + "_flat"], name=p + "_flat", axis=-1),
            helper.make_node("QuantizeLinear", [p + "_flat", p + "_scales", p + "_zero_points"], [p + "_quantised"],
                             name=p + "_quantise", axis=0),
            helper.make_node("Shape", [x], [p + "_shape"], name=p + "_shape"),
            helper.make_node("Reshape", [p + "_quantised", p + "_shape"], [quantised], name=p + "_unflat"),
        ]
        for product in consumers.get(quantised, []):
            if product.op_type != "MatMulInteger" or product.input[2] != zero_point:
                raise ValueError(f"per_row_activations: {product.name!r} ({product.op_type}) reads {quantised!r}")
            cast = only(product.output[0], "Cast")
            output = only(cast.output[0], "Mul")
            scales = producers[next(i for i in output.input if i != cast.output[0])]
            if scales.op_type != "Mul" or scales.input[0] != scale:
                raise ValueError(f"per_row_activations: unexpected scales of {product.name!r}: {scales.name!r}")
            weight_zero_point = product.input[3] if len(product.input) > 3 else ""
            replaced[product.name] = [
                helper.make_node("MatMulIntegerToFloat",
                                 [quantised, product.input[1], "per_row_unit_scale", scales.input[1],
                                  "per_row_zero_point", weight_zero_point],
                                 [output.output[0] + "_before_row_scales"], name=product.name + "_to_float",
                                 domain="com.microsoft"),
                helper.make_node("Mul", [output.output[0] + "_before_row_scales", p + "_scale"], [output.output[0]],
                                 name=product.name + "_row_scales"),
            ]
            replaced[cast.name] = replaced[output.name] = replaced[scales.name] = []
    if not replaced:
        return 0
    nodes = []
    for node in model.graph.node:
        nodes += replaced.get(node.name, [node])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(constants)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return sum(1 for node in model.graph.node if node.name.endswith("_per_row_unflat"))


def quantize_int8(path: Path, method: str, calibration: np.ndarray, cosine) -> tuple[float, str]:
    """Quantise the fp32 encoder at `path` to int8 in place; `cosine(candidate path)` measures a candidate
    against fp32. Returns (its cosine, what stayed fp32)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

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
            quantised = onnx.load(str(candidate))
            per_row_activations(quantised)
            onnx.save(quantised, str(candidate))
            measured = cosine(candidate)
            log.info("int8 plan %r: smallest cosine similarity to fp32 %.6f", plan, measured)
            if best is None or measured > best[0]:
                best = (measured, plan, candidate)
            if measured >= TARGET_COSINE:
                break
        best[2].replace(path)
        return best[0], best[1]
