"""Triton Python model `vision_encoder`: the checkpoint's BlipVisionModel as ONNX, run by ONNX Runtime.

This is the embedded target, whose Triton build has only the Python backend. In NVIDIA's container the same
`model.onnx` is served by the native `onnxruntime` backend instead (`blip-export --target triton-container`).
A GPU instance (`configs/gpu.pbtxt`) runs on ONNX Runtime's CUDA provider (onnxruntime-gpu), without TF32; it
refuses to load rather than run on the CPU unnoticed: when onnxruntime has no CUDA provider, when the session
did not get it (ONNX Runtime falls back to the CPU when the provider cannot be created, e.g. without cuDNN), and
for an int8 export (its quantised operators are the CPU's). ONNX Runtime's run-time fallback to the CPU is off.
(TensorRT, with its minutes-long engine builds, is the container's: its native onnxruntime backend builds the
engines during warm-up, before the model is ready.)

Input (per item): PIXEL_VALUES FP32 [3, H, W]. Output (per item): IMAGE_EMBEDS FP32 [L, hidden].
A batch's images go through session runs of `images_per_run` images each (the parameter; 0: the whole batch, at
most `max_batch_size`), each run taking its own turn on the CPU cores. If a run fails, each request is run on
its own, so that only the requests that fail alone are answered with an error.
"""

import json
import traceback
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from cpu_turns import CpuTurns, available_cores


def _parameter(config: dict, name: str, default: int) -> int:
    value = config.get("parameters", {}).get(name, {}).get("string_value", "")
    return int(value) if value else default


def _error(message: str, code) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


_GPU_PROVIDER = "CUDAExecutionProvider"


def _gpu_providers(device: int, precision: str) -> list:
    if precision == "int8":
        raise RuntimeError("vision_encoder: this repository was exported with --precision int8, whose quantised "
                           "encoder runs on CPUs only; export fp32 or fp16 for GPUs")
    available = ort.get_available_providers()
    if _GPU_PROVIDER not in available:
        raise RuntimeError(
            "vision_encoder: a GPU instance needs ONNX Runtime's CUDA provider, which this onnxruntime lacks "
            f"(it has {', '.join(available)}); install onnxruntime-gpu in place of onnxruntime"
        )
    # use_tf32 0: float32 products stay float32 (fp32 must be exact; an fp16 model's products are fp16 anyway).
    return [(_GPU_PROVIDER, {"device_id": device, "use_tf32": 0})]


def check_gpu_session(session) -> None:
    """Refuse a session that does not hold the CUDA provider (ONNX Runtime creates it on the CPU alone when the
    provider fails to initialise), and switch off its fallback to the CPU when a run fails on the GPU."""
    held = session.get_providers()
    if _GPU_PROVIDER not in held:
        raise RuntimeError(f"vision_encoder: ONNX Runtime could not use the GPU (the session holds "
                           f"{', '.join(held)}; its log above says why, e.g. a missing CUDA or cuDNN library); "
                           "refusing to run a GPU instance on the CPU")
    session.disable_fallback()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        directory = Path(args["model_repository"]) / args["model_version"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = _parameter(config, "threads", 0) or available_cores()
        options.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: the decoder and preprocess share the cores with this model.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        gpu = args.get("model_instance_kind") == "GPU"
        if gpu:
            precision = config.get("parameters", {}).get("precision", {}).get("string_value", "fp32")
            providers = _gpu_providers(int(args["model_instance_device_id"]), precision) + providers
        # On the CPU a run takes its turn on the cores with the decoder's steps (cpu_turns.py).
        self.turns = CpuTurns(enabled=not gpu and _parameter(config, "cpu_turns", 1) != 0)
        self.session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=providers)
        if gpu:
            check_gpu_session(self.session)
        # After each run, the CPU arena gives back what the run added to it. Without this it keeps the peak of the
        # largest batch it ever ran (measured on BLIP-large: +400 MB after one batch of 4, and a soak's memory
        # stepping up with each new largest batch); with it, no slower (BLIP-large alone: 2.8 s per image at
        # batch 1 against 2.9 s, 13.3 s per batch of 4 against 14.4 s).
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        expected = self.session.get_inputs()[0].shape
        self.item_shape = tuple(expected[1:])
        self.images_per_run = _parameter(config, "images_per_run", 0) or max(1, int(config.get("max_batch_size", 0)))

    def execute(self, requests):
        batches, errors = [], []
        for request in requests:
            pixels = pb_utils.get_input_tensor_by_name(request, "PIXEL_VALUES").as_numpy()
            if pixels.shape[1:] != self.item_shape or pixels.dtype != np.float32:
                errors.append(
                    f"PIXEL_VALUES must be float32 [{', '.join(map(str, self.item_shape))}] per item; "
                    f"got {pixels.dtype} {list(pixels.shape[1:])}"
                )
                batches.append(None)
            else:
                errors.append(None)
                batches.append(pixels)
        valid = [b for b in batches if b is not None]
        try:
            embeds = self._encode(np.concatenate(valid)) if valid else None
        except Exception:  # noqa: BLE001 - find the request that fails; the others are answered
            pb_utils.Logger.log_error(f"vision_encoder: a batch failed, running its requests one by one:\n"
                                      f"{traceback.format_exc()}")
            return [self._alone(pixels, error) for pixels, error in zip(batches, errors, strict=True)]
        responses, offset = [], 0
        for pixels, error in zip(batches, errors, strict=True):
            if error is not None:
                responses.append(_error(error, pb_utils.TritonError.INVALID_ARG))
                continue
            items = embeds[offset : offset + len(pixels)]
            offset += len(pixels)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGE_EMBEDS", items)]))
        return responses

    def _alone(self, pixels, error):
        if error is not None:
            return _error(error, pb_utils.TritonError.INVALID_ARG)
        try:
            return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGE_EMBEDS", self._encode(pixels))])
        except Exception:  # noqa: BLE001
            pb_utils.Logger.log_error(f"vision_encoder: a request failed:\n{traceback.format_exc()}")
            return _error("encoding the image failed; the server log has the details", pb_utils.TritonError.INTERNAL)

    def _encode(self, pixels: np.ndarray) -> np.ndarray:
        outputs = []
        for i in range(0, len(pixels), self.images_per_run):
            with self.turns:
                outputs.append(self.session.run(None, {"PIXEL_VALUES": pixels[i : i + self.images_per_run]},
                                                self.run_options)[0])
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def finalize(self):
        self.turns.close()
