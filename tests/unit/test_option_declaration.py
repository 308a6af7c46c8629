"""One declaration per generation option (`generation_options.OPTIONS`, `LIMITS`), and everything that states an
option in agreement with it: the proto, the client SDK and its CLI, the exported Triton configs (and the template's
generated blocks), GetModelInfo's defaults and docs/limits.md. Each failure names the option and the place.

What adding an option touches: the proto (then `python protos/generate_python.py`), the declaration, the SDK's
`GenerationOptions` (these tests say what is missing) and the decoder; `python -m blip_server.model_configs`
rewrites the template's configs and docs/limits.md from the declaration (blip-export writes the exported
configs itself)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import typing
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor
from tritonclient.grpc import model_config_pb2 as mc

import blip_client
from blip_client import cli
from blip_client.protos.blip.caption.v1 import caption_pb2
from blip_server import ensemble, model_configs
from blip_server.gateway.captioner import Captioner, GatewayLimits
from blip_server.gateway.messages import OPTION_FIELDS, options_from_pb, options_to_pb
from blip_server.gateway.replicas import ReplicaPool
from blip_server.repository import parse_config, template_directory
from blip_server.shared import generation_options as declared
from blip_server.shared.generation_options import (
    LIMITS,
    OPTIONS,
    REQUEST_OPTIONS,
    GenerationLimits,
    GenerationOptions,
    Option,
    OptionError,
    from_parameters,
)
from support import reference

ROOT = Path(__file__).resolve().parents[2]
PROTO_TYPES = {"INT32": FieldDescriptor.TYPE_INT32, "INT64": FieldDescriptor.TYPE_INT64,
               "FP32": FieldDescriptor.TYPE_FLOAT, "BOOL": FieldDescriptor.TYPE_BOOL}
PYTHON_TYPES = {"INT32": int, "INT64": int, "FP32": float, "BOOL": bool}
NONE = type(None)


# -- the declaration itself ------------------------------------------------------------------------------------


def test_every_declaration_is_consistent():
    names = [o.name for o in OPTIONS]
    assert len(set(names)) == len(names), "an option is declared twice"
    limit_names = {limit.name for limit in LIMITS}
    for o in OPTIONS:
        if o.request:
            assert o.dtype in PYTHON_TYPES, f"{o.name}: unknown Triton datatype {o.dtype!r}"
            assert PYTHON_TYPES[o.dtype] is o.kind, f"{o.name}: a {o.kind.__name__} carried as {o.dtype}"
        if isinstance(o.high, str):
            reference_ = o.high[len("limit_"):] if o.high.startswith("limit_") else o.high
            known = limit_names if o.high.startswith("limit_") else set(names[: names.index(o.name)])
            assert reference_ in known, f"{o.name}: its high {o.high!r} is neither a limit nor an earlier option"
        if o.default is not None and not o.repeated:
            GenerationOptions(**{o.name: o.default})  # the default is a value of its type
        assert o.doc, f"{o.name} says nothing of what it means"
    # The declared defaults pass the declared validation with the declared limits.
    GenerationOptions().validate(GenerationLimits(), prompt_tokens=1, max_positions=512)


def test_the_test_references_defaults_are_the_declarations():
    # transformers is called with these where the service's defaults apply (tests/support/reference.py)
    for name, value in reference.SERVICE_DEFAULTS.items():
        assert getattr(GenerationOptions(), name) == value, f"tests/support/reference.py's default of {name}"


# -- the proto ------------------------------------------------------------------------------------------------


def test_the_proto_has_one_field_per_request_option_of_the_declared_type():
    fields = caption_pb2.GenerationOptions.DESCRIPTOR.fields_by_name
    assert set(fields) == set(OPTION_FIELDS), (
        f"caption.proto's GenerationOptions lacks {sorted(set(OPTION_FIELDS) - set(fields))} and has undeclared "
        f"{sorted(set(fields) - set(OPTION_FIELDS))}")
    for o in REQUEST_OPTIONS:
        field = fields[o.name]
        assert field.type == PROTO_TYPES[o.dtype], f"caption.proto: {o.name} is not a {o.dtype} field"
        if o.repeated:
            assert field.is_repeated, f"caption.proto: {o.name} must be repeated"
        else:
            assert not field.is_repeated and field.has_presence, (
                f"caption.proto: {o.name} must be a proto3 `optional` field (an explicit 0 is a value)")


def test_the_proto_limits_hold_every_declared_limit():
    fields = caption_pb2.Limits.DESCRIPTOR.fields_by_name
    for limit in LIMITS:
        assert limit.name in fields, f"caption.proto's Limits lacks {limit.name}"
        assert fields[limit.name].type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64), limit.name


# -- the client SDK and its CLI -----------------------------------------------------------------------------


def _sdk_type(o: Option) -> object:
    return (tuple[o.kind, ...] if o.repeated else o.kind) | None


def test_the_sdk_options_are_the_request_options_unset_by_default():
    hints = typing.get_type_hints(blip_client.GenerationOptions)
    fields = {f.name: f for f in dataclasses.fields(blip_client.GenerationOptions)}
    assert list(fields) == list(OPTION_FIELDS), (
        f"blip_client.GenerationOptions lacks {[n for n in OPTION_FIELDS if n not in fields]} and has undeclared "
        f"{[n for n in fields if n not in OPTION_FIELDS]} (or another order than the declaration's)")
    for o in REQUEST_OPTIONS:
        assert hints[o.name] == _sdk_type(o), f"blip_client.GenerationOptions.{o.name} should be {_sdk_type(o)}"
        assert fields[o.name].default is None, f"blip_client.GenerationOptions.{o.name}: unset means the server's"
    limits = {f.name for f in dataclasses.fields(blip_client.Limits)}
    assert {limit.name for limit in LIMITS} <= limits, f"blip_client.Limits lacks {set(LIMITS) - limits}"


def _example(o: Option) -> object:
    value = {bool: True, int: 2, float: 0.5}[o.kind]
    return (value, value) if o.repeated else value


def test_the_cli_has_a_flag_per_option_and_the_gateway_reads_what_it_sends():
    flags = {field: (flag, kind) for flag, (field, kind, _) in cli.OPTION_FLAGS.items()}
    assert set(flags) == set(OPTION_FIELDS), f"blip-caption lacks flags for {set(OPTION_FIELDS) - set(flags)}"
    argv = ["image.jpg"]
    for o in REQUEST_OPTIONS:
        flag, kind = flags[o.name]
        assert flag == "--" + o.name.replace("_", "-") and kind is o.kind, f"blip-caption's flag for {o.name}"
        value = _example(o)
        argv += [flag] if o.kind is bool else [flag, *map(str, value if o.repeated else (value,))]
    sent = cli._options(cli.parse_args(argv))
    received = options_from_pb(caption_pb2.GenerationOptions.FromString(sent.to_pb().SerializeToString()))
    assert received == {o.name: _example(o) for o in REQUEST_OPTIONS}
    assert cli._options(cli.parse_args(["image.jpg"])) == blip_client.GenerationOptions()  # nothing set


# -- the Triton configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", model_configs.OPTION_CONFIGS)
def test_the_templates_generated_blocks_are_the_declarations(model):
    path = template_directory() / model / "config.pbtxt"
    text = path.read_text()
    assert "# BEGIN generation option" in text
    assert model_configs.write_option_blocks(text) == text, (
        f"{path}'s generation option blocks differ from the declaration: run "
        "`python -m blip_server.model_configs` (blip-export writes them from the declaration anyway)")


def _dims(o: Option) -> list[int]:
    return [-1] if o.repeated else [1]


def _check_option_inputs(config: mc.ModelConfig, where: str) -> None:
    inputs = {t.name: t for t in config.input}
    for o in REQUEST_OPTIONS:
        assert o.tensor in inputs, f"{where} has no input {o.tensor} for {o.name}"
        tensor = inputs[o.tensor]
        assert tensor.data_type == mc.DataType.Value(f"TYPE_{o.dtype}"), f"{where}: {o.tensor} is not {o.dtype}"
        assert list(tensor.dims) == _dims(o) and tensor.optional, f"{where}: {o.tensor} dims/optional"
    extra = set(inputs) - {o.tensor for o in REQUEST_OPTIONS} - {"IMAGE", "PROMPT"}
    assert not extra, f"{where} has inputs no option declares: {sorted(extra)}"


def _parameters(config: mc.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def test_the_exported_configs_state_every_option_as_declared(repositories):
    repository = repositories["standard"]
    ensemble_config = parse_config(repository / "blip_caption" / "config.pbtxt")
    _check_option_inputs(ensemble_config, "the exported blip_caption config")
    step = next(s for s in ensemble_config.ensemble_scheduling.step if s.model_name == "preprocess")
    for o in REQUEST_OPTIONS:
        assert step.input_map.get(o.tensor) == o.tensor, f"the ensemble does not hand {o.tensor} to preprocess"

    preprocess = parse_config(repository / "preprocess" / "config.pbtxt")
    _check_option_inputs(preprocess, "the exported preprocess config")
    params = _parameters(preprocess)
    stated = {k[len("default_"):] for k in params if k.startswith("default_")}
    assert stated == {o.name for o in OPTIONS if o.default is not None}, "preprocess's default_* parameters"
    assert from_parameters(GenerationOptions, params, "default_") == GenerationOptions()
    for model in ("preprocess", "text_decoder"):
        params = _parameters(parse_config(repository / model / "config.pbtxt"))
        assert {k for k in params if k.startswith("limit_")} == {f"limit_{limit.name}" for limit in LIMITS}, model
        assert from_parameters(GenerationLimits, params, "limit_") == GenerationLimits(), model


def test_an_export_writes_the_blocks_from_the_declaration_not_from_the_template(tmp_path):
    """blip-export rewrites the blocks: a stale template still exports what the declaration says."""
    template = (template_directory() / "preprocess" / "config.pbtxt").read_text()
    stale = template.replace('"default_num_beams" value: { string_value: "3" }',
                             '"default_num_beams" value: { string_value: "7" }')
    assert stale != template
    assert model_configs.write_option_blocks(stale) == template


# -- GetModelInfo and the gateway's checks --------------------------------------------------------------------


def test_model_info_reports_the_declared_defaults_and_limits(repositories):
    """The gateway reads what an exported preprocess states, as preprocess reads it (from_parameters)."""
    config = parse_config(repositories["standard"] / "preprocess" / "config.pbtxt")
    answer = {"config": json_format.MessageToDict(config, preserving_proto_field_name=True)}

    class Served(Captioner):
        async def _call(self, request, deadline=None):
            return answer

    description = asyncio.run(Served(ReplicaPool(("127.0.0.1:1",)), GatewayLimits()).describe())
    info = blip_client.ModelInfo.from_pb(caption_pb2.ModelInfo.FromString(description.to_pb().SerializeToString()))
    defaults = GenerationOptions()
    for o in REQUEST_OPTIONS:
        value = getattr(info.defaults, o.name)
        expected = getattr(defaults, o.name)
        assert value == (pytest.approx(expected) if o.kind is float else expected), f"GetModelInfo's {o.name}"
    assert info.early_stopping == "false"
    for limit in LIMITS:
        assert getattr(info.limits, limit.name) == limit.default, f"GetModelInfo's {limit.name}"


# -- docs ---------------------------------------------------------------------------------------------------


def test_docs_limits_table_is_the_declarations():
    text = model_configs.LIMITS_DOC.read_text()
    assert "<!-- BEGIN options -->" in text
    assert model_configs.write_limits_doc(text) == text, (
        "docs/limits.md's table of the options differs from the declaration: run "
        "`python -m blip_server.model_configs`; it should read:\n" + model_configs.limits_table())


def test_docs_tensors_names_every_option_tensor():
    text = (ROOT / "docs" / "tensors.md").read_text()
    missing = [o.tensor for o in REQUEST_OPTIONS if f"`{o.tensor}`" not in text]
    assert not missing, f"docs/tensors.md does not list {missing}"


# -- a list-valued option fits the generic paths ----------------------------------------------------------------

SUPPRESS = Option("suppress_tokens", int, (), "Token ids never generated.", dtype="INT64", low=0, high=1000,
                  repeated=True)


class _WithList(GenerationOptions):
    __slots__ = ()
    _declared = (*OPTIONS, SUPPRESS)


def test_a_list_valued_option_is_parsed_validated_and_carried_generically():
    options = _WithList(suppress_tokens=(3, 5), num_beams=2)
    assert _WithList.from_json(options.to_json()) == options
    assert json.loads(options.to_json())["suppress_tokens"] == [3, 5]
    assert _WithList.from_json(b'{"suppress_tokens": []}').suppress_tokens == ()
    with pytest.raises(OptionError, match="suppress_tokens must be a list of int"):
        _WithList.from_json(b'{"suppress_tokens": 3}')
    with pytest.raises(OptionError, match="suppress_tokens must be a int"):
        _WithList.from_json(b'{"suppress_tokens": [1.5]}')
    options.validate(GenerationLimits(), prompt_tokens=1, max_positions=512)
    with pytest.raises(OptionError, match="suppress_tokens=1001 is out of range: allowed 0 to 1000"):
        options.with_values(suppress_tokens=(1, 1001)).validate(GenerationLimits(), 1, 512)
    assert from_parameters(_WithList, {"default_suppress_tokens": "7, 8"}, "default_").suppress_tokens == (7, 8)
    assert declared.render_parameter((7, 8)) == "7,8"
    assert hash(options) == hash(_WithList(suppress_tokens=(3, 5), num_beams=2))


def test_a_list_valued_option_gets_a_variable_length_tensor_and_config_input():
    blocks = model_configs.option_blocks((*OPTIONS, SUPPRESS))
    assert '{ name: "SUPPRESS_TOKENS" data_type: TYPE_INT64 dims: [ -1 ] optional: true },' in blocks[
        "generation option inputs"]
    assert not any("default_suppress_tokens" in line for line in blocks["generation option defaults"])  # () is unset
    tensor = ensemble.option_tensor(grpcclient, SUPPRESS, (3, 5, 9), count=1)
    assert tensor.name() == "SUPPRESS_TOKENS" and tensor.shape() == [1, 3] and tensor.datatype() == "INT64"
    scalar = ensemble.option_tensor(grpcclient, OPTIONS[0], 4, count=1)
    assert scalar.shape() == [1, 1] and scalar.datatype() == "INT32"
    assert np.dtype(ensemble.NUMPY_DTYPES["INT64"]) == np.int64


def test_a_repeated_proto_field_reaches_the_gateway_as_a_tuple_and_unset_when_empty():
    file = descriptor_pb2.FileDescriptorProto(name="hypothetical.proto", package="hypothetical", syntax="proto3")
    message = file.message_type.add(name="GenerationOptions")
    message.field.add(name="suppress_tokens", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("hypothetical.GenerationOptions"))
    assert options_from_pb(cls(suppress_tokens=[3, 5]), ("suppress_tokens",)) == {"suppress_tokens": (3, 5)}
    assert options_from_pb(cls(), ("suppress_tokens",)) == {}
    assert options_to_pb({"num_beams": 2}).num_beams == 2
