"""A stand-in for Triton's Python API (`triton_python_backend_utils`, which only a backend stub provides): the few
calls our models make, so that unit tests can run a `model.py` as Triton would (served, they are tested end to
end by tests/integration)."""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest


class TritonError(Exception):
    INVALID_ARG, INTERNAL, CANCELLED, UNAVAILABLE = "INVALID_ARG", "INTERNAL", "CANCELLED", "UNAVAILABLE"

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class InferenceResponse:
    def __init__(self, output_tensors, error=None):
        self.outputs = {t.name: t.array for t in output_tensors}
        self.error = error


class Metric:
    """A metric's value as Triton would export it: counters summed, gauges set."""

    def __init__(self):
        self.value = 0.0

    def increment(self, value):
        self.value += value

    def set(self, value):
        self.value = value


class MetricFamily:
    COUNTER, GAUGE = "counter", "gauge"
    # The latest metric of each family, by name: what the last model loaded reports.
    metrics: dict[str, Metric] = {}

    def __init__(self, name, description, kind):
        self.name = name

    def Metric(self):  # noqa: N802 - Triton's name
        metric = MetricFamily.metrics[self.name] = Metric()
        return metric


def pb_utils(get_input: Callable[[object, str], Tensor | None]) -> types.ModuleType:
    """The module, with `get_input_tensor_by_name` answered by `get_input(request, name)`."""
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor, module.InferenceResponse, module.TritonError = Tensor, InferenceResponse, TritonError
    module.MetricFamily = MetricFamily
    module.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    module.get_input_tensor_by_name = get_input
    module.Logger = types.SimpleNamespace(log_error=lambda message: None, log_warn=lambda message: None,
                                          log_info=lambda message: None)
    return module


def load_model_module(monkeypatch: pytest.MonkeyPatch, model_py: Path, name: str,
                      get_input: Callable[[object, str], Tensor | None]) -> types.ModuleType:
    """`model_py` imported as `name`, with the stand-in in place of Triton's module (for this test only)."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils(get_input))
    spec = importlib.util.spec_from_file_location(name, model_py)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
