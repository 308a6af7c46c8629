"""`--precision int8`: quantised encoder and decoder, quality measured against fp32 and the demo's truth."""

from __future__ import annotations

import json

import onnx

from blip_client import CaptionClient
from blip_demo.evaluate import measure, scenes
from blip_server.export import MIN_COSINE, ExportOptions, export_checkpoint
from blip_server.model_configs import parse_config
from blip_server.model_store import demo_checkpoint
from support.serve import ServeProcess

SEED = 777_101


def test_an_int8_export_quantises_what_it_says_and_records_its_quality(checkpoints, tmp_path):
    repository = tmp_path / "repository"
    manifest = export_checkpoint(checkpoints["standard"], repository, ExportOptions(precision="int8"))
    assert manifest["precision"] == "int8"
    assert MIN_COSINE["int8"] <= manifest["encoder_cosine_to_fp32"] <= 1.0
    nodes = onnx.load(str(repository / "vision_encoder" / "1" / "model.onnx")).graph.node
    quantised = {n.name for n in nodes if n.op_type == "MatMulIntegerToFloat"}
    plain = {n.name for n in nodes if n.op_type == "MatMul"}
    # whichever plan it kept (quantize.DYNAMIC_PLANS), every MLP input layer is int8, and fp32 MatMuls remain
    # (attention's activation products at least); activations are quantised per row, never per tensor
    assert not any(n.op_type == "DynamicQuantizeLinear" for n in nodes)
    assert quantised and all("mlp/fc1" not in name for name in plain)
    assert any("mlp/fc1" in name for name in quantised) and plain
    decoder = parse_config(repository / "text_decoder" / "config.pbtxt")
    assert decoder.parameters["quantization"].string_value == "int8"
    saved = json.loads((repository / "blip_export.json").read_text())
    assert saved["encoder_cosine_to_fp32"] == manifest["encoder_cosine_to_fp32"]


def test_the_int8_demo_model_still_captions_right_and_says_it_is_int8(tmp_path):
    serve = ServeProcess("--precision", "int8", cache=tmp_path / "cache")
    try:
        ready = serve.wait_ready()
        assert f"{demo_checkpoint()} (int8," in ready
        with CaptionClient(serve.address) as client:
            assert client.model_info().precision == "int8"
        report = measure(serve.address, scenes(40, SEED))
        for name in ("unconditional", "prompted"):
            assert report[name]["accuracy"] >= 0.9, report[name]["wrong"]
    finally:
        code, log = serve.stop()
    assert code == 0, log
