"""Faults through the real stack: a killed Python-backend stub of each kind, a hung (SIGSTOPped) Triton, each
waited out (under load too: no call lost), SIGTERM under load, a second signal, a full server; Triton's
administrative APIs closed; TLS, mutual TLS and API keys."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from blip_bench.processes import decoder_counters
from blip_client import (
    CaptionClient,
    CaptionError,
    DeadlineExceededError,
    GenerationOptions,
    ResourceExhaustedError,
    UnavailableError,
)
from blip_server import procfs
from support import images, reference
from support.serve import ServeProcess, wait_gone

KINDS = images.kinds(seed=81)
HEAVY = GenerationOptions(num_beams=8, max_new_tokens=48, min_new_tokens=48)


def _status(address: str, **credentials) -> int | None:
    channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(**credentials)) if credentials
               else grpc.insecure_channel(address))
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="blip.caption.v1.CaptionService"), timeout=3)
        except grpc.RpcError:
            return None
    return answer.status


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def served(repositories, checkpoints, tmp_path_factory):
    # No response cache: the same image again must reach the models (the faults are theirs).
    serve = ServeProcess("--model", str(repositories["standard"]), "--health-interval", "0.5",
                         "--response-cache-mb", "0", cache=tmp_path_factory.mktemp("cache"))
    serve.wait_ready()
    serve.checkpoint = str(checkpoints["standard"])
    yield serve
    code, log = serve.stop()
    assert code == 0, log


def _stub_of(serve: ServeProcess, model: str) -> int:
    (triton,) = serve.children()
    return next(pid for pid, command in procfs.children(triton).items() if f"/{model}/1/model.py" in command)


@pytest.mark.parametrize("fault", ["stub preprocess", "stub vision_encoder", "stub text_decoder",
                                   "SIGSTOP tritonserver"])
def test_a_fault_is_detected_waited_out_and_repaired(served, fault):
    expected = reference.caption(served.checkpoint, KINDS["png"])[0][0]
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    # No retries of the SDK's: what the caller gets is the gateway's own doing.
    with CaptionClient(served.address, retry=None, timeout=120) as client:
        assert client.caption(KINDS["png"]).text == expected
        (triton,) = served.children()
        regions = {word for command in procfs.children(triton).values() for word in command.split()
                   if word.startswith("triton_python_backend_shm_region_")}
        assert regions
        if fault == "SIGSTOP tritonserver":
            os.kill(triton, signal.SIGSTOP)
        else:
            os.kill(_stub_of(served, fault.split()[1]), signal.SIGKILL)
        _wait_for(lambda: _status(served.address) == NOT_SERVING, 60, "health says NOT_SERVING")
        # During the outage: the call waits for the restart and gets its caption, never UNAVAILABLE or INTERNAL.
        assert client.caption(KINDS["png"]).text == expected
        _wait_for(lambda: _status(served.address) == SERVING, 60, "health says SERVING again")
    log = served.log()
    assert ("died" if fault.startswith("stub") else "hung or stopped") in log and "Triton is ready again" in log
    assert wait_gone(triton, timeout=10), "the old Triton's processes outlived the restart"
    assert not [r for r in regions if (Path("/dev/shm") / r).exists()], "the old Triton's shared memory was left"


def test_under_load_with_the_sdks_defaults_restarts_of_triton_and_of_each_stub_lose_no_call(repositories, checkpoints,
                                                                                             tmp_path, monkeypatch):
    """tritonserver, then the stub of each model, killed with SIGKILL under load: every call ends with its caption
    (those in flight at the kill are sent again once Triton is back, those arriving meanwhile wait for it), none
    UNAVAILABLE; a call whose deadline is shorter than the outage ends DEADLINE_EXCEEDED."""
    # Each decode step sleeps (the decoder's test-only knob), so calls are in Triton when each fault strikes.
    monkeypatch.setenv("BLIP_TEST_STEP_DELAY_SECONDS", "0.05")
    serve = ServeProcess("--model", str(repositories["standard"]), "--health-interval", "0.5",
                         "--response-cache-mb", "0", cache=tmp_path)
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    used = ["png", "jpeg", "webp", "bmp"]
    expected = {kind: reference.caption(str(checkpoints["standard"]), KINDS[kind])[0][0] for kind in used}
    outcomes: list[tuple[str, object]] = []
    stop = threading.Event()

    def load(offset: int) -> None:
        with CaptionClient(serve.address) as client:  # the SDK's defaults: its timeout and retry policy
            i = offset
            while not stop.is_set():
                kind = used[i % len(used)]
                try:
                    outcomes.append((kind, client.caption(KINDS[kind]).text))
                except CaptionError as error:
                    outcomes.append((kind, error))
                i += 1

    workers = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    short = []
    try:
        serve.wait_ready()
        for worker in workers:
            worker.start()
        for fault in ["tritonserver", "preprocess", "vision_encoder", "text_decoder"]:
            (triton,) = serve.children()
            before = len(outcomes)
            steps = decoder_counters(serve.ports["metrics"])["steps"]
            _wait_for(lambda before=before, steps=steps: len(outcomes) >= before + 4
                      and decoder_counters(serve.ports["metrics"])["steps"] > steps, 120,
                      f"calls are answered and decoded before killing {fault}")
            os.kill(triton if fault == "tritonserver" else _stub_of(serve, fault), signal.SIGKILL)
            _wait_for(lambda: _status(serve.address) == NOT_SERVING, 60, f"the death of {fault} is noticed")
            with CaptionClient(serve.address) as client:  # a deadline shorter than any restart of Triton
                try:
                    short.append(client.caption(KINDS["png"], timeout=0.5))
                except CaptionError as error:
                    short.append(error)
            _wait_for(lambda: _status(serve.address) == SERVING, 120, f"Triton is back after the death of {fault}")
            restarted = len(outcomes)
            _wait_for(lambda restarted=restarted: len(outcomes) >= restarted + 4, 120,
                      f"calls are answered after the death of {fault}")
    finally:
        stop.set()
        for worker in workers:
            worker.join(150)
        metrics = serve.metrics() if serve.process.poll() is None else {}
        code, log = serve.stop()
    assert not any(worker.is_alive() for worker in workers), "a call was never answered"
    failed = [(kind, outcome) for kind, outcome in outcomes if not isinstance(outcome, str)]
    assert not failed, failed[:5]
    wrong = [(kind, text) for kind, text in outcomes if text != expected[kind]]
    assert not wrong, wrong[:5]
    assert all(isinstance(call, DeadlineExceededError) for call in short), short
    assert not metrics.get(("blip_gateway_requests_total",
                            (("code", "UNAVAILABLE"), ("method", "Caption"), ("model", "standard")))), \
        "the gateway answered UNAVAILABLE (the SDK retried it)"
    assert metrics.get(("blip_gateway_requests_total",
                        (("code", "DEADLINE_EXCEEDED"), ("method", "Caption"), ("model", "standard")))) == 4
    assert code == 0, log
    assert log.count("Triton is ready again") == 4, log


def test_triton_administrative_apis_are_closed_and_serving_apis_open(servers):
    client = servers("standard").client()
    assert client.is_server_ready() and client.is_model_ready("blip_caption")
    assert client.get_model_config("preprocess").config.name == "preprocess"
    assert client.get_inference_statistics("blip_caption") is not None
    for closed in (client.get_model_repository_index, lambda: client.unload_model("text_decoder"),
                   lambda: client.load_model("text_decoder"), client.get_system_shared_memory_status,
                   client.get_trace_settings, client.get_log_settings):
        with pytest.raises(InferenceServerException, match="restricted|admin-key"):
            closed()
    assert client.is_model_ready("text_decoder")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server, client = ca.issue_cert("127.0.0.1"), ca.issue_cert("client@example.com")
    paths = {name: root / f"{name}.pem" for name in ("ca", "cert", "key", "client_cert", "client_key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client_cert"]))
    client.private_key_pem.write_to_path(str(paths["client_key"]))
    return paths


def test_mutual_tls_api_keys_a_full_server_and_sigterm_under_load(repositories, checkpoints, pki, tmp_path):
    serve = ServeProcess("--model", str(repositories["standard"]), "--tls-cert", str(pki["cert"]),
                         "--tls-key", str(pki["key"]), "--tls-client-ca", str(pki["ca"]), "--api-keys", "k1",
                         "--max-concurrent-requests", "4", "--shutdown-grace", "60", cache=tmp_path)
    tls = dict(tls_ca=pki["ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"])
    expected = reference.caption(str(checkpoints["standard"]), KINDS["jpeg"])[0][0]
    expected_4_beams = reference.caption(str(checkpoints["standard"]), KINDS["jpeg"], num_beams=4)[0][0]
    try:
        serve.wait_ready()
        assert _status(serve.address, root_certificates=pki["ca"].read_bytes(),
                       private_key=pki["client_key"].read_bytes(),
                       certificate_chain=pki["client_cert"].read_bytes()) == health_pb2.HealthCheckResponse.SERVING
        with CaptionClient(serve.address, api_key="k1", **tls) as client:
            assert client.caption(KINDS["jpeg"]).text == expected
        with (
            CaptionClient(serve.address, api_key="k1", tls_ca=pki["ca"], retry=None, timeout=5) as no_cert,
            pytest.raises(UnavailableError),
        ):
            no_cert.caption(KINDS["jpeg"])

        # Full: more heavy calls at once than --max-concurrent-requests; the rest are refused, not queued.
        with CaptionClient(serve.address, api_key="k1", retry=None, **tls) as client:
            outcomes, threads = [], []
            for _ in range(8):
                def call():
                    try:
                        outcomes.append(client.caption(KINDS["jpeg"], options=HEAVY, timeout=120))
                    except CaptionError as error:
                        outcomes.append(error)
                threads.append(threading.Thread(target=call))
                threads[-1].start()
            for thread in threads:
                thread.join(180)
        refused = [o for o in outcomes if isinstance(o, ResourceExhaustedError)]
        assert len(outcomes) == 8 and refused and len(refused) <= 4
        assert all(isinstance(o, ResourceExhaustedError) or o.text for o in outcomes)

        # SIGTERM while calls are in flight: every call is answered, in-flight ones with their captions, the others
        # UNAVAILABLE. With the SDK's default policy: a call that reaches the gateway just as it begins to stop can be
        # cancelled by gRPC's server before it runs (a bare CANCELLED, seen once under a full suite's load with
        # retry=None); the SDK sends it again, and it is then refused, UNAVAILABLE.
        answered, started, stop = [], [], threading.Event()

        def load():
            with CaptionClient(serve.address, api_key="k1", timeout=120, **tls) as client:
                while not stop.is_set():
                    started.append(1)
                    try:
                        answered.append(client.caption(KINDS["jpeg"], options=GenerationOptions(num_beams=4)).text)
                    except CaptionError as error:
                        answered.append(error)
        workers = [threading.Thread(target=load) for _ in range(3)]
        for worker in workers:
            worker.start()
        _wait_for(lambda: len(answered) >= 6, 120, "calls are flowing")
        (triton,) = serve.children()
        serve.process.send_signal(signal.SIGTERM)
        code = serve.process.wait(timeout=120)
        stop.set()
        for worker in workers:
            worker.join(120)
        assert not any(worker.is_alive() for worker in workers), "a call was never answered"
        assert len(answered) == len(started)
        assert all(a == expected_4_beams or isinstance(a, UnavailableError) for a in answered), \
            [a for a in answered if a != expected_4_beams][:5]
        assert code == 0, serve.log()
        assert not procfs.group_members(triton), "Triton or a stub outlived blip-serve"
    finally:
        serve.stop()


def test_a_second_signal_kills_triton_and_blip_serve_still_waits_for_every_stub(repositories, tmp_path,
                                                                                   monkeypatch):
    # The decoder sleeps a second before each step (its test-only knob): HEAVY's call decodes for 48 s and more,
    # so it is in flight at both signals on any machine.
    monkeypatch.setenv("BLIP_TEST_STEP_DELAY_SECONDS", "1")
    serve = ServeProcess("--model", str(repositories["standard"]), "--shutdown-grace", "60", cache=tmp_path)
    serve.wait_ready()
    (triton,) = serve.children()
    stubs = procfs.children(triton)
    assert len(stubs) >= 3
    outcome = []
    slow = threading.Thread(target=lambda: outcome.append(_heavy_call(serve.address)))
    slow.start()
    _wait_for(lambda: decoder_counters(serve.ports["metrics"])["steps"] > 0, 60, "the call is being decoded")
    serve.process.send_signal(signal.SIGTERM)
    _wait_for(lambda: "blip-serve: stopping" in serve.log(), 60,
              "blip-serve stops, giving the call in flight its grace")
    serve.process.send_signal(signal.SIGINT)
    code = serve.process.wait(timeout=60)
    assert not procfs.group_members(triton), "blip-serve exited before Triton and its stubs"
    slow.join(60)
    assert code in (0, 130), serve.log()
    assert "second signal: killing Triton now" in serve.log()
    assert isinstance(outcome[0], UnavailableError), outcome  # Triton was killed under it, not left to finish


def _heavy_call(address: str) -> object:
    """HEAVY's caption, or the CaptionError it ends with."""
    with CaptionClient(address, retry=None, timeout=120) as client:
        try:
            return client.caption(KINDS["jpeg"], options=HEAVY)
        except CaptionError as error:
            return error
