"""The Triton replicas behind one gateway: which are up, which one takes the next call, one retry elsewhere.

Endpoints are `HOST:PORT`, or `dns:///NAME:PORT` for every address NAME resolves to (a Kubernetes headless
Service, a Compose service scaled to N); names are resolved again every `dns_refresh` seconds, so replicas that
come and go are picked up. A replica that leaves the answer (a scale-down, a rollout, a pod that fails readiness)
is drained: it takes no new call at once, its calls in flight may go on for up to `drain_grace` seconds, and its
channel is closed as soon as they have ended, or at the end of the grace (cancelling what is still in flight; such
a call is retried once elsewhere, as below). Resolved again while draining, it is back in service on the same
channel. Every replica's readiness (the `blip_caption` ensemble ready) is checked every `health_interval` seconds
with a timeout: a dead or hung replica is out within seconds, and back once it answers ready. A replica can also be
suspended (blip-serve does while it restarts its Triton): it stays out until resumed. Calls go to the up replica
with the fewest calls in flight, ties taken in turn.

Calls wait out outages, as gRPC's wait-for-ready does: while no replica is up, a call waits for one, up to its
deadline and `max_wait` seconds in all. A call that fails with UNAVAILABLE before any result (or whose replica
lost a Python-backend stub) takes its replica out at once and is sent again (captions are idempotent): at once to
another replica that is up, else once one is up again (its own, restarted), within the same bounds and at most
`max_sends` times in all, so that a request that itself brings its server down is not sent for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import tritonclient.grpc.aio as triton_aio  # type: ignore[import-untyped]
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from blip_server import ensemble
from blip_server.gateway.status_mapping import triton_unavailable

log = logging.getLogger("blip-serve.gateway")
T = TypeVar("T")

DNS_SCHEME = "dns:///"

# The channel to each replica. gRPC backs off exponentially (up to 2 minutes) after failed connection attempts,
# and a call made meanwhile fails at once: while a replica starts or restarts, retry every quarter second instead
# (a refused connection costs next to nothing), so it serves as soon as it is ready (with 1 s, the gateway took up
# to 0.9 s to reach a restarted Triton that was ready).
TRITON_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 250),
]


# How many times one call may be sent (the first time included) when its replicas fail under it.
MAX_SENDS = 4


class NoReplica(Exception):
    """No Triton replica was up to take a call within its bounds (its deadline or the pool's `max_wait`)."""


@dataclass(eq=False)
class Replica:
    endpoint: str
    client: triton_aio.InferenceServerClient
    name: str = ""  # the DNS name it was resolved from, if any
    up: bool = False
    suspended: bool = False
    in_flight: int = 0
    draining: bool = False  # left the resolver's answer: takes no new call; closed once idle or after the grace
    closed: bool = False  # its channel is closed (by a drain or the pool's close)
    _drain: asyncio.Task[None] | None = field(default=None, init=False, repr=False)  # the drain in progress, if any
    _idle: asyncio.Event | None = field(default=None, init=False, repr=False)  # set when a draining one is idle

    def call_ended(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

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


async def resolve(host: str, port: int) -> list[str]:
    """The endpoints (`ADDRESS:PORT`) that `host` resolves to now; OSError when it does not resolve."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # IPv4 and IPv6 socket addresses start with the address as a str (typeshed's sockaddr also allows an int).
    return [_join(address, port) for address in sorted({str(info[4][0]) for info in infos})]


def _task_cancelled() -> bool:
    """Whether the running task is being cancelled (Python 3.11+; on 3.10, always assumed)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


@dataclass
class ReplicaPool:
    """The replicas of `targets`. Call `refresh()` to learn which are up (`Gateway.follow_triton` does, through
    `Captioner.ready`, every `--health-interval` seconds).

    A call waits for an up replica up to `max_wait` seconds in all (and its own deadline); see the module.

    `on_replica_up(endpoint, up)` follows every health check of a replica in service; `on_replica_gone(endpoint)`
    is called when a replica leaves the resolver's answer, as its drain starts (a draining replica is no longer a
    member: it takes no call, so it is neither up nor down; if it is resolved again, `on_replica_up` reports it
    again). `resolver(host, port)` gives the endpoints a dns:/// name stands for (default: getaddrinfo; tests
    replace it).
    """

    targets: tuple[str, ...]
    health_timeout: float = 2.0
    dns_refresh: float = 5.0
    drain_grace: float = 60.0
    max_wait: float = 60.0
    max_sends: int = MAX_SENDS
    on_replica_up: Callable[[str, bool], None] = lambda endpoint, up: None
    on_replica_gone: Callable[[str], None] = lambda endpoint: None
    resolver: Callable[[str, int], Awaitable[Iterable[str]]] = resolve
    replicas: dict[str, Replica] = field(default_factory=dict)
    draining: dict[str, Replica] = field(default_factory=dict)  # left the answer, calls still in flight

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("at least one Triton endpoint is needed")
        if self.drain_grace < 0:
            raise ValueError("the drain grace cannot be negative")
        if self.max_wait < 0:
            raise ValueError("the maximum wait for a ready replica cannot be negative")
        if self.max_sends < 1:
            raise ValueError("a call must be sent at least once")
        self._parsed = [parse_endpoint(t) for t in self.targets]
        self._turn = itertools.count()
        self._resolved_at: float | None = None
        self._drains: set[asyncio.Task[None]] = set()  # every drain task not finished yet (closing ones included)
        self._waiting: set[asyncio.Future[None]] = set()  # calls waiting for a replica to be up
        self._stopping = False

    # -- membership ------------------------------------------------------------------------------------------

    async def _endpoints(self) -> dict[str, str]:
        """Every endpoint wanted now -> the DNS name it comes from ("" for a literal HOST:PORT)."""
        endpoints: dict[str, str] = {}
        for host, port, resolved in self._parsed:
            if not resolved:
                endpoints.setdefault(_join(host, port), "")
                continue
            try:
                answer = list(await self.resolver(host, port))
            except OSError as exc:
                log.warning("cannot resolve %s: %s", host, exc)
                # Keep what the name resolved to before: a DNS hiccup is no reason to drop replicas.
                for endpoint, replica in self.replicas.items():
                    if replica.name == host:
                        endpoints.setdefault(endpoint, host)
                continue
            for endpoint in answer:
                endpoints.setdefault(endpoint, host)
        return endpoints

    async def _update_members(self) -> None:
        loop = asyncio.get_running_loop()
        if self._resolved_at is not None and loop.time() - self._resolved_at < self.dns_refresh:
            return
        self._resolved_at = loop.time()
        wanted = await self._endpoints()
        for endpoint, name in wanted.items():
            if endpoint in self.replicas:
                continue
            replica = self.draining.pop(endpoint, None)
            if replica is not None:  # resolved again while draining: back in service, on the same channel
                self._end_drain(replica)
                log.info("Triton replica %s resolved again: back in service (it was draining, %d calls in flight)",
                         endpoint, replica.in_flight)
            else:
                client = triton_aio.InferenceServerClient(endpoint, channel_args=TRITON_CHANNEL_ARGS)
                replica = Replica(endpoint, client, name)
                log.info("Triton replica %s added", endpoint)
            self.replicas[endpoint] = replica
        for endpoint in [e for e in self.replicas if e not in wanted]:
            self._start_drain(self.replicas.pop(endpoint))

    # -- draining --------------------------------------------------------------------------------------------

    def _start_drain(self, replica: Replica) -> None:
        """Take `replica` out of service now; close its channel once its calls end, or after `drain_grace`.
        Nothing here waits: the drain is a task of its own."""
        replica.draining, replica.up = True, False
        replica._idle = asyncio.Event()
        if replica.in_flight == 0:
            replica._idle.set()
        self.draining[replica.endpoint] = replica
        self.on_replica_gone(replica.endpoint)
        log.info("Triton replica %s removed (no longer resolved): draining its %d calls in flight (for up to %g s)",
                 replica.endpoint, replica.in_flight, self.drain_grace)
        replica._drain = asyncio.create_task(self._drain(replica, replica._idle))
        self._drains.add(replica._drain)
        replica._drain.add_done_callback(self._drains.discard)

    def _end_drain(self, replica: Replica) -> None:
        """`replica` is back in service: its drain task stops without closing anything."""
        drain, replica._drain, replica._idle = replica._drain, None, None
        replica.draining = False
        if drain is not None:
            drain.cancel()

    async def _drain(self, replica: Replica, idle: asyncio.Event) -> None:
        with contextlib.suppress(asyncio.TimeoutError):  # the grace is over: close with calls in flight
            await asyncio.wait_for(idle.wait(), self.drain_grace)
        if replica._drain is not asyncio.current_task():
            return  # resolved again meanwhile (a cancellation that came too late to interrupt the wait)
        # From here on nothing can bring it back: it leaves `draining` before the first await, so a name that
        # resolves to it again gets a new channel.
        if self.draining.get(replica.endpoint) is replica:
            del self.draining[replica.endpoint]
        if replica.in_flight == 0:
            log.info("Triton replica %s drained: its calls ended; channel closed", replica.endpoint)
        await self._close(replica, f"the drain grace of {self.drain_grace:g} s is over")

    @staticmethod
    async def _close(replica: Replica, why: str) -> None:
        """Close `replica`'s channel; calls still in flight on it are cancelled (and `call` retries them)."""
        replica.closed, replica.up = True, False
        if replica.in_flight:
            log.warning("Triton replica %s: %s; closing its channel cancels its %d calls still in flight",
                        replica.endpoint, why, replica.in_flight)
        await replica.client.close()

    # -- health ----------------------------------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Resolve names (every `dns_refresh` s) and check every replica once; True when any is up."""
        await self._update_members()
        replicas = list(self.replicas.values())
        states = await asyncio.gather(*(r.check(self.health_timeout) for r in replicas))
        for replica, up in zip(replicas, states, strict=True):
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

    def _set(self, replica: Replica, up: bool, why: str) -> None:
        if replica.draining or replica.closed:  # no longer a member: on_replica_gone was its last report
            replica.up = False
            return
        if up != replica.up:
            log.info("Triton replica %s is %s%s", replica.endpoint, "up" if up else "down", f" ({why})" if why else "")
        replica.up = up
        self.on_replica_up(replica.endpoint, up)
        if up:
            self._wake()

    def _wake(self) -> None:
        """Let every call waiting for an up replica look again."""
        waiting, self._waiting = self._waiting, set()
        for future in waiting:
            if not future.done():
                future.set_result(None)

    async def _wait_for_up(self, timeout: float) -> bool:
        """Wait until a replica is up (True), or `timeout` seconds (False)."""
        if self.ready:
            return True
        if timeout <= 0 or self._stopping:
            return False
        future = asyncio.get_running_loop().create_future()
        self._waiting.add(future)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(future, timeout)  # cancels the future when the time is up
        self._waiting.discard(future)
        return self.ready

    @property
    def ready(self) -> bool:
        return any(r.up for r in self.replicas.values())

    # -- calls -----------------------------------------------------------------------------------------------

    def _pick(self) -> Replica | None:
        up = [r for r in self.replicas.values() if r.up]
        if not up:
            return None
        fewest = min(r.in_flight for r in up)
        candidates = [r for r in up if r.in_flight == fewest]
        return candidates[next(self._turn) % len(candidates)]

    async def call(self, request: Callable[[triton_aio.InferenceServerClient], Awaitable[T]],
                   timeout: float | None = None) -> T:
        """`request` on an up replica, waiting for one while none is up (up to `timeout` seconds, None: no deadline,
        and `max_wait` in all). On UNAVAILABLE (or a dead stub) the replica is taken out and the call sent again,
        to another up replica or, waiting, to the first once it is up again; at most `max_sends` sends. Raises
        NoReplica when no replica was up in time, or the last InferenceServerException once the sends are spent."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        waited = 0.0
        sends = 0
        last_error: InferenceServerException | None = None
        while True:
            replica = self._pick()
            if replica is None:
                if self._stopping and last_error is not None:
                    raise last_error
                bound = self.max_wait - waited
                if deadline is not None:
                    bound = min(bound, deadline - loop.time())
                began = loop.time()
                up = await self._wait_for_up(bound)
                waited += loop.time() - began
                if up:
                    continue
                why = "the gateway is stopping" if self._stopping else (
                    f"no Triton replica was ready within {waited:.1f} s"
                    + (f" (the call's deadline; the most a call waits is {self.max_wait:g} s)"
                       if deadline is not None and deadline - loop.time() <= 0 else ""))
                if last_error is not None:
                    why += f"; the last failure: {last_error.message()}"
                raise NoReplica(why)
            sends += 1
            replica.in_flight += 1
            try:
                return await request(replica.client)
            except InferenceServerException as exc:
                if not triton_unavailable(exc) or sends >= self.max_sends:
                    raise
                self._set(replica, False, f"a call failed: {exc.message()}")
                last_error = exc
            except asyncio.CancelledError:
                # Closing a channel cancels its calls: the call, not its caller, was cancelled. Such a call (a drain
                # whose grace ran out) had no answer and may go to another replica, like one that was UNAVAILABLE.
                if not replica.closed or _task_cancelled():
                    raise
                last_error = InferenceServerException(
                    f"the channel to Triton replica {replica.endpoint} was closed during the call (it left the "
                    "resolver's answer and the call outlasted the drain grace, or the gateway is stopping)",
                    "StatusCode.UNAVAILABLE")
                if sends >= self.max_sends or self._stopping:
                    raise last_error from None
            finally:
                replica.call_ended()

    def stop_waiting(self) -> None:
        """The gateway is stopping: no call waits for a replica from now on (a call failing on one ends with its
        failure; one waiting ends with NoReplica), so that shutdown is not held up by a restart that will not come."""
        self._stopping = True
        self._wake()

    async def close(self) -> None:
        """Close every channel, draining replicas' included (their drains end now, cancelling what is in flight);
        calls waiting for a replica end (NoReplica)."""
        self.stop_waiting()
        draining = list(self.draining.values())
        for replica in draining:
            if replica._drain is not None:
                replica._drain.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)  # closing ones finish closing
        for replica in [*self.replicas.values(), *draining]:
            if not replica.closed:
                await self._close(replica, "the gateway is stopping")
        self.replicas.clear()
        self.draining.clear()
