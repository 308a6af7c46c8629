"""Triton 2.51's model configuration schema (tests/support/triton_2_51_model_config.proto), compiled at test time
with grpcio-tools into a descriptor pool of its own (tritonclient's newer `inference.ModelConfig` stays as it is)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

PROTO = Path(__file__).with_name("triton_2_51_model_config.proto")


@functools.cache
def model_config_class(proto: Path = PROTO) -> type:
    """`inference.ModelConfig` of `proto`, compiled by grpc_tools.protoc."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as out:
        descriptors = Path(out) / "model_config.desc"
        code = protoc.main(["protoc", f"--proto_path={proto.parent}", f"--descriptor_set_out={descriptors}",
                            proto.name])
        if code != 0:
            raise RuntimeError(f"protoc failed ({code}) on {proto}")
        files = descriptor_pb2.FileDescriptorSet.FromString(descriptors.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def parse(text: str, proto: Path = PROTO):
    """A config.pbtxt's text as Triton 2.51 reads it: text_format.ParseError on any field it does not know."""
    return text_format.Parse(text, model_config_class(proto)())
