"""The parameter keys the TensorRT execution accelerator of Triton's onnxruntime backend accepts (any other key
fails the model's load: "unknown parameter '<key>' is provided for TensorRT Execution Accelerator").

Source: triton-inference-server/onnxruntime_backend, src/onnxruntime.cc, `ModelState::LoadModel`'s chain of
`param_key == "..."` under `name == kTensorRTExecutionAccelerator` (Triton 24.10 / 2.51 is the release served).
The copy read holds the keys of PR #237 ("[TensorRT EP] Enable more trt options", merged February 2024, before
the r24.10 branch) and the six before it. trt_timing_cache_path is in a later copy (2025) and README's mapping
table of the same period, but neither in PR #237's list nor in README's table at its merge (commit 8aeb633), and
a user asked for it in February 2024 (onnxruntime_backend issue #241, "not supported in the triton ORT TRT
config"): it is left out of this list and of the configs. Without it, ONNX Runtime keeps the timing cache in
trt_engine_cache_path (onnxruntime PR #17865's fallthrough).
"""

from __future__ import annotations

TENSORRT_PARAMETERS = frozenset({
    # before PR #237
    "precision_mode", "max_workspace_size_bytes", "int8_calibration_table_name",
    "int8_use_native_calibration_table", "trt_engine_cache_enable", "trt_engine_cache_path",
    # PR #237
    "trt_max_partition_iterations", "trt_min_subgraph_size", "trt_dla_enable", "trt_dla_core",
    "trt_engine_cache_prefix", "trt_dump_subgraphs", "trt_force_sequential_engine_build",
    "trt_context_memory_sharing_enable", "trt_layer_norm_fp32_fallback", "trt_timing_cache_enable",
    "trt_force_timing_cache", "trt_detailed_build_log", "trt_build_heuristics_enable", "trt_sparsity_enable",
    "trt_builder_optimization_level", "trt_auxiliary_streams", "trt_tactic_sources", "trt_extra_plugin_lib_paths",
    "trt_profile_min_shapes", "trt_profile_max_shapes", "trt_profile_opt_shapes", "trt_cuda_graph_enable",
    "trt_dump_ep_context_model", "trt_ep_context_file_path", "trt_ep_context_embed_mode",
})

# precision_mode's values: FP32, FP16, INT8 (BF16 only in copies from 2025 on).
PRECISION_MODES = frozenset({"FP32", "FP16", "INT8"})
