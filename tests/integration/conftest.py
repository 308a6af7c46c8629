"""The real stack for integration tests: tritonserver on free loopback ports, one per test checkpoint.

When a test fails, the tail of every running server's log is added to its report.
"""

from __future__ import annotations

import sys

import pytest
import tritonclient.grpc as grpcclient

from blip_server.errors import TritonStartError
from blip_server.triton import EmbeddedTriton, TritonOptions
from support.network import free_port
from support.serve import ServeProcess
from support.torchvision_reference import TorchvisionReference

_RUNNING: list[EmbeddedTriton] = []
_TORCHVISION: list[TorchvisionReference] = []
_SERVING: list[ServeProcess] = []
# The shared servers run without Triton's response cache: their tests send the same request again and again to
# see the models at work (timings, deadlines, faults, statistics). The cache has tests of its own
# (test_response_cache.py), and blip-serve's default keeps it on.
NO_CACHE = 0


def _start(triton: EmbeddedTriton) -> None:
    """Start `triton` and wait until it is ready; once more if Triton 2.51's Python backend aborted while loading
    (boost::interprocess::lock_exception, an upstream fault of its shared-memory setup: seen once, a replica that
    test_failover restarted during a run under tests/stress.sh), as an orchestrator and blip-serve's supervisor
    would. Said on stderr, never silent."""
    for attempt in (1, 2):
        triton.start()
        try:
            triton.wait_ready()
            return
        except TritonStartError as exc:
            if attempt == 2 or "boost::interprocess::lock_exception" not in str(exc):
                raise
            print(f"tritonserver aborted while starting (Triton's lock_exception); starting it again:\n{exc}",
                  file=sys.stderr)
            triton.kill()


class Server:
    def __init__(self, triton: EmbeddedTriton, checkpoint):
        self.triton = triton
        self.checkpoint = str(checkpoint)
        self.url = f"127.0.0.1:{triton.options.grpc_port}"

    def client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(self.url)


@pytest.fixture(scope="session")
def servers(repositories, checkpoints):
    """name -> Server, started on first use and stopped at the end of the session."""
    started: dict[str, Server] = {}

    def get(name: str) -> Server:
        if name not in started:
            triton = EmbeddedTriton(TritonOptions(
                model_repository=repositories[name], grpc_port=free_port(), http_port=free_port(),
                metrics_port=free_port(), startup_timeout=180, response_cache_mb=NO_CACHE,
            ))
            _RUNNING.append(triton)
            _start(triton)
            started[name] = Server(triton, checkpoints[name])
        return started[name]

    yield get
    for triton in list(_RUNNING):
        triton.stop()
        triton.cleanup()
        _RUNNING.remove(triton)


@pytest.fixture
def start_triton():
    """start(repository, **TritonOptions) -> a ready EmbeddedTriton on free ports, stopped after the test."""
    mine: list[EmbeddedTriton] = []

    def start(repository, **options) -> EmbeddedTriton:
        options = {"grpc_port": free_port(), "http_port": free_port(), "metrics_port": free_port(),
                   "startup_timeout": 180, "response_cache_mb": NO_CACHE, **options}
        triton = EmbeddedTriton(TritonOptions(model_repository=repository, **options))
        _RUNNING.append(triton)
        mine.append(triton)
        _start(triton)
        return triton

    yield start
    for triton in mine:
        triton.stop()
        triton.cleanup()
        _RUNNING.remove(triton)


@pytest.fixture(scope="session")
def service(repositories, checkpoints, tmp_path_factory):
    """blip-serve (gateway + Triton) serving the standard test checkpoint, as a user runs it."""
    serve = ServeProcess("--model", str(repositories["standard"]), "--response-cache-mb", str(NO_CACHE),
                         cache=tmp_path_factory.mktemp("cache"))
    _SERVING.append(serve)
    serve.wait_ready()
    serve.checkpoint = str(checkpoints["standard"])
    yield serve
    _SERVING.remove(serve)
    code, log = serve.stop()
    assert code == 0, log


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for triton in _RUNNING:
            report.sections.append((f"tritonserver log (pid {triton.pid})", triton.log_tail(80)))
        for serve in _SERVING:
            report.sections.append((f"blip-serve log (pid {serve.process.pid})", serve.log()[-8000:]))
            if serve.triton_log is not None:
                report.sections.append(("its tritonserver log", serve.triton_log_tail()))


def pytest_collection_modifyitems(session, config, items):
    """Start building the torchvision environment as soon as a collected test needs it, so that it builds
    while other tests run."""
    if any("torchvision_reference" in getattr(item, "fixturenames", ()) for item in items):
        import tempfile
        from pathlib import Path

        reference = TorchvisionReference(Path(tempfile.mkdtemp(prefix="blip-torchvision-")))
        reference.start_building()
        _TORCHVISION.append(reference)


@pytest.fixture(scope="session")
def torchvision_reference():
    """transformers with torchvision, in a virtual environment of its own (support.torchvision_reference)."""
    reference = _TORCHVISION[0]
    yield reference
    import shutil

    shutil.rmtree(reference.directory, ignore_errors=True)
