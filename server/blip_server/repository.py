"""The Triton model repository: where its template lives, how to recognise an exported one, config edits."""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf import text_format

from blip_server import ensemble
from blip_server.errors import ModelNotFoundError
from blip_server.repository_copy import MANIFEST

# The modules of blip_server.shared that the export copies next to each model's own (its version folder): option
# and image checks (the gateway, preprocess and text_decoder use the same code), and the turns the encoder and
# the decoder take on the CPU cores.
SHARED_BY_MODEL = {
    "preprocess": ("generation_options.py", "image_header.py"),
    "text_decoder": ("generation_options.py", "cpu_turns.py"),
    "vision_encoder": ("cpu_turns.py",),
}
SHARED_MODULES = tuple(sorted({module for modules in SHARED_BY_MODEL.values() for module in modules}))
ENSEMBLE, CACHED_ENSEMBLE = ensemble.MODEL, ensemble.CACHED_MODEL
MODELS = ("preprocess", "vision_encoder", "text_decoder", ENSEMBLE, CACHED_ENSEMBLE)


def template_directory() -> Path:
    """`model_repository/` of the source tree this package is installed from."""
    path = Path(__file__).resolve().parents[2] / "model_repository"
    if not (path / ENSEMBLE / "config.pbtxt").is_file():
        raise ModelNotFoundError(
            f"the model repository template is not at {path}; install this package from its source tree "
            "(pip install -e .)"
        )
    return path


def shared_directory() -> Path:
    """`blip_server/shared`: the modules the gateway and the Triton models share."""
    return Path(__file__).resolve().parent / "shared"


def is_model_repository(path: Path) -> bool:
    return (path / ENSEMBLE / "config.pbtxt").is_file()


def read_manifest(repository: Path) -> dict:
    path = repository / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def parse_config(path: Path):
    """config.pbtxt -> inference.ModelConfig (raises text_format.ParseError when invalid)."""
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
