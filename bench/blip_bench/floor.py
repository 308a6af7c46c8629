"""This machine's floor for one caption: the least time its matrix products and its memory allow.

What is measured, in the calling process, with the threads the service's models get (`available_cores()`):

- the matrix-product rate (FLOP/s, 2*m*k*n per product) on the vision encoder's linear layers' shapes,
  [tokens, hidden] x [hidden, 3*hidden] (qkv), [tokens, hidden] x [hidden, hidden] (the attention's output
  projection), [tokens, hidden] x [hidden, intermediate] (fc1) and [tokens, intermediate] x [intermediate, hidden]
  (fc2), tokens = patches + 1, each the best of a few runs after a warm-up (the runs of a backend's products
  interleaved, so that a moment the machine is quiet is found by each; the output written in place), with
  - ONNX Runtime (a one-node graph, the weights an initializer as in the exported encoder, the session options of
    the service's encoder): fp32 `MatMul`; int8 both `MatMulInteger` u8 x s8 -> int32 on already quantised
    activations and `DynamicQuantizeLinear` + `MatMulInteger` on fp32 activations (`quantize_dynamic`'s graph
    for a MatMul, one scale for the tensor, which ORT fuses into one `DynamicQuantizeMatMul`; its rate counts the
    activations' quantisation too; the exported encoder quantises per row, see `blip_server.quantize`), both
    kept, the floor taking the faster;
  - torch: `torch.matmul` fp32; int8 `torch._int_mm` (int8 x int8 -> int32), skipped, and said so in `skipped`,
    where this torch has none for the CPU;
- the memory read bandwidth (bytes/s): a numpy sum over 1 GiB, the best of three.

Other work on the cores slows all of it, and raises the floor: `others_busy` is the share of the cores' time
that other processes used meanwhile (from /proc/stat, less this process's own CPU time).

The floor of a caption (`caption_floor`), for a precision:

- encoder: every matrix product of the vision encoder (`VisionArchitecture.matmuls`: the linear layers, the
  attention's scores and weighted sums, 2 * 2 * tokens^2 * hidden FLOPs a layer, and the patch embedding's
  convolution as a [patches, channels*patch^2] x [channels*patch^2, hidden] product) at the best rate measured
  for its shape in that precision, by any backend; a shape not measured (attention, patch embedding) at the best
  rate measured for any shape in that precision, which can only lower the floor. Layer norms, GELU and softmax
  are not counted. int8 counts every linear layer int8, even those the export keeps fp32.
- decoder: `tokens` decode steps, each reading the decoder's step weights once (`step_weight_bytes`: int8, one
  byte a weight) at the measured bandwidth. The steps' arithmetic, the attention's and the KV cache's reads, the
  cross-attention's keys and values of the image (computed once a caption) are not counted. The bandwidth is the
  memory's (1 GiB is beyond every cache): step weights that fit in the caches are read faster, so a small model's
  decoder can beat this part (the demo model's 2.8 MB does); BLIP-base's and -large's (490 MB fp32, 120 MB
  int8) are far beyond a CPU's caches.

It assumes one image alone: its encoder run and its steps have the machine to themselves, and a step reads its
weights once whatever its rows, so the floor is the same for any number of beams. Captions decoded together
share their steps' reads: at concurrency above one the service's seconds per caption may go below the
decoder's part of this floor; the latency of a caption may not (but for weights read from the caches, above).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PRECISIONS = ("fp32", "int8")
MEASURED = ("qkv", "attention output", "fc1", "fc2")  # the products whose shapes are measured


@dataclass(frozen=True)
class Matmul:
    """`count` products [rows, inner] x [inner, cols]."""

    name: str
    rows: int
    inner: int
    cols: int
    count: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.rows, self.inner, self.cols

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.inner * self.cols * self.count


@dataclass(frozen=True)
class VisionArchitecture:
    """The vision encoder's sizes (BlipVisionConfig's names in `from_config`)."""

    image_height: int
    image_width: int
    patch_size: int
    hidden: int
    intermediate: int
    layers: int
    channels: int = 3

    @classmethod
    def from_config(cls, vision_config: dict, image_size: tuple[int, int] | None = None) -> VisionArchitecture:
        """`image_size`: (height, width) the images are resized to, where it is not the config's square."""
        side = vision_config.get("image_size", 384)
        height, width = image_size or (side, side)
        return cls(height, width, vision_config.get("patch_size", 16), vision_config.get("hidden_size", 768),
                   vision_config.get("intermediate_size", 3072), vision_config.get("num_hidden_layers", 12),
                   vision_config.get("num_channels", 3))

    @classmethod
    def from_checkpoint(cls, checkpoint: Path) -> VisionArchitecture:
        return cls.from_config(json.loads((Path(checkpoint) / "config.json").read_text())["vision_config"])

    @classmethod
    def from_repository(cls, repository: Path) -> VisionArchitecture:
        """From the checkpoint an exported repository names (its `blip_export.json`), at the images' exported size."""
        manifest = json.loads((Path(repository) / "blip_export.json").read_text())
        config = json.loads((Path(manifest["source"]) / "config.json").read_text())["vision_config"]
        return cls.from_config(config, tuple(manifest["image_size"]))

    @property
    def patches(self) -> int:
        return (self.image_height // self.patch_size) * (self.image_width // self.patch_size)

    @property
    def tokens(self) -> int:
        return self.patches + 1  # and the class token

    def matmuls(self) -> tuple[Matmul, ...]:
        t, h, i, n = self.tokens, self.hidden, self.intermediate, self.layers
        return (Matmul("patch embedding", self.patches, self.channels * self.patch_size ** 2, h, 1),
                Matmul("qkv", t, h, 3 * h, n), Matmul("attention output", t, h, h, n),
                Matmul("fc1", t, h, i, n), Matmul("fc2", t, i, h, n),
                Matmul("attention scores", t, h, t, n), Matmul("attention sums", t, t, h, n))

    def flops(self) -> int:
        return sum(m.flops for m in self.matmuls())

    def measured_shapes(self) -> dict[str, tuple[int, int, int]]:
        return {m.name: m.shape for m in self.matmuls() if m.name in MEASURED}


@dataclass(frozen=True)
class Rate:
    """FLOP/s of one backend on one shape in one precision; `how`: the operator (or graph) that ran."""

    rows: int
    inner: int
    cols: int
    backend: str
    precision: str
    how: str
    flop_per_s: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.rows, self.inner, self.cols


@dataclass(frozen=True)
class Machine:
    """What `measure_machine` found."""

    threads: int
    bandwidth: float  # bytes read per second
    rates: tuple[Rate, ...]
    skipped: tuple[str, ...] = ()  # what could not be measured here, and why
    others_busy: float | None = None  # the share of the cores' time other processes used while it measured

    def rate(self, precision: str, shape: tuple[int, int, int] | None = None) -> float:
        """The best rate of `precision` on `shape`, by any backend; a shape not measured: the best on any shape."""
        rates = [r.flop_per_s for r in self.rates if r.precision == precision]
        on_shape = [r.flop_per_s for r in self.rates if r.precision == precision and r.shape == shape]
        if not rates:
            raise ValueError(f"no {precision} rate was measured")
        return max(on_shape or rates)


@dataclass(frozen=True)
class CaptionFloor:
    """The floor of one caption, seconds: the encoder's part and the decoder's (`tokens` new tokens, a step each)."""

    precision: str
    tokens: int
    encoder_flops: int
    encoder_s: float
    step_weight_bytes: int
    decoder_s: float

    @property
    def total_s(self) -> float:
        return self.encoder_s + self.decoder_s


def memory_bandwidth(gib: float = 1.0) -> float:
    """Bytes per second this machine reads: a numpy sum over `gib` GiB, the best of three."""
    data = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.nbytes / best


@dataclass(frozen=True)
class _Product:
    """A product ready to run (`run`, its output written in place: the product's time, not an allocation's)."""

    shape: tuple[int, int, int]
    backend: str
    precision: str
    how: str
    run: Callable[[], object]


def _onnxruntime(shape: tuple[int, int, int], threads: int) -> list[_Product]:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = shape
    rng = np.random.default_rng(0)
    options = ort.SessionOptions()  # as the service's encoder has them (model_repository/vision_encoder/1/model.py)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    def product(precision, how, nodes, a, weight, extra=(), out=np.float32):
        a_type, out_type = (helper.np_dtype_to_tensor_dtype(np.dtype(t)) for t in (a.dtype, out))
        graph = helper.make_graph(nodes, "matmul", [helper.make_tensor_value_info("A", a_type, [m, k])],
                                  [helper.make_tensor_value_info("Y", out_type, [m, n])],
                                  [numpy_helper.from_array(weight, "B"), *extra])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        onnx.checker.check_model(model)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        output = np.empty((m, n), dtype=out)
        binding = session.io_binding()
        binding.bind_cpu_input("A", a)
        binding.bind_output("Y", "cpu", 0, out, [m, n], output.ctypes.data)
        # the closure keeps `output`, whose memory the binding writes, alive
        return _Product(shape, "onnxruntime", precision, how, lambda: (session.run_with_iobinding(binding), output))

    x = rng.standard_normal((m, k), dtype=np.float32)
    w8 = rng.integers(-127, 128, (k, n), dtype=np.int8)
    zero = numpy_helper.from_array(np.array(128, dtype=np.uint8), "zero")
    scale = numpy_helper.from_array(np.array(0.01, dtype=np.float32), "scale")
    return [product("fp32", "MatMul", [helper.make_node("MatMul", ["A", "B"], ["Y"])], x,
                    rng.standard_normal((k, n), dtype=np.float32)),
            product("int8", "MatMulInteger", [helper.make_node("MatMulInteger", ["A", "B", "zero"], ["Y"])],
                    rng.integers(0, 256, (m, k), dtype=np.uint8), w8, [zero], np.int32),
            product("int8", "DynamicQuantizeLinear + MatMulInteger",
                    [helper.make_node("DynamicQuantizeLinear", ["A"], ["q", "q_scale", "q_zero"]),
                     helper.make_node("MatMulInteger", ["q", "B", "q_zero"], ["i32"]),
                     helper.make_node("Cast", ["i32"], ["f"], to=TensorProto.FLOAT),
                     helper.make_node("Mul", ["q_scale", "scale"], ["s"]),
                     helper.make_node("Mul", ["f", "s"], ["Y"])], x, w8, [scale])]


def _torch(shape: tuple[int, int, int]) -> tuple[list[_Product], str | None]:
    """-> (products, why int8 is skipped or None)."""
    import torch

    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator), torch.empty(m, n)
    products = [_Product(shape, "torch", "fp32", "torch.matmul", lambda: torch.matmul(a, b, out=c))]
    a8 = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=generator)
    b8 = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=generator)
    c32 = torch.empty(m, n, dtype=torch.int32)
    try:
        torch._int_mm(a8, b8, out=c32)
    except (AttributeError, TypeError, RuntimeError, NotImplementedError) as exc:
        return products, f"torch int8: torch._int_mm does not run on this CPU ({type(exc).__name__}: {exc})"
    return products + [_Product(shape, "torch", "int8", "torch._int_mm", lambda: torch._int_mm(a8, b8, out=c32))], None


def measure_machine(architecture: VisionArchitecture, threads: int | None = None, repeats: int = 5,
                    bandwidth_gib: float = 1.0) -> Machine:
    """The read bandwidth, then the rates on `architecture`'s measured shapes, each backend and precision. Each
    product runs once to warm up, then `repeats` rounds run every product of a backend once each and its best is
    kept: the rounds spread a product's runs over its backend's measurement, so that a moment the machine is quiet
    is found by all of them. ONNX Runtime's products run first: torch's OpenMP threads spin a while after each of
    its products, and slowed (by a fifth to a third, measured here) an ONNX Runtime product that ran next."""
    import torch

    from blip_server.shared.cpu_turns import available_cores

    threads = threads or available_cores()
    machine_before, own_before = _cpu_seconds(), sum(os.times()[:2])
    bandwidth = memory_bandwidth(bandwidth_gib)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    products: list[_Product] = []
    skipped: set[str] = set()
    try:
        for shape in dict.fromkeys(architecture.measured_shapes().values()):
            products += _onnxruntime(shape, threads)
            on_torch, why = _torch(shape)
            products += on_torch
            skipped |= {why} if why else set()
        best = [float("inf")] * len(products)
        for backend in ("onnxruntime", "torch"):
            group = [i for i, product in enumerate(products) if product.backend == backend]
            for i in group:
                products[i].run()
            for _ in range(repeats):
                for i in group:
                    started = time.perf_counter()
                    products[i].run()
                    best[i] = min(best[i], time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)
    machine_after, own_after = _cpu_seconds(), sum(os.times()[:2])
    others = None
    if machine_before and machine_after and machine_after[1] > machine_before[1]:
        busy = machine_after[0] - machine_before[0] - (own_after - own_before)
        others = min(1.0, max(0.0, busy / (machine_after[1] - machine_before[1])))
    rates = tuple(Rate(*p.shape, p.backend, p.precision, p.how, 2 * math.prod(p.shape) / seconds)
                  for p, seconds in zip(products, best, strict=True))
    return Machine(threads, bandwidth, rates, tuple(sorted(skipped)), others)


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy, all) CPU seconds of every core since boot (/proc/stat), or None where there is none to read."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    per_second = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / per_second, sum(ticks) / per_second  # less idle and iowait


def step_weight_bytes(repository: Path, int8: bool) -> int:
    """Bytes of weights a decode step reads: every linear layer but the cross-attention key/value projections."""
    config = json.loads((Path(repository) / "text_decoder" / "1" / "decoder_config.json").read_text())
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    per_layer = 3 * h * h + h * h + h * h + h * h + 2 * h * i  # qkv, self out, cross q, cross out, ffn in/out
    parameters = config["num_hidden_layers"] * per_layer + h * h + h * v
    return parameters * (1 if int8 else 4)


def encoder_floor_s(architecture: VisionArchitecture, machine: Machine, precision: str) -> float:
    """Every product's FLOPs at the best rate for its shape: their FLOP-weighted harmonic mean, in effect."""
    return sum(m.flops / machine.rate(precision, m.shape) for m in architecture.matmuls())


def caption_floor(repository: Path, precision: str, machine: Machine, tokens: int,
                  architecture: VisionArchitecture | None = None) -> CaptionFloor:
    """The floor of one caption of exactly `tokens` new tokens from an exported repository in `precision`
    (fp32 or int8); `architecture`: the vision encoder's, else read from the checkpoint the repository names."""
    if precision not in PRECISIONS:
        raise ValueError(f"the floor is measured for {', '.join(PRECISIONS)}, not {precision}")
    architecture = architecture or VisionArchitecture.from_repository(repository)
    weights = step_weight_bytes(repository, precision == "int8")
    return CaptionFloor(precision, tokens, architecture.flops(), encoder_floor_s(architecture, machine, precision),
                        weights, tokens * weights / machine.bandwidth)


def summary(machine: Machine, architecture: VisionArchitecture) -> dict:
    """What `results.json` keeps of the measurement: every rate, by shape name, and the bandwidth."""
    names = {shape: name for name, shape in reversed(architecture.measured_shapes().items())}
    return {"threads": machine.threads, "memory_bandwidth_gb_s": machine.bandwidth / 1e9,
            "others_busy": machine.others_busy, "skipped": list(machine.skipped),
            "rates": [{"shape": names.get(r.shape, ""), "rows": r.rows, "inner": r.inner, "cols": r.cols,
                       "backend": r.backend, "precision": r.precision, "how": r.how, "gflop_per_s": r.flop_per_s / 1e9}
                      for r in machine.rates]}
