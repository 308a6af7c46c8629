"""The gateway runs in an image of its own and its health check starts a Python every few seconds: importing it
must load neither the exporter nor the libraries only the models need."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["torch", "onnx", "onnxruntime", "transformers", "blip_server.export", "blip_server.quantize"]


def _loaded_after(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def test_importing_the_gateway_loads_no_model_library_and_not_the_exporter():
    assert _loaded_after("import blip_server.gateway.main, blip_server.gateway.probe") == []


def test_the_package_names_still_resolve_when_asked_for():
    assert "blip_server.export" in _loaded_after("from blip_server import ExportOptions")
