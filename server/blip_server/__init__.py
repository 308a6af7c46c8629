"""BLIP image captioning served by NVIDIA Triton: checkpoint export, the embedded Triton launcher, `blip-serve`.

The names below are imported when first used (PEP 562), so that importing a part of the package, the gateway
above all (which runs in its own image, and whose health check starts a Python every few seconds), loads that
part alone and not the exporter.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GatewayConfig": "blip_server.config",
    "ServeConfig": "blip_server.config",
    "BlipServerError": "blip_server.errors",
    "ExportError": "blip_server.errors",
    "ModelNotFoundError": "blip_server.errors",
    "TritonStartError": "blip_server.errors",
    "ExportOptions": "blip_server.export",
    "export_checkpoint": "blip_server.export",
    "EmbeddedTriton": "blip_server.triton",
    "TritonOptions": "blip_server.triton",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'blip_server' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
