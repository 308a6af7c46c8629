"""`blip_bench.floor`: the encoder's FLOPs against a hand count, the floor of a caption from a repository's
files and the machine's rates, and the measurement itself on a tiny shape."""

from __future__ import annotations

import json
import math

import pytest

from blip_bench.floor import (
    Machine,
    Rate,
    VisionArchitecture,
    caption_floor,
    encoder_floor_s,
    measure_machine,
    step_weight_bytes,
)

SMALL = VisionArchitecture(image_height=64, image_width=64, patch_size=16, hidden=32, intermediate=64, layers=2)
DECODER = {"hidden_size": 8, "intermediate_size": 16, "vocab_size": 10, "num_hidden_layers": 2}


def _repository(tmp_path, vision: dict, image_size=(64, 64)):
    """The files of an exported repository that the floor reads, and the checkpoint's config it names."""
    checkpoint, repository = tmp_path / "checkpoint", tmp_path / "repository"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text(json.dumps({"vision_config": vision}))
    (repository / "text_decoder" / "1").mkdir(parents=True)
    (repository / "text_decoder" / "1" / "decoder_config.json").write_text(json.dumps(DECODER))
    (repository / "blip_export.json").write_text(json.dumps({"source": str(checkpoint),
                                                             "image_size": list(image_size)}))
    return repository


def _machine(fp32: float = 1e9, int8: float = 4e9, bandwidth: float = 1e9) -> Machine:
    """Made-up rates, the same on every shape of SMALL."""
    rates = tuple(Rate(*shape, backend, precision, "", rate)
                  for shape in SMALL.measured_shapes().values()
                  for backend, precision, rate in (("onnxruntime", "fp32", fp32), ("torch", "fp32", fp32 / 2),
                                                   ("onnxruntime", "int8", int8), ("torch", "int8", int8 / 2)))
    return Machine(threads=1, bandwidth=bandwidth, rates=rates)


def test_the_encoder_flops_are_counted_as_by_hand():
    # 64x64 images in 16x16 patches: 16 patches and the class token
    patches, tokens, hidden, intermediate, layers = 16, 17, 32, 64, 2
    assert (SMALL.patches, SMALL.tokens) == (patches, tokens)
    patch_embedding = 2 * patches * (3 * 16 * 16) * hidden
    linear = (2 * tokens * hidden * 3 * hidden + 2 * tokens * hidden * hidden
              + 2 * tokens * hidden * intermediate + 2 * tokens * intermediate * hidden)
    attention = 2 * 2 * tokens ** 2 * hidden
    assert SMALL.flops() == patch_embedding + layers * (linear + attention) == 1_417_472
    # BLIP-large: 577 tokens, the shapes of its linear layers
    large = VisionArchitecture.from_config({"image_size": 384, "patch_size": 16, "hidden_size": 1024,
                                            "intermediate_size": 4096, "num_hidden_layers": 24})
    assert large.tokens == 577
    assert large.measured_shapes() == {"qkv": (577, 1024, 3072), "attention output": (577, 1024, 1024),
                                       "fc1": (577, 1024, 4096), "fc2": (577, 4096, 1024)}


def test_the_encoder_floor_is_each_products_flops_at_the_best_rate_for_its_shape():
    machine = _machine(fp32=2e9)
    # every linear layer at 2e9 (onnxruntime's, the better); attention and the patch embedding, not measured, at
    # the best rate measured on any shape: 2e9 too
    assert encoder_floor_s(SMALL, machine, "fp32") == pytest.approx(1_417_472 / 2e9)
    # fc1 measured faster: it, and the products not measured, at 8e9; the other linear layers still at 2e9
    faster_fc1 = Machine(1, 1e9, machine.rates + (Rate(*SMALL.measured_shapes()["fc1"], "torch", "fp32", "", 8e9),))
    tokens, layers = 17, 2
    qkv, output, fc1, fc2 = (2 * tokens * 32 * 96 * layers, 2 * tokens * 32 * 32 * layers,
                             2 * tokens * 32 * 64 * layers, 2 * tokens * 64 * 32 * layers)
    patch_embedding, attention = 2 * 16 * 768 * 32, 2 * 2 * tokens ** 2 * 32 * layers
    assert qkv + output + fc1 + fc2 + patch_embedding + attention == 1_417_472
    assert encoder_floor_s(SMALL, faster_fc1, "fp32") == pytest.approx(
        (qkv + output + fc2) / 2e9 + (fc1 + patch_embedding + attention) / 8e9)
    with pytest.raises(ValueError):
        encoder_floor_s(SMALL, Machine(1, 1e9, ()), "int8")


def test_a_caption_floor_from_a_repository_and_int8_reads_one_byte_a_weight(tmp_path):
    repository = _repository(tmp_path, {"image_size": 64, "patch_size": 16, "hidden_size": 32,
                                        "intermediate_size": 64, "num_hidden_layers": 2})
    h, i, v, layers = 8, 16, 10, 2
    weights = layers * (3 * h * h + h * h + h * h + h * h + 2 * h * i) + h * h + h * v  # the step's linear layers
    assert step_weight_bytes(repository, int8=False) == 4 * weights
    assert step_weight_bytes(repository, int8=True) == weights
    machine = _machine(fp32=1e9, int8=4e9, bandwidth=1e6)
    fp32, int8 = (caption_floor(repository, p, machine, tokens=20) for p in ("fp32", "int8"))
    assert fp32.encoder_flops == int8.encoder_flops == 1_417_472
    assert fp32.encoder_s == pytest.approx(1_417_472 / 1e9) and int8.encoder_s == pytest.approx(1_417_472 / 4e9)
    assert fp32.decoder_s == pytest.approx(20 * 4 * weights / 1e6)
    assert int8.decoder_s == pytest.approx(20 * weights / 1e6)
    assert fp32.total_s == fp32.encoder_s + fp32.decoder_s
    with pytest.raises(ValueError, match="fp16"):
        caption_floor(repository, "fp16", machine, tokens=20)


def test_the_floor_grows_with_tokens_and_with_the_architecture(tmp_path):
    vision = {"image_size": 64, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    repository = _repository(tmp_path, vision)
    machine = _machine()
    floors = [caption_floor(repository, "fp32", machine, tokens) for tokens in (1, 5, 20)]
    assert floors[0].total_s < floors[1].total_s < floors[2].total_s
    assert floors[0].encoder_s == floors[2].encoder_s  # tokens are the decoder's
    base = floors[0].encoder_s
    for larger in (dict(num_hidden_layers=4), dict(hidden_size=64), dict(intermediate_size=128), dict(patch_size=8)):
        architecture = VisionArchitecture.from_config({**vision, **larger})
        assert caption_floor(repository, "fp32", machine, 1, architecture).encoder_s > base, larger
    # the repository's exported image size, not the config's, sets the tokens
    wider = _repository(tmp_path / "wider", vision, image_size=(64, 128))
    assert VisionArchitecture.from_repository(wider).tokens == 4 * 8 + 1
    assert caption_floor(wider, "fp32", machine, 1).encoder_s > base


def test_the_measured_rates_are_positive_and_finite_on_a_tiny_shape():
    tiny = VisionArchitecture(image_height=32, image_width=32, patch_size=8, hidden=16, intermediate=32, layers=1)
    machine = measure_machine(tiny, threads=1, repeats=2, bandwidth_gib=0.01)
    assert machine.threads == 1 and 0 < machine.bandwidth < math.inf
    assert all(0 < rate.flop_per_s < math.inf for rate in machine.rates)
    measured = {(r.shape, r.backend, r.precision, r.how) for r in machine.rates}
    for shape in tiny.measured_shapes().values():
        assert {(shape, "onnxruntime", "fp32", "MatMul"), (shape, "onnxruntime", "int8", "MatMulInteger"),
                (shape, "onnxruntime", "int8", "DynamicQuantizeLinear + MatMulInteger"),
                (shape, "torch", "fp32", "torch.matmul")} <= measured
        # torch's int8 is measured, or said to be skipped
        assert (shape, "torch", "int8", "torch._int_mm") in measured or any("_int_mm" in s for s in machine.skipped)
    assert machine.rate("int8") >= machine.rate("int8", tiny.measured_shapes()["fc1"]) > 0
