"""BLIP image captioning served by NVIDIA Triton: checkpoint export, the embedded Triton launcher, `blip-serve`."""

from blip_server.config import GatewayConfig, ServeConfig
from blip_server.errors import BlipServerError, ExportError, ModelNotFoundError, TritonStartError
from blip_server.export import ExportOptions, export_checkpoint
from blip_server.triton import EmbeddedTriton, TritonOptions

__all__ = [
    "BlipServerError",
    "EmbeddedTriton",
    "ExportError",
    "ExportOptions",
    "GatewayConfig",
    "ModelNotFoundError",
    "ServeConfig",
    "TritonOptions",
    "TritonStartError",
    "export_checkpoint",
]
