"""blip-export: a complete repository, everything model-specific read from the checkpoint, clear failures."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from blip_text_decoder import BlipTextDecoder
from caption_generation import generate
from generation_options import GenerationOptions
from image_preprocessing import ImageProcessorConfig
from tritonclient.grpc import model_config_pb2 as mc

from blip_demo.random_checkpoint import build
from blip_server import export as export_module
from blip_server import quantize as quantize_module
from blip_server.errors import ExportError
from blip_server.export import ExportOptions, export_checkpoint, main
from blip_server.quantize import encoder_cosine
from blip_server.repository import MANIFEST, parse_config
from support import reference
from support.checkpoints import SHALLOW
from support.onnxruntime_backend import PRECISION_MODES, TENSORRT_PARAMETERS


@pytest.mark.parametrize("name", ["standard", "unusual"])
def test_the_repository_holds_what_the_checkpoint_says(checkpoints, repositories, name):
    model, processor = reference.load(str(checkpoints[name]))
    repository = repositories[name]
    text = model.config.text_config

    manifest = json.loads((repository / MANIFEST).read_text())
    assert manifest["special_token_ids"] == {
        "bos_token_id": text.bos_token_id, "eos_token_id": text.sep_token_id, "pad_token_id": text.pad_token_id
    }
    assert manifest["vocab_size"] == text.vocab_size
    assert manifest["precision"] == "fp32" and manifest["target"] == "embedded"

    images = ImageProcessorConfig.from_json(repository / "preprocess" / "1" / "image_processor.json")
    ip = processor.image_processor
    assert (images.height, images.width) == (ip.size.height, ip.size.width) == (
        (model.config.vision_config.image_size,) * 2)
    assert list(images.image_mean) == pytest.approx(ip.image_mean)
    assert list(images.image_std) == pytest.approx(ip.image_std)
    assert images.rescale_factor == ip.rescale_factor and images.resample == int(ip.resample)

    decoder = BlipTextDecoder.from_directory(repository / "text_decoder" / "1")
    assert decoder.config.vocab_size == text.vocab_size and decoder.config.bos_token_id == text.bos_token_id
    assert torch.equal(decoder.lm.weight, model.text_decoder.cls.predictions.decoder.weight)


def test_the_onnx_encoder_matches_pytorch_for_any_batch_size(checkpoints, repositories):
    model, processor = reference.load(str(checkpoints["standard"]))
    session = onnxruntime.InferenceSession(str(repositories["standard"] / "vision_encoder" / "1" / "model.onnx"))
    for batch in (1, 3):
        pixels = torch.randn(batch, 3, 384, 384)
        with torch.inference_mode():
            expected = model.vision_model(pixel_values=pixels).last_hidden_state.numpy()
        actual = session.run(None, {"PIXEL_VALUES": pixels.numpy()})[0]
        assert np.abs(actual - expected).max() <= 1e-4


def test_triton_container_target_serves_the_encoder_on_onnxruntime(checkpoints, tmp_path):
    export_checkpoint(checkpoints["unusual"], tmp_path / "repo", ExportOptions(target="triton-container"))
    encoder = tmp_path / "repo" / "vision_encoder"
    config = parse_config(encoder / "config.pbtxt")
    assert (config.backend, config.platform) == ("onnxruntime", "")
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert list(config.input[0].dims) == [3, 224, 224]
    assert list(config.output[0].dims) == [(224 // 16) ** 2 + 1, 48]
    assert config.HasField("dynamic_batching")
    assert sorted(p.name for p in (encoder / "1").iterdir()) == ["model.onnx"]
    assert parse_config(tmp_path / "repo" / "text_decoder" / "config.pbtxt").backend == "python"
    assert parse_config(tmp_path / "repo" / "preprocess" / "config.pbtxt").backend == "python"


def test_the_containers_gpu_encoder_uses_tensorrt_in_fp32_with_caches_a_profile_and_warm_up(checkpoints, tmp_path):
    export_checkpoint(checkpoints["unusual"], tmp_path / "repo", ExportOptions(target="triton-container"))
    config = parse_config(tmp_path / "repo" / "vision_encoder" / "configs" / "gpu.pbtxt")
    assert config.backend == "onnxruntime"
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 1)]
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    params = dict(accelerator.parameters)
    # Every key is one Triton 2.51's onnxruntime backend accepts (an unknown key fails the model's load), from the
    # backend's source, not from model_configs.py.
    assert set(params) <= TENSORRT_PARAMETERS, set(params) - TENSORRT_PARAMETERS
    assert params["precision_mode"] in PRECISION_MODES
    # An fp32 export is exact on the GPU too: TensorRT in FP32 (no FP16 layers; TF32 is off in the environment).
    assert accelerator.name == "tensorrt" and params["precision_mode"] == "FP32"
    assert params["trt_engine_cache_enable"] == "1" and params["trt_timing_cache_enable"] == "1"
    onnx_digest = hashlib.sha256((tmp_path / "repo" / "vision_encoder" / "1" / "model.onnx").read_bytes()).hexdigest()
    assert params["trt_engine_cache_path"] == f"/cache/tensorrt/{onnx_digest[:16]}"
    assert "trt_timing_cache_path" not in params  # not a key r24.10 is known to accept: the engines' folder holds it
    batch = config.max_batch_size
    assert params["trt_profile_min_shapes"] == "PIXEL_VALUES:1x3x224x224"
    assert params["trt_profile_max_shapes"] == f"PIXEL_VALUES:{batch}x3x224x224"
    assert sorted(w.batch_size for w in config.model_warmup) == [1, batch]
    for warmup in config.model_warmup:
        assert list(warmup.inputs["PIXEL_VALUES"].dims) == [3, 224, 224] and warmup.inputs["PIXEL_VALUES"].random_data
    decoder = parse_config(tmp_path / "repo" / "text_decoder" / "configs" / "gpu.pbtxt")
    assert decoder.backend == "python" and [g.kind for g in decoder.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert decoder.parameters["dtype"].string_value == "float32"
    assert decoder.parameters["precision"].string_value == "fp32"
    assert not (tmp_path / "repo" / "preprocess" / "configs").exists()  # stays on the CPU


def test_engines_of_different_weights_are_cached_apart(checkpoints, tmp_path):
    """ONNX Runtime names engines after the graph, not its weights: a fine-tune of the same architecture must not
    find the engines built for another one."""
    paths = []
    for name in ("standard", "standard_retrained"):
        checkpoint = checkpoints["standard"]
        if name == "standard_retrained":
            checkpoint = _broken(checkpoint, tmp_path, _perturb_vision_weights)
        export_checkpoint(checkpoint, tmp_path / name, ExportOptions(target="triton-container"))
        config = parse_config(tmp_path / name / "vision_encoder" / "configs" / "gpu.pbtxt")
        (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        paths.append(accelerator.parameters["trt_engine_cache_path"])
    assert paths[0] != paths[1] and all(p.startswith("/cache/tensorrt/") for p in paths)


def _perturb_vision_weights(path):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    name = next(k for k in sorted(weights) if "vision_model" in k and k.endswith("weight"))
    weights[name] = weights[name] + 0.01
    save_file(weights, str(path / "model.safetensors"))


def test_an_int8_container_export_has_no_gpu_encoder_and_a_gpu_decoder_that_refuses(checkpoints, tmp_path):
    export_checkpoint(checkpoints["standard"], tmp_path / "repo", ExportOptions(target="triton-container",
                                                                                 precision="int8"))
    assert not (tmp_path / "repo" / "vision_encoder" / "configs" / "gpu.pbtxt").exists()
    decoder = parse_config(tmp_path / "repo" / "text_decoder" / "configs" / "gpu.pbtxt")
    assert decoder.parameters["precision"].string_value == "int8"
    assert decoder.parameters["quantization"].string_value == "int8"


def test_every_export_has_gpu_configs_and_says_what_it_serves(checkpoints, repositories):
    repository = repositories["standard"]
    for model in ("vision_encoder", "text_decoder"):
        config = parse_config(repository / model / "configs" / "gpu.pbtxt")
        assert config.backend == "python" and [g.kind for g in config.instance_group] == [
            mc.ModelInstanceGroup.KIND_GPU]
        assert config.name == model
    # On the CPU the encoder runs a batch's images one by one (its activations outgrow the cache); a GPU, all at once.
    images_per_run = {name: parse_config(repository / "vision_encoder" / name).parameters["images_per_run"].string_value
                      for name in ("config.pbtxt", "configs/gpu.pbtxt")}
    assert images_per_run == {"config.pbtxt": "1", "configs/gpu.pbtxt": "0"}
    params = {k: v.string_value for k, v in parse_config(repository / "preprocess" / "config.pbtxt").parameters.items()}
    assert params["source_checkpoint"] == str(checkpoints["standard"].resolve())
    assert (params["precision"], params["image_height"], params["image_width"]) == ("fp32", "384", "384")
    assert params["default_num_beams"] == "3"  # the template's parameters are kept


def test_an_fp16_export_has_an_fp16_encoder_close_to_fp32_and_configures_fp16_on_the_gpu(tmp_path):
    checkpoint = build(SHALLOW["large"], tmp_path / "checkpoint")
    export_checkpoint(checkpoint, tmp_path / "repo", ExportOptions(precision="fp16", target="triton-container"))
    model, _ = reference.load(str(checkpoint))
    path = tmp_path / "repo" / "vision_encoder" / "1" / "model.onnx"
    graph = onnx.load(str(path))
    weights = [t for t in graph.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert path.stat().st_size < 0.6 * sum(p.numel() for p in model.vision_model.parameters()) * 4
    session = onnxruntime.InferenceSession(str(path))
    assert session.get_inputs()[0].type == session.get_outputs()[0].type == "tensor(float)"  # fp32 at the edges
    pixels = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = model.vision_model(pixel_values=pixels).last_hidden_state.numpy()
    actual = session.run(None, {"PIXEL_VALUES": pixels.numpy()})[0]
    assert encoder_cosine(actual, expected) >= 0.999
    assert json.loads((tmp_path / "repo" / MANIFEST).read_text())["precision"] == "fp16"
    decoder = parse_config(tmp_path / "repo" / "text_decoder" / "configs" / "gpu.pbtxt")
    assert decoder.parameters["dtype"].string_value == "float16"
    encoder = parse_config(tmp_path / "repo" / "vision_encoder" / "configs" / "gpu.pbtxt")
    (accelerator,) = encoder.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.parameters["precision_mode"] == "FP16"
    assert set(accelerator.parameters) <= TENSORRT_PARAMETERS, set(accelerator.parameters) - TENSORRT_PARAMETERS


def test_an_fp16_encoder_far_from_fp32_is_refused(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize_module, "encoder_cosine", lambda actual, expected: 0.98)
    with pytest.raises(ExportError, match=r"cosine similarity of 0.98000 .*\(at least 0.999 needed\)"):
        export_checkpoint(checkpoints["standard"], tmp_path / "out", ExportOptions(precision="fp16"))
    assert not (tmp_path / "out").exists()


def _broken(checkpoint, tmp_path, edit):
    copy = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, copy)
    edit(copy)
    return copy


def _edit_config(**changes):
    def edit(path):
        config = json.loads((path / "config.json").read_text())
        config.update(changes)
        (path / "config.json").write_text(json.dumps(config))
    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: (p / "config.json").unlink(), "has no config.json"),
        (_edit_config(model_type="bert"), "holds a 'bert' model, not a BLIP one"),
        (_edit_config(architectures=["BlipForQuestionAnswering"]), "not a BLIP captioning model"),
        (lambda p: (p / "processor_config.json").unlink(), "has no image processor config"),
        (lambda p: (p / "model.safetensors").unlink(), "has no weights"),
    ],
    ids=["no_config", "not_blip", "vqa", "no_processor", "no_weights"],
)
def test_what_is_not_a_captioning_checkpoint_is_refused(checkpoints, tmp_path, edit, message):
    checkpoint = _broken(checkpoints["standard"], tmp_path, edit)
    with pytest.raises(ExportError, match=message):
        export_checkpoint(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_interrupted_export_leaves_nothing_behind(checkpoints, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise ExportError("the ONNX vision encoder differs from PyTorch by 1.00e+00 (tolerance 0.0001)")

    monkeypatch.setattr(export_module, "_export_vision_encoder", fail)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_checkpoint(checkpoints["standard"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_reports_errors_without_a_traceback(checkpoints, tmp_path, capsys):
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "file").write_text("x")
    assert main(["--model", str(checkpoints["standard"]), "--output", str(tmp_path / "occupied")]) == 2
    err = capsys.readouterr().err
    assert "blip-export: error:" in err and "holds files and no blip_export.json" in err and "Traceback" not in err
    assert main(["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(checkpoints["standard"]), "--output", str(tmp_path / "x"), "--precision", "fp64"])


@pytest.mark.parametrize("name", sorted(SHALLOW))
def test_blip_base_and_large_dimensions_export_and_decode_like_transformers(name, tmp_path):
    checkpoint = build(SHALLOW[name], tmp_path / "checkpoint")
    export_checkpoint(checkpoint, tmp_path / "repo")
    model, _ = reference.load(str(checkpoint))
    vision = model.config.vision_config
    pixels = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(tmp_path / "repo" / "vision_encoder" / "1" / "model.onnx"))
    embeds = torch.from_numpy(session.run(None, {"PIXEL_VALUES": pixels.numpy()})[0])
    assert embeds.shape == (1, 577, vision.hidden_size)
    decoder = BlipTextDecoder.from_directory(tmp_path / "repo" / "text_decoder" / "1")
    for options in (dict(num_beams=1, min_new_tokens=0), dict(num_beams=3, num_return_sequences=2)):
        ours = generate(decoder, embeds, [[decoder.config.bos_token_id]], [GenerationOptions().with_values(**options)])
        with torch.inference_mode():
            expected = model.generate(pixel_values=pixels, **{**reference.SERVICE_DEFAULTS, **options})
        eos = decoder.config.eos_token_id
        trimmed = [row[: row.index(eos, 1) + 1] if eos in row[1:] else row for row in expected.tolist()]
        assert [h.tokens for h in ours[0]] == trimmed


def test_the_torchvision_image_processor_is_refused_for_a_resampling_it_does_not_reproduce(checkpoints, tmp_path):
    def bilinear(path):
        name = "processor_config.json"
        config = json.loads((path / name).read_text())
        (config.get("image_processor", config))["resample"] = 2
        (path / name).write_text(json.dumps(config))

    checkpoint = _broken(checkpoints["standard"], tmp_path, bilinear)
    with pytest.raises(ExportError, match="--image-processor torchvision supports bicubic resampling only"):
        export_checkpoint(checkpoint, tmp_path / "out", ExportOptions(image_processor="torchvision"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="image processor 'opencv' is not supported; choose from pil, torchvision"):
        export_checkpoint(checkpoints["standard"], tmp_path / "out", ExportOptions(image_processor="opencv"))


def test_exporting_the_same_checkpoint_again_keeps_the_repository(checkpoints, tmp_path, monkeypatch):
    output = tmp_path / "repo"
    first = export_checkpoint(checkpoints["standard"], output)
    marker = output / "vision_encoder" / "1" / "model.onnx"
    stamp = marker.stat().st_mtime_ns

    def no_second_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(export_module, "_export", no_second_export)
    assert export_checkpoint(checkpoints["standard"], output) == first
    assert marker.stat().st_mtime_ns == stamp
    # The same content from another path is the same export.
    copy = tmp_path / "copy"
    shutil.copytree(checkpoints["standard"], copy)
    assert export_checkpoint(copy, output) == first


def test_exporting_another_checkpoint_replaces_the_repository_in_one_step(checkpoints, tmp_path, monkeypatch):
    output = tmp_path / "repo"
    first = export_checkpoint(checkpoints["standard"], output)
    renames = []
    real = export_module.replace_directory

    def watched(new, target):
        renames.append((new.name, target.name, sorted(p.name for p in target.iterdir())))
        real(new, target)

    monkeypatch.setattr(export_module, "replace_directory", watched)
    second = export_checkpoint(checkpoints["unusual"], output)
    # The old repository stood complete until the new one, complete, took its place; nothing is left beside it.
    assert renames and renames[0][:2] == (".repo.partial", "repo") and MANIFEST in renames[0][2]
    assert json.loads((output / MANIFEST).read_text()) == second
    assert second["checkpoint_sha256"] != first["checkpoint_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert second["image_size"] == [224, 224]  # the unusual checkpoint's
    # Other options are another export too.
    third = export_checkpoint(checkpoints["unusual"], output, ExportOptions(precision="int8"))
    assert third["precision"] == "int8" and third["export_fingerprint"] != second["export_fingerprint"]


def test_a_directory_that_holds_something_else_is_never_replaced(checkpoints, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="holds files and no blip_export.json.*left alone"):
        export_checkpoint(checkpoints["standard"], occupied)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]
    assert (occupied / "notes.txt").read_text() == "mine"


def test_an_unwritable_output_is_a_clear_error_not_a_traceback(checkpoints, tmp_path, capsys, monkeypatch):
    """What a volume owned by another user gives (the container smoke test meets the real one)."""
    def denied(checkpoint, output, options):
        raise PermissionError(13, "Permission denied", str(Path(output).parent / ".repository.partial"))

    monkeypatch.setattr(export_module, "export_checkpoint", denied)
    assert main(["--model", str(checkpoints["standard"]), "--output", str(tmp_path / "repository")]) == 2
    err = capsys.readouterr().err
    assert "blip-export: error: cannot write" in err and "Permission denied" in err and f"uid {os.getuid()}" in err
    assert "Traceback" not in err


def test_every_exported_file_is_readable_by_every_user(repositories):
    """The export and Triton run as different users in the containers (10001 and 1000): safetensors writes its
    files 0600, which made Triton fail to load the decoder (found by the container smoke test)."""
    repository = repositories["standard"]
    for path in (repository, *repository.rglob("*")):
        mode = path.stat().st_mode
        assert mode & (0o555 if path.is_dir() else 0o444) == (0o555 if path.is_dir() else 0o444), (path, oct(mode))
