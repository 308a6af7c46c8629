"""bench/gpu_check.py, the prepared script for a lent GPU machine, run here on the CPU with a tiny model: the same
code path (the encoder exported by blip-export's code and run by ONNX Runtime, our decoder, transformers beside
it) in fp32 and fp16 (torch's Half on the CPU), and what must hold when a GPU's minutes are short: a failing
phase loses no other, rows reach the disk as each phase ends, a spent time budget skips what is left and says so.
Its GPU-only parts are not run here: what it would ask of TensorRT (the provider options) and how it judges the
sessions a GPU machine's ONNX Runtime gives (a faked onnxruntime) are checked; that it runs on a GPU is not."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
TINY = ["--device", "cpu", "--preset", "tiny", "--tokens", "4"]


def _run(tmp_path, *args, expect: int) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, str(SCRIPT), *TINY, *args, "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == expect, run.stdout + run.stderr
    return run


def _lines(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]


def test_both_precisions_are_measured_on_the_cpu_and_fp32_token_ids_equal_transformers(tmp_path):
    _run(tmp_path, "--batches", "1,2", "--precisions", "fp16,fp32", "--repeats", "1", expect=0)
    rows = _lines(tmp_path)
    assert [(r["precision"], r["batch"], r["status"]) for r in rows] == [
        ("fp16", 1, "ok"), ("fp16", 2, "ok"), ("fp32", 1, "ok"), ("fp32", 2, "ok")]
    for row in rows:
        assert row["encoder"] == "onnxruntime CPUExecutionProvider"
        assert row["captions"] == 2 * row["batch"]  # the untimed warm-up batch and one timed batch
        for side in ("ours", "transformers"):
            assert row[side]["samples"] == 1 and row[side]["captions_per_second"] > 0
            assert row[side]["p99_batch_ms"] is None  # one sample is no p99: p50 and the maximum only
        assert row["encoder_cosine"] > 0.999
        if row["precision"] == "fp32":  # parity: the whole path, and our decoder on transformers' embeddings
            assert row["captions_differing"] == row["decoder_captions_differing"] == 0
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.count("| fp16 |") == markdown.count("| fp32 |") == 2


def test_a_failing_phase_is_recorded_with_its_traceback_and_loses_no_other(tmp_path):
    run = _run(tmp_path, "--batches", "1,2", "--precisions", "fp16,fp32", "--repeats", "1", "--fail-phase", "fp16:1",
               expect=1)
    rows = _lines(tmp_path)
    assert [(r["precision"], r["batch"], r["status"]) for r in rows] == [
        ("fp16", 1, "failed"), ("fp16", 2, "ok"), ("fp32", 1, "ok"), ("fp32", 2, "ok")]
    assert "injected failure" in rows[0]["error"] and "Traceback" in rows[0]["traceback"]
    assert "injected failure" in run.stderr  # printed as it happened
    assert "| fp16 | 1 | failed |" in (tmp_path / "results.md").read_text()


def test_each_phase_is_on_disk_as_soon_as_it_ends(tmp_path):
    """A run cut short (the lent machine's time limit) keeps every phase it finished: killed right after its
    first row is printed, the rows printed are already in results.jsonl and results.md."""
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *TINY, "--precisions", "fp32", "--batches", "1,2,3", "--repeats", "3", "--out",
         str(tmp_path), "--workdir", str(tmp_path / "work")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    try:
        for line in process.stdout:
            if line.startswith("| fp32 | 1 |"):
                process.send_signal(signal.SIGKILL)
                break
        assert process.wait(timeout=60) == -signal.SIGKILL  # killed mid-run, not finished
    finally:
        process.kill()
        process.stdout.close()
    rows = _lines(tmp_path)
    assert 1 <= len(rows) < 3 and (rows[0]["batch"], rows[0]["status"]) == (1, "ok")
    assert "| fp32 | 1 | ok |" in (tmp_path / "results.md").read_text()


def test_a_spent_time_budget_skips_the_phases_left_and_records_them(tmp_path):
    run = _run(tmp_path, "--batches", "1,2", "--precisions", "fp32,fp16", "--budget-seconds", "0", expect=1)
    rows = _lines(tmp_path)
    assert [(r["precision"], r["batch"], r["status"]) for r in rows] == [
        ("fp32", 1, "skipped"), ("fp32", 2, "skipped"), ("fp16", 1, "skipped"), ("fp16", 2, "skipped")]
    assert all(r["error"] == "time budget spent before it started" for r in rows)
    assert "nothing was measured" in run.stderr


# -- its parts, in process ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_check():
    import os

    override = os.environ.get("NVIDIA_TF32_OVERRIDE")
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # sets NVIDIA_TF32_OVERRIDE=0, meant for its own process: undone below
    yield module
    if override is None:
        os.environ.pop("NVIDIA_TF32_OVERRIDE", None)
    else:
        os.environ["NVIDIA_TF32_OVERRIDE"] = override


def test_tensorrt_options_ask_for_one_profile_over_every_batch_size_and_caches_per_precision(gpu_check, tmp_path):
    """The options only: no TensorRT runs here."""
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    for precision, fp16 in (("fp32", "0"), ("fp16", "1")):
        providers = gpu_check.gpu_providers(["tensorrt", "cuda"], available, precision, 1, tmp_path, [1, 8, 32], 384)
        (trt, trt_options), (cuda, cuda_options) = providers
        assert (trt, cuda) == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        assert trt_options["trt_profile_min_shapes"] == "PIXEL_VALUES:1x3x384x384"
        assert trt_options["trt_profile_max_shapes"] == trt_options["trt_profile_opt_shapes"] == (
            "PIXEL_VALUES:32x3x384x384")
        assert trt_options["trt_fp16_enable"] == fp16  # FP16 kernels for fp16 only
        assert trt_options["trt_engine_cache_enable"] == trt_options["trt_timing_cache_enable"] == "1"
        assert Path(trt_options["trt_engine_cache_path"]) == tmp_path / "tensorrt" / precision
        assert Path(trt_options["trt_engine_cache_path"]).is_dir()
        assert trt_options["device_id"] == cuda_options["device_id"] == "1"
        assert cuda_options["use_tf32"] == "0"
    assert gpu_check.gpu_providers(["tensorrt", "cuda"], ["CPUExecutionProvider"], "fp32", 0, tmp_path, [1], 64) == []


class _Session:
    def __init__(self, held):
        self.held, self.fallback = held, True

    def get_providers(self):
        return self.held

    def disable_fallback(self):
        self.fallback = False


def _fake_onnxruntime(available: list[str], held: list[str]) -> types.ModuleType:
    """ONNX Runtime as a GPU machine's may be: the providers it has, those a session gets (TensorRT failing to
    build its engine at the warm-up when "TensorRT fails" is among them)."""
    module = types.ModuleType("onnxruntime")
    module.__version__ = "0.test"
    module.get_available_providers = lambda: [p for p in available if p != "TensorRT fails"]
    module.sessions = []

    def session(path, providers):
        names = [p[0] for p in providers]
        module.sessions.append(_Session([p for p in held if p in names + ["CPUExecutionProvider"]]))
        module.sessions[-1].breaks = "TensorRT fails" in available and names[0] == "TensorrtExecutionProvider"
        return module.sessions[-1]

    module.InferenceSession = session
    return module


def _model():
    config = types.SimpleNamespace(image_size=64, patch_size=16, hidden_size=32)
    return types.SimpleNamespace(config=types.SimpleNamespace(vision_config=config), vision_model=None)


@pytest.mark.parametrize("available, held, expected", [
    (["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"],
     "onnxruntime CUDAExecutionProvider on cuda:0"),
    # TensorRT's libraries missing: ONNX Runtime falls back to the next provider, and the row says which it got.
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
     ["CUDAExecutionProvider", "CPUExecutionProvider"], "onnxruntime CUDAExecutionProvider on cuda:0"),
    # The CUDA provider could not be created (no cuDNN, say): a CPU-only session is never timed as the GPU's.
    (["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"], "torch vision model on cuda:0"),
    # onnxruntime without GPU providers: PyTorch's vision model on the GPU, said so.
    (["CPUExecutionProvider"], ["CPUExecutionProvider"], "torch vision model on cuda:0"),
    # TensorRT's engine fails to build at the warm-up: the CUDA provider alone, said so.
    (["TensorrtExecutionProvider", "TensorRT fails", "CUDAExecutionProvider", "CPUExecutionProvider"],
     ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
     "onnxruntime CUDAExecutionProvider on cuda:0"),
])
def test_a_gpu_encoder_session_must_hold_a_gpu_provider(gpu_check, monkeypatch, tmp_path, available, held, expected):
    fake = _fake_onnxruntime(available, held)
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)

    def warm_up(encoder):
        if encoder.session.breaks:
            raise RuntimeError("TensorRT could not build the engine")

    monkeypatch.setattr(gpu_check.Encoder, "_warm_up", warm_up)
    encoder = gpu_check.Encoder(_model(), tmp_path / "encoder.onnx", "fp32", torch.device("cuda", 0), tmp_path, [1, 2],
                                ["tensorrt", "cuda"])
    assert encoder.kind == expected
    if expected.startswith("onnxruntime"):
        assert not fake.sessions[-1].fallback  # run-time fallback to the CPU off
        assert (encoder.note is None) == ("TensorRT fails" not in available)
        if encoder.note:
            assert "TensorrtExecutionProvider failed (RuntimeError: TensorRT could not build" in encoder.note
    else:
        assert encoder.session is None and encoder.note  # the reason goes into the row


def test_latency_reports_p99_only_from_enough_samples(gpu_check):
    few = gpu_check.latency([0.1, 0.2, 0.3, 0.4, 0.5], batch=2)
    assert few["samples"] == 5 and few["p99_batch_ms"] is None and few["p90_batch_ms"] is None
    assert few["max_batch_ms"] == pytest.approx(500) and few["p50_batch_ms"] == pytest.approx(300)
    assert few["captions_per_second"] == pytest.approx(10 / 1.5)
    many = gpu_check.latency([0.01] * 99 + [1.0], batch=1)
    assert many["samples"] == 100 and many["p99_batch_ms"] == pytest.approx(10 + 0.01 * 990, rel=1e-6)
