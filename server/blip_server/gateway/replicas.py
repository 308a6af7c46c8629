"""The Triton replicas behind one gateway: which are up, which one takes the next call, one retry elsewhere.

Endpoints are `HOST:PORT`, or `dns:///NAME:PORT` for every address NAME resolves to (a Kubernetes headless
Service, a Compose service scaled to N); names are resolved again every `dns_refresh` seconds, so replicas that
come and go are picked up. Every replica's readiness (the `blip_caption` ensemble ready) is checked every
`health_interval` seconds with a timeout: a dead or hung replica is out within seconds, and back once it answers
ready. A call that fails with UNAVAILABLE before any result (or whose replica lost a Python-backend stub) takes
its replica out at once and is tried once more on another replica that is up (captions are idempotent). A
replica can also be suspended (blip-serve does while it restarts its Triton): it stays out until resumed. Calls go to the up replica with the fewest calls in
flight, ties taken in turn.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from blip_server import ensemble
from blip_server.gateway.errors import triton_unavailable

log = logging.getLogger("blip-serve.gateway")
T = TypeVar("T")

DNS_SCHEME = "dns:///"

# The channel to each replica. gRPC backs off exponentially (up to 2 minutes) after failed connection attempts,
# and a call made meanwhile fails at once: while a replica starts or restarts, retry within a second instead, so
# it serves as soon as it is ready.
TRITON_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class NoReplica(Exception):
    """No Triton replica is up to take a call."""


@dataclass(eq=False)
class Replica:
    endpoint: str
    client: triton_aio.InferenceServerClient
    name: str = ""  # the DNS name it was resolved from, if any
    up: bool = False
    suspended: bool = False
    in_flight: int = 0
    served: int = 0  # calls answered; for logs and tests

    async def check(self, timeout: float) -> bool:
        try:
            return bool(await asyncio.wait_for(self.client.is_model_ready(ensemble.MODEL), timeout))
        except (InferenceServerException, asyncio.TimeoutError, OSError):
            return False


def parse_endpoint(target: str) -> tuple[str, int, bool]:
    """`HOST:PORT` or `dns:///NAME:PORT` -> (host, port, resolve); raises ValueError for anything else."""
    resolve = target.startswith(DNS_SCHEME)
    address = target[len(DNS_SCHEME):] if resolve else target
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"Triton endpoint {target!r} is not HOST:PORT or dns:///NAME:PORT")
    return host, int(port), resolve


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class ReplicaPool:
    """The replicas of `targets`. Call `refresh()` (or run `watch()`) to learn which are up."""

    targets: tuple[str, ...]
    health_timeout: float = 2.0
    dns_refresh: float = 5.0
    on_replica_up: Callable[[str, bool], None] = lambda endpoint, up: None
    on_replica_gone: Callable[[str], None] = lambda endpoint: None
    replicas: dict[str, Replica] = field(default_factory=dict)

    def __post_init__(self):
        if not self.targets:
            raise ValueError("at least one Triton endpoint is needed")
        self._parsed = [parse_endpoint(t) for t in self.targets]
        self._turn = itertools.count()
        self._resolved_at: float | None = None

    # -- membership ------------------------------------------------------------------------------------------

    async def _endpoints(self) -> dict[str, str]:
        """Every endpoint wanted now -> the DNS name it comes from ("" for a literal HOST:PORT)."""
        loop = asyncio.get_running_loop()
        endpoints: dict[str, str] = {}
        for host, port, resolve in self._parsed:
            if not resolve:
                endpoints.setdefault(_join(host, port), "")
                continue
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("cannot resolve %s: %s", host, exc)
                # Keep what the name resolved to before: a DNS hiccup is no reason to drop replicas.
                for endpoint, replica in self.replicas.items():
                    if replica.name == host:
                        endpoints.setdefault(endpoint, host)
                continue
            for address in sorted({info[4][0] for info in infos}):
                endpoints.setdefault(_join(address, port), host)
        return endpoints

    async def _update_members(self) -> None:
        loop = asyncio.get_running_loop()
        if self._resolved_at is not None and loop.time() - self._resolved_at < self.dns_refresh:
            return
        self._resolved_at = loop.time()
        wanted = await self._endpoints()
        for endpoint, name in wanted.items():
            if endpoint not in self.replicas:
                client = triton_aio.InferenceServerClient(endpoint, channel_args=TRITON_CHANNEL_ARGS)
                self.replicas[endpoint] = Replica(endpoint, client, name)
                log.info("Triton replica %s added", endpoint)
        for endpoint in [e for e in self.replicas if e not in wanted]:
            replica = self.replicas.pop(endpoint)
            log.info("Triton replica %s removed (no longer resolved)", endpoint)
            self.on_replica_gone(endpoint)
            await replica.client.close()

    # -- health ----------------------------------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Resolve names (every `dns_refresh` s) and check every replica once; True when any is up."""
        await self._update_members()
        replicas = list(self.replicas.values())
        states = await asyncio.gather(*(r.check(self.health_timeout) for r in replicas))
        for replica, up in zip(replicas, states):
            self._set(replica, up and not replica.suspended, "suspended" if replica.suspended else "not ready")
        return self.ready

    def suspend(self, endpoint: str, why: str) -> None:
        """Keep a replica out (its server is being restarted) until `resume`."""
        replica = self.replicas.get(endpoint)
        if replica is not None:
            replica.suspended = True
            self._set(replica, False, why)

    def resume(self, endpoint: str) -> None:
        replica = self.replicas.get(endpoint)
        if replica is not None:
            replica.suspended = False

    async def watch(self, interval: float, on_change: Callable[[bool], Awaitable[None]]) -> None:
        """Refresh every `interval` seconds and report readiness (any replica up) to `on_change`, until cancelled."""
        while True:
            await on_change(await self.refresh())
            await asyncio.sleep(interval)

    def _set(self, replica: Replica, up: bool, why: str) -> None:
        if up != replica.up:
            log.info("Triton replica %s is %s%s", replica.endpoint, "up" if up else "down", f" ({why})" if why else "")
        replica.up = up
        self.on_replica_up(replica.endpoint, up)

    @property
    def ready(self) -> bool:
        return any(r.up for r in self.replicas.values())

    # -- calls -----------------------------------------------------------------------------------------------

    def _pick(self, exclude: set[Replica]) -> Replica | None:
        up = [r for r in self.replicas.values() if r.up and r not in exclude]
        if not up:
            return None
        fewest = min(r.in_flight for r in up)
        candidates = [r for r in up if r.in_flight == fewest]
        return candidates[next(self._turn) % len(candidates)]

    async def call(self, request: Callable[[triton_aio.InferenceServerClient], Awaitable[T]]) -> T:
        """`request` on an up replica; on UNAVAILABLE, that replica is taken out and the call tried once more on
        another. Raises NoReplica when none is up, or the last InferenceServerException."""
        tried: set[Replica] = set()
        last_error: InferenceServerException | None = None
        while True:
            replica = self._pick(tried)
            if replica is None:
                if last_error is not None:
                    raise last_error
                raise NoReplica("no Triton replica is ready")
            tried.add(replica)
            replica.in_flight += 1
            try:
                result = await request(replica.client)
                replica.served += 1
                return result
            except InferenceServerException as exc:
                if not triton_unavailable(exc) or len(tried) >= 2:
                    raise
                self._set(replica, False, f"a call failed: {exc.message()}")
                last_error = exc
            finally:
                replica.in_flight -= 1

    async def close(self) -> None:
        for replica in self.replicas.values():
            await replica.client.close()
        self.replicas.clear()
