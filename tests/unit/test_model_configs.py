"""Every config.pbtxt parses with Triton's model_config.proto, and the ensemble is the contract of docs/tensors.md."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from blip_server.export import ExportOptions, export_checkpoint
from blip_server.repository import CACHED_ENSEMBLE, ENSEMBLE, MODELS, parse_config, template_directory
from support import triton_schema

TEMPLATE = template_directory()
CONFIGS = sorted(TEMPLATE.glob("*/config.pbtxt"))

# docs/tensors.md: the public tensors of `blip_caption`.
ENSEMBLE_INPUTS = {
    "IMAGE": mc.TYPE_STRING, "PROMPT": mc.TYPE_STRING,
    "NUM_BEAMS": mc.TYPE_INT32, "MAX_NEW_TOKENS": mc.TYPE_INT32, "MIN_NEW_TOKENS": mc.TYPE_INT32,
    "NUM_RETURN_SEQUENCES": mc.TYPE_INT32, "LENGTH_PENALTY": mc.TYPE_FP32, "REPETITION_PENALTY": mc.TYPE_FP32,
    "NO_REPEAT_NGRAM_SIZE": mc.TYPE_INT32, "TOP_K": mc.TYPE_INT32, "SEED": mc.TYPE_INT64, "DO_SAMPLE": mc.TYPE_BOOL,
    "TEMPERATURE": mc.TYPE_FP32, "TOP_P": mc.TYPE_FP32,
}
ENSEMBLE_OUTPUTS = {"CAPTIONS": mc.TYPE_STRING, "SCORES": mc.TYPE_FP32}


def _every_config(*repositories: Path) -> list[Path]:
    return [p for root in repositories for p in sorted(root.glob("*/config.pbtxt")) + sorted(root.glob("*/configs/*"))]


def test_every_config_written_parses_with_triton_2_51s_schema(repositories, checkpoints, tmp_path):
    """The template's configs, and every config of an export for blip-serve and one for NVIDIA's 24.10 container
    (configs/gpu.pbtxt: TensorRT, warm-up), with Triton 2.51's model_config.proto (tritonclient's is newer):
    a field 2.51 does not know fails the model's load there."""
    export_checkpoint(checkpoints["standard"], tmp_path / "container", ExportOptions(target="triton-container"))
    paths = _every_config(TEMPLATE, repositories["standard"], tmp_path / "container")
    assert len(paths) >= 3 * len(MODELS) and any(p.parent.name == "configs" for p in paths)
    for path in paths:
        # no unknown field (ParseError), and the same configuration tritonclient's schema reads
        assert triton_schema.parse(path.read_text()) == triton_schema.parse(str(parse_config(path))), path


def test_triton_2_51s_schema_refuses_a_field_added_after_it():
    ensemble = (TEMPLATE / "blip_caption" / "config.pbtxt").read_text()
    newer = ensemble + 'model_metrics { metric_control { metric_identifier { family: "nv_inference" } } }\n'
    text_format.Parse(newer, mc.ModelConfig())  # tritonclient 2.73's schema has it (added after the r24.10 branch)
    with pytest.raises(text_format.ParseError, match="model_metrics"):
        triton_schema.parse(newer)


def test_every_model_has_a_config():
    """The template's models, and the cached ensemble, which the export writes from the template's ensemble."""
    assert sorted(p.parent.name for p in CONFIGS) == sorted(set(MODELS) - {CACHED_ENSEMBLE})


def test_the_cached_ensemble_is_the_ensemble_with_the_response_cache_on(repositories):
    exported = repositories["standard"]
    assert sorted(p.parent.name for p in exported.glob("*/config.pbtxt")) == sorted(MODELS)
    plain, cached = (parse_config(exported / name / "config.pbtxt") for name in (ENSEMBLE, CACHED_ENSEMBLE))
    assert not plain.response_cache.enable and cached.response_cache.enable  # unseeded samples go to the plain one
    assert (cached.name, plain.name) == (CACHED_ENSEMBLE, ENSEMBLE)
    cached.name = plain.name
    cached.ClearField("response_cache")
    assert cached == plain  # the same inputs, outputs and steps (the option inputs written by the export included)
    assert (exported / CACHED_ENSEMBLE / "1").is_dir()  # Triton loads a model only with a version folder


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.parent.name)
def test_config_parses_and_batches_dynamically(path: Path):
    config = parse_config(path)
    assert config.name == path.parent.name
    assert config.max_batch_size > 0
    if config.platform != "ensemble":
        assert config.HasField("dynamic_batching") and not config.HasField("sequence_batching")
        assert (path.parent / "1" / "model.py").is_file()


def test_the_ensemble_has_the_public_tensors():
    config = parse_config(TEMPLATE / "blip_caption" / "config.pbtxt")
    inputs = {t.name: t for t in config.input}
    assert {name: t.data_type for name, t in inputs.items()} == ENSEMBLE_INPUTS
    assert [name for name, t in inputs.items() if not t.optional] == ["IMAGE"]
    assert all(list(t.dims) == [1] for t in inputs.values())
    assert {t.name: t.data_type for t in config.output} == ENSEMBLE_OUTPUTS


def test_the_ensemble_wires_every_step_to_an_existing_tensor():
    ensemble = parse_config(TEMPLATE / "blip_caption" / "config.pbtxt")
    produced = {t.name: t.data_type for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = parse_config(TEMPLATE / step.model_name / "config.pbtxt")
        model_inputs = {t.name: t for t in model.input}
        assert set(step.input_map) <= set(model_inputs)
        assert {n for n, t in model_inputs.items() if not t.optional} <= set(step.input_map)
        for model_name, tensor in step.input_map.items():
            assert produced[tensor] == model_inputs[model_name].data_type, (step.model_name, model_name)
        model_outputs = {t.name: t.data_type for t in model.output}
        for model_name, tensor in step.output_map.items():
            produced[tensor] = model_outputs[model_name]
        assert model.max_batch_size >= ensemble.max_batch_size
    assert set(ENSEMBLE_OUTPUTS) <= set(produced)


def test_preprocess_and_decoder_enforce_the_same_limits():
    def limits(model):
        return {k: v.string_value for k, v in parse_config(TEMPLATE / model / "config.pbtxt").parameters.items()
                if k.startswith("limit_")}

    assert limits("preprocess") == limits("text_decoder") != {}


def test_the_declared_request_options_are_the_ensembles_option_inputs():
    from generation_options import REQUEST_OPTIONS, GenerationOptions

    inputs = {t.name: t.data_type for t in parse_config(TEMPLATE / "blip_caption" / "config.pbtxt").input}
    assert {o.tensor for o in REQUEST_OPTIONS} == set(inputs) - {"IMAGE", "PROMPT"}
    for option in REQUEST_OPTIONS:
        assert inputs[option.tensor] == mc.DataType.Value(f"TYPE_{option.dtype}"), option.name
    # early_stopping is the checkpoint's (generation_config.json), never a request's
    assert {o.name for o in REQUEST_OPTIONS} == set(GenerationOptions.names()) - {"early_stopping"}


def test_the_preprocess_config_states_every_default_as_the_generation_options_have_it():
    from generation_options import GenerationOptions, from_parameters

    params = {k: v.string_value for k, v in parse_config(TEMPLATE / "preprocess" / "config.pbtxt").parameters.items()}
    stated = {k[len("default_"):] for k in params if k.startswith("default_")}
    assert stated == set(GenerationOptions.names()) - {"seed"}
    assert from_parameters(GenerationOptions, params, "default_") == GenerationOptions()


def test_the_decoder_hands_new_requests_over_without_waiting():
    """The decoder's execute() only queues new requests for its own loop; a queue delay would only delay them,
    and Triton's sequence batcher (which re-sent every request's inputs at every step) is gone."""
    config = parse_config(TEMPLATE / "text_decoder" / "config.pbtxt")
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert not config.HasField("sequence_batching") and not config.model_transaction_policy.decoupled
    assert parse_config(TEMPLATE / "blip_caption" / "config.pbtxt").max_batch_size == 1
