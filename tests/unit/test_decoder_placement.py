"""Where the text decoder runs and in what arithmetic (`placement`, `exact_float32` in blip_text_decoder.py): what
text_decoder/1/model.py decides from Triton's instance and the config's parameters, testable without a Triton stub
or a GPU."""

from __future__ import annotations

import blip_text_decoder
import pytest
import torch
from blip_text_decoder import Placement, exact_float32, placement


def test_a_cpu_instance_decodes_in_float32_or_int8():
    assert placement("CPU", "0") == Placement("cpu", torch.float32, False)
    assert placement("CPU", "0", dtype="float32", quantization="int8") == Placement("cpu", torch.float32, True)
    assert placement(None) == Placement("cpu", torch.float32, False)  # a model loaded without an instance kind


def test_a_gpu_instance_runs_on_its_own_device_in_the_configured_dtype():
    assert placement("GPU", "1", dtype="float16", cuda_available=True) == Placement("cuda:1", torch.float16, False)
    assert placement("GPU", "0", dtype="float32", precision="fp32", cuda_available=True) == Placement(
        "cuda:0", torch.float32, False)


@pytest.mark.parametrize("parameters", [dict(quantization="int8"), dict(precision="int8"),
                                        dict(quantization="int8", precision="int8", dtype="float32")])
def test_a_gpu_instance_of_an_int8_repository_refuses_to_load(parameters):
    # Dropping int8 silently on a GPU would serve another precision than the repository says it serves.
    with pytest.raises(ValueError, match=r"int8 decoding runs on the CPU only; export the checkpoint with "
                                         r"--precision fp16 or fp32 to serve it on GPUs"):
        placement("GPU", "0", cuda_available=True, **parameters)


def test_float16_on_the_cpu_and_unknown_dtypes_are_refused():
    with pytest.raises(ValueError, match="float16 runs on GPUs only"):
        placement("CPU", "0", dtype="float16")
    with pytest.raises(ValueError, match="dtype 'bfloat16' is not one of float32, float16"):
        placement("GPU", "0", dtype="bfloat16", cuda_available=True)


def test_a_gpu_instance_without_cuda_says_so():
    with pytest.raises(ValueError, match="needs a CUDA build of torch and a visible GPU"):
        placement("GPU", "0", cuda_available=False)


_NODES = ("cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn")


def _node(path: str):
    node = torch.backends
    for part in path.split("."):
        node = getattr(node, part)
    return node


@pytest.fixture
def tf32_flags():
    """Restores torch's TF32 settings (process-wide) after the test, through the API that holds them."""
    if blip_text_decoder._has_fp32_precision_api():
        saved = {path: _node(path).fp32_precision for path in _NODES}
        yield
        for path in _NODES:  # parents first: setting a parent resets its children
            _node(path).fp32_precision = saved[path]
    else:
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                 torch.get_float32_matmul_precision())
        yield
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def _settings() -> dict:
    if blip_text_decoder._has_fp32_precision_api():
        return {path: _node(path).fp32_precision for path in _NODES}
    return {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}


@pytest.mark.skipif(not blip_text_decoder._has_fp32_precision_api(), reason="torch before 2.9: the old flags only")
def test_float32_on_a_gpu_switches_tf32_off_for_matmuls_and_cudnn(tf32_flags):
    # torch's flags are process-wide and settable without a GPU: what a CUDA float32 instance sets is checked here.
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # as a library loaded into the process might leave it
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    assert exact_float32("cuda:0", torch.float32)
    assert _settings() == {"cuda.matmul": "ieee", "cudnn": "ieee", "cudnn.conv": "ieee", "cudnn.rnn": "ieee"}


def test_float32_on_a_gpu_with_torch_2_7s_flags(tf32_flags, monkeypatch):
    # NVIDIA's container runs torch 2.7, which has only the allow_tf32 flags (still honoured by this torch).
    monkeypatch.setattr(blip_text_decoder, "_has_fp32_precision_api", lambda: False)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    assert exact_float32(torch.device("cuda", 1), torch.float32)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32), ("cuda:0", torch.float16)])
def test_the_cpu_and_float16_leave_the_flags_alone(tf32_flags, device, dtype):
    before = _settings()
    assert not exact_float32(device, dtype)
    assert _settings() == before


def _load_triton_model(monkeypatch):
    """text_decoder/1/model.py with the few names of Triton's Python API it touches before loading weights."""
    import importlib.util
    import sys
    import types
    from pathlib import Path

    stub = types.ModuleType("triton_python_backend_utils")
    stub.Logger = types.SimpleNamespace(log_info=lambda message: None, log_warn=lambda message: None,
                                        log_error=lambda message: None)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stub)
    path = Path(__file__).parents[2] / "model_repository" / "text_decoder" / "1" / "model.py"
    spec = importlib.util.spec_from_file_location("text_decoder_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind, parameters, message", [
    ("GPU", {"quantization": "int8"}, "int8 decoding runs on the CPU only"),
    ("CPU", {"dtype": "float16"}, "float16 runs on GPUs only"),
])
def test_the_triton_model_refuses_to_load_what_cannot_run(monkeypatch, tmp_path, kind, parameters, message):
    import json

    model = _load_triton_model(monkeypatch).TritonPythonModel()
    args = {"model_config": json.dumps({"parameters": {k: {"string_value": v} for k, v in parameters.items()}}),
            "model_repository": str(tmp_path), "model_version": "1", "model_instance_kind": kind,
            "model_instance_device_id": "0"}
    with pytest.raises(RuntimeError, match=f"text_decoder: .*{message}"):
        model.initialize(args)


def test_a_decoder_steps_on_every_core_only_when_a_step_reads_enough_weights(monkeypatch):
    """BLIP-base and -large read 0.2-0.5 GB a step: every core; the demo model's 2.8 MB: one thread (more only
    add their start-up). The config's `threads`, when set, wins."""
    step_threads = _load_triton_model(monkeypatch).step_threads
    assert step_threads(0, 490 << 20, cores=4) == 4
    assert step_threads(0, 3 << 20, cores=4) == 1
    assert step_threads(2, 3 << 20, cores=4) == 2
    assert step_threads(1, 490 << 20, cores=4) == 1
