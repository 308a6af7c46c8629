"""One blip-gateway over two real Triton replicas: a replica killed under load loses no call, and gets traffic
again once it is back (its own statistics show it serving); a replica that leaves the DNS answer under load is
drained (its calls in flight finish, it gets no new one, its channel closes); the gateway's metrics say which
replicas are up."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import threading
import time

import pytest
import tritonclient.grpc as grpcclient

from blip_client import CaptionClient, GenerationOptions, InvalidArgumentError
from blip_server import ensemble
from blip_server.gateway.captioner import Captioner, GatewayLimits
from blip_server.gateway.replicas import ReplicaPool
from support import images, reference
from support.gateway import BackgroundGateway
from support.serve import GatewayProcess

KINDS = images.kinds(seed=61)
USED = ["jpeg", "png", "webp", "bmp"]
OPTIONS = GenerationOptions(num_beams=2)


def _replica_up(gateway: GatewayProcess, endpoint: str) -> float | None:
    return gateway.metrics().get(("blip_gateway_triton_replica_up", (("endpoint", endpoint),)))


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


class CountingPool(ReplicaPool):
    """A ReplicaPool that counts the calls each replica answered (by its client), as Triton's statistics do."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.answered: collections.Counter[int] = collections.Counter()  # id(replica.client) -> calls answered

    def served(self, replica) -> int:
        return self.answered[id(replica.client)]

    async def call(self, request, timeout=None):
        async def counted(client):
            result = await request(client)
            self.answered[id(client)] += 1
            return result

        return await super().call(counted, timeout)


def _served(triton) -> int:
    """Captions the replica answered: deterministic requests go to the cached ensemble, unseeded samples to the
    other."""
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton.options.grpc_port}")
    return sum(int(client.get_inference_statistics(model, as_json=True)["model_stats"][0].get("inference_count", 0))
               for model in (ensemble.MODEL, ensemble.CACHED_MODEL))


class Load:
    """`clients` threads captioning in a loop until stopped; every outcome is kept."""

    def __init__(self, address: str, clients: int = 4):
        self.outcomes: list[tuple[str, object]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(address, i)) for i in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self, address: str, offset: int) -> None:
        with CaptionClient(address, timeout=60) as client:
            i = offset
            while not self._stop.is_set():
                kind = USED[i % len(USED)]
                try:
                    self.outcomes.append((kind, client.caption(KINDS[kind], options=OPTIONS).text))
                except Exception as exc:  # noqa: BLE001 - every failure is a finding
                    self.outcomes.append((kind, exc))
                i += 1

    def count(self) -> int:
        return len(self.outcomes)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)


def test_a_replica_killed_under_load_loses_no_call_and_serves_again_once_back(repositories, checkpoints, start_triton):
    repository = repositories["standard"]
    # Both replicas share this machine's cores, busy at once: their decoders' OpenMP threads must sleep when idle,
    # not spin (docs/architecture.md, "The CPU cores"); spinning, the 20 calls below took 23 s instead of 2.
    options = {"environment": {"OMP_WAIT_POLICY": "PASSIVE"}}
    first, second = start_triton(repository, **options), start_triton(repository, **options)
    endpoints = [f"127.0.0.1:{t.options.grpc_port}" for t in (first, second)]
    expected = {kind: reference.caption(str(checkpoints["standard"]), KINDS[kind], num_beams=2)[0][0] for kind in USED}
    gateway = GatewayProcess("--triton", endpoints[0], "--triton", endpoints[1], "--health-interval", "0.5",
                             "--health-timeout", "1")
    load = None
    try:
        gateway.wait_ready(timeout=60)
        _wait_for(lambda: all(_replica_up(gateway, e) == 1 for e in endpoints), 30, "both replicas are up")
        load = Load(gateway.address)
        _wait_for(lambda: load.count() >= 20 and min(_served(first), _served(second)) > 0, 60,
                  "both replicas served calls")

        os.killpg(first.pid, signal.SIGKILL)  # tritonserver and its Python-backend stubs, mid-load
        killed_at = load.count()
        _wait_for(lambda: _replica_up(gateway, endpoints[0]) == 0, 10, "the gateway took the dead replica out")
        _wait_for(lambda: load.count() >= killed_at + 20, 60, "calls went on")

        first.stop()
        first.cleanup()
        restarted = start_triton(repository, grpc_port=first.options.grpc_port, http_port=first.options.http_port,
                                 metrics_port=first.options.metrics_port, **options)
        _wait_for(lambda: _replica_up(gateway, endpoints[0]) == 1, 30, "the gateway took the replica back")
        _wait_for(lambda: _served(restarted) >= 10, 60, "the restarted replica served calls")
    finally:
        if load is not None:
            load.stop()
        code, log = gateway.stop()
    failures = [(kind, outcome) for kind, outcome in load.outcomes if isinstance(outcome, Exception)]
    assert not failures, failures[:5]
    wrong = [(kind, text) for kind, text in load.outcomes if text != expected[kind]]
    assert not wrong, wrong[:5]
    assert code == 0, log
    assert f"Triton replica {endpoints[0]} is down" in log and f"Triton replica {endpoints[0]} is up" in log


def test_blip_serve_reports_metrics_of_calls_and_its_replica(service):
    with CaptionClient(service.address) as client:
        before = service.metrics()
        client.caption(KINDS["jpeg"])
        with pytest.raises(InvalidArgumentError):
            client.caption(b"not an image")
        after = service.metrics()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    model = "standard"  # the fixture serves a bare --model path, named after its folder
    assert delta("blip_gateway_requests_total", method="Caption", code="OK", model=model) == 1
    assert delta("blip_gateway_requests_total", method="Caption", code="INVALID_ARGUMENT", model=model) == 1
    assert delta("blip_gateway_request_duration_seconds_count", method="Caption", model=model) == 2
    assert after[("blip_gateway_triton_replica_up", (("endpoint", f"127.0.0.1:{service.ports['grpc']}"),))] == 1
    assert after[("blip_gateway_in_flight_requests", ())] == 0


def test_a_replica_that_leaves_the_dns_answer_under_load_is_drained(repositories, checkpoints, start_triton, caplog):
    """The gateway runs in process so that the test decides what its dns:/// name resolves to (the pool's resolver;
    in production, getaddrinfo). The first replica leaves the answer while calls are in flight on it: no call
    fails, those calls complete on it, it gets no new call, and its channel is closed once they are done."""
    repository = repositories["standard"]
    options = {"environment": {"OMP_WAIT_POLICY": "PASSIVE"}}  # see the test above
    first, second = start_triton(repository, **options), start_triton(repository, **options)
    endpoints = [f"127.0.0.1:{t.options.grpc_port}" for t in (first, second)]
    expected = {kind: reference.caption(str(checkpoints["standard"]), KINDS[kind], num_beams=2)[0][0] for kind in USED}

    answer = list(endpoints)
    leave = threading.Event()  # set: the first replica leaves the answer at a resolution that finds calls on it
    removal = {}  # the first replica as it left: the Replica, its calls in flight and its calls answered then

    async def resolver(host, port):
        assert (host, port) == ("blip-triton", 8001)
        first_replica = pool.replicas.get(endpoints[0])
        if leave.is_set() and first_replica is not None and first_replica.in_flight > 0:
            answer.remove(endpoints[0])
        return list(answer)

    def gone(endpoint):  # called as the drain starts, in the same step of the event loop
        replica = pool.draining[endpoint]
        removal.update(replica=replica, in_flight=replica.in_flight, served=pool.served(replica))
        metrics.forget_replica(endpoint)

    pool = CountingPool(("dns:///blip-triton:8001",), health_timeout=1, dns_refresh=0.1, drain_grace=60,
                       resolver=resolver, on_replica_gone=gone)
    gateway = BackgroundGateway(Captioner(pool, GatewayLimits()))
    metrics = gateway.gateway.metrics
    pool.on_replica_up = metrics.set_replica

    async def follow():
        return asyncio.create_task(gateway.gateway.follow_triton(0.1))

    health = gateway.call(follow())
    load = None
    try:
        with caplog.at_level("INFO", logger="blip-serve.gateway"):
            _wait_for(lambda: all(e in pool.replicas and pool.replicas[e].up for e in endpoints), 30,
                      "both replicas are up")
            # The model's description is read once (through a replica, counted by the pool), before the load, so
            # that from here on the pool's count for the replica is of captions only, as Triton's statistics are.
            gateway.call(gateway.gateway.captioner.describe())
            served_before = pool.served(pool.replicas[endpoints[0]])
            assert _served(first) == 0
            load = Load(gateway.address)
            _wait_for(lambda: load.count() >= 20 and min(_served(first), _served(second)) > 0, 60,
                      "both replicas served calls")
            leave.set()
            _wait_for(lambda: removal, 30, "the first replica left the answer with calls in flight")
            replica = removal["replica"]
            _wait_for(lambda: replica.closed, 60, "the drained replica's channel is closed")
            closed_at, served_by_triton = load.count(), _served(first)
            _wait_for(lambda: load.count() >= closed_at + 20, 60, "calls went on")
            assert _served(first) == served_by_triton  # no call after the drain
            with pytest.raises(Exception, match="Channel is closed"):
                gateway.call(replica.client.is_model_ready("blip_caption"))
    finally:
        if load is not None:
            load.stop()
        health.cancel()
        gateway.stop()
    failures = [(kind, outcome) for kind, outcome in load.outcomes if isinstance(outcome, Exception)]
    assert not failures, failures[:5]
    wrong = [(kind, text) for kind, text in load.outcomes if text != expected[kind]]
    assert not wrong, wrong[:5]
    # The calls in flight at the removal were answered by it, and it got nothing more: Triton counted exactly them.
    assert removal["in_flight"] >= 1
    assert pool.served(replica) == removal["served"] + removal["in_flight"]
    assert _served(first) == pool.served(replica) - served_before
    assert endpoints[0] not in pool.replicas and pool.draining == {}
    assert metrics.registry.get_sample_value("blip_gateway_triton_replica_up", {"endpoint": endpoints[0]}) is None
    assert f"Triton replica {endpoints[0]} removed (no longer resolved): draining its" in caplog.text
    assert f"Triton replica {endpoints[0]} drained: its calls ended; channel closed" in caplog.text
    assert "cancels its" not in caplog.text
