"""The gateway's replica pool with scripted Triton clients: endpoints, balancing, sending again on UNAVAILABLE,
waiting for a ready replica, health, DNS. (Real replicas being killed and restarted:
tests/integration/test_failover.py.)"""

from __future__ import annotations

import asyncio

import pytest
from tritonclient.utils import InferenceServerException

from blip_server.gateway.replicas import NoReplica, Replica, ReplicaPool, parse_endpoint


class ScriptedTriton:
    """Answers is_model_ready with `ready`; infer with the next scripted outcome (an exception or a value; HOLD:
    wait until `release()`, then answer its name). `close()` cancels the calls it holds, as closing a gRPC
    channel does (the awaiting call raises CancelledError; its task is not being cancelled)."""

    def __init__(self, name: str, outcomes=(), ready: bool = True):
        self.name = name
        self.outcomes = list(outcomes)
        self.ready = ready
        self.calls = 0
        self.closed = False
        self.held: list[asyncio.Future] = []

    async def is_model_ready(self, model):
        if isinstance(self.ready, BaseException):
            raise self.ready
        if self.ready == "hang":
            await asyncio.sleep(60)
        return self.ready

    async def infer(self):
        self.calls += 1
        outcome = self.outcomes.pop(0) if self.outcomes else self.name
        if outcome is HOLD:
            held = asyncio.get_running_loop().create_future()
            self.held.append(held)
            await held
            return self.name
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def release(self):
        for held in self.held:
            if not held.done():
                held.set_result(None)

    async def close(self):
        self.closed = True
        for held in self.held:
            held.cancel()


HOLD = object()


def unavailable():
    return InferenceServerException("Socket closed", "StatusCode.UNAVAILABLE")


def pool_of(*clients: ScriptedTriton, **kwargs) -> ReplicaPool:
    pool = ReplicaPool(tuple(f"{c.name}:8001" for c in clients), **kwargs)
    for client in clients:
        pool.replicas[f"{client.name}:8001"] = Replica(f"{client.name}:8001", client, up=True)
    pool._resolved_at = float("inf")  # membership is scripted: no resolution
    return pool


def call(pool):
    return asyncio.run(pool.call(lambda client: client.infer()))


@pytest.mark.parametrize("target, expected", [
    ("triton:8001", ("triton", 8001, False)),
    ("10.0.0.7:9001", ("10.0.0.7", 9001, False)),
    ("[::1]:8001", ("::1", 8001, False)),
    ("dns:///blip-triton.default.svc:8001", ("blip-triton.default.svc", 8001, True)),
])
def test_endpoints_are_host_port_or_dns_names(target, expected):
    assert parse_endpoint(target) == expected


@pytest.mark.parametrize("target", ["triton", "triton:", ":8001", "triton:http", "triton:0", "triton:70000", "dns:///x"])
def test_malformed_endpoints_are_refused(target):
    with pytest.raises(ValueError, match="is not HOST:PORT or dns:///NAME:PORT"):
        parse_endpoint(target)


def test_calls_are_spread_over_replicas_that_are_up():
    a, b, c = ScriptedTriton("a"), ScriptedTriton("b"), ScriptedTriton("c")
    pool = pool_of(a, b, c)
    pool.replicas["c:8001"].up = False
    answers = [call(pool) for _ in range(6)]
    assert sorted(answers) == ["a", "a", "a", "b", "b", "b"]
    assert c.calls == 0


def test_the_replica_with_fewest_calls_in_flight_takes_the_next():
    a, b = ScriptedTriton("a"), ScriptedTriton("b")
    pool = pool_of(a, b)
    pool.replicas["a:8001"].in_flight = 3
    assert [call(pool) for _ in range(3)] == ["b", "b", "b"]


def test_unavailable_is_retried_once_on_another_replica_which_takes_the_first_out():
    a, b = ScriptedTriton("a", [unavailable()]), ScriptedTriton("b")
    pool = pool_of(a, b)
    pool._turn = iter([0, 0, 0, 0])  # a first
    assert call(pool) == "b"  # a failed, b answered
    assert (a.calls, b.calls) == (1, 1)
    assert not pool.replicas["a:8001"].up and pool.replicas["b:8001"].up


def dead_stub():
    """What Triton 2.51 answers while a Python-backend stub of the ensemble is dead (see status_mapping.stub_died)."""
    return InferenceServerException("in ensemble 'blip_caption', Stub process 'text_decoder_0_0' is not healthy.",
                                    "StatusCode.INTERNAL")


def test_a_dead_stub_is_retried_once_on_another_replica_which_takes_the_first_out():
    a, b = ScriptedTriton("a", [dead_stub()]), ScriptedTriton("b")
    pool = pool_of(a, b)
    pool._turn = iter([0, 0, 0, 0])  # a first
    assert call(pool) == "b"
    assert (a.calls, b.calls) == (1, 1)
    assert not pool.replicas["a:8001"].up and pool.replicas["b:8001"].up


def test_other_internal_failures_are_not_retried():
    failed = InferenceServerException("in ensemble 'blip_caption', the decoder's step failed", "StatusCode.INTERNAL")
    a, b = ScriptedTriton("a", [failed]), ScriptedTriton("b", [failed])
    pool = pool_of(a, b)
    with pytest.raises(InferenceServerException, match="step failed"):
        call(pool)
    assert a.calls + b.calls == 1
    assert all(r.up for r in pool.replicas.values())


def test_a_call_is_sent_at_most_max_sends_times():
    a, b = ScriptedTriton("a", [unavailable()] * 5), ScriptedTriton("b", [unavailable()] * 5)
    pool = pool_of(a, b, max_sends=3)
    with pytest.raises(InferenceServerException, match="Socket closed"):
        asyncio.run(_call_bringing_replicas_back(pool))
    assert a.calls + b.calls == 3


async def _call_bringing_replicas_back(pool):
    """A call while a health check brings every replica back each time the call took one out."""
    async def checks():
        while True:
            await asyncio.sleep(0.01)
            for replica in pool.replicas.values():
                pool._set(replica, True, "")

    health = asyncio.create_task(checks())
    try:
        return await pool.call(lambda client: client.infer())
    finally:
        health.cancel()


def test_other_failures_are_not_retried():
    invalid = InferenceServerException("num_beams=0 is out of range", "StatusCode.INVALID_ARGUMENT")
    a, b = ScriptedTriton("a", [invalid]), ScriptedTriton("b", [invalid])
    pool = pool_of(a, b)
    with pytest.raises(InferenceServerException, match="out of range"):
        call(pool)
    assert a.calls + b.calls == 1
    assert all(r.up for r in pool.replicas.values())


def test_with_no_wait_a_lone_replica_that_fails_is_no_replica():
    a = ScriptedTriton("a", [unavailable()])
    pool = pool_of(a, max_wait=0)
    with pytest.raises(NoReplica, match="Socket closed"):  # taken out; none left to send it to again
        call(pool)
    with pytest.raises(NoReplica):
        call(pool)


def test_a_call_waits_for_a_replica_to_be_up_and_is_then_sent():
    a = ScriptedTriton("a")
    pool = pool_of(a)
    pool.replicas["a:8001"].up = False

    async def scenario():
        waiting = asyncio.create_task(pool.call(lambda client: client.infer(), 30))
        await until(lambda: pool._waiting, "the call waits")
        assert a.calls == 0 and not waiting.done()
        pool._set(pool.replicas["a:8001"], True, "")  # a health check finds it ready
        return await asyncio.wait_for(waiting, 5)

    assert asyncio.run(scenario()) == "a" and a.calls == 1


def test_a_call_whose_lone_replica_dies_under_it_is_sent_again_once_the_replica_is_back():
    a = ScriptedTriton("a", [unavailable()])
    pool = pool_of(a)

    async def scenario():
        sent = asyncio.create_task(pool.call(lambda client: client.infer(), 30))
        await until(lambda: pool._waiting, "the call waits for the replica it failed on")
        assert a.calls == 1 and not pool.replicas["a:8001"].up
        pool._set(pool.replicas["a:8001"], True, "")
        return await asyncio.wait_for(sent, 5)

    assert asyncio.run(scenario()) == "a" and a.calls == 2


def test_a_dead_stub_is_waited_out_like_unavailable():
    a = ScriptedTriton("a", [dead_stub(), dead_stub()])
    pool = pool_of(a)
    assert asyncio.run(_call_bringing_replicas_back(pool)) == "a" and a.calls == 3


def test_waiting_ends_at_the_deadline_or_max_wait_with_no_replica():
    pool = pool_of(ScriptedTriton("a"), max_wait=0.2)
    pool.replicas["a:8001"].up = False
    with pytest.raises(NoReplica, match="deadline"):
        asyncio.run(pool.call(lambda client: client.infer(), 0.05))
    assert not pool._waiting
    with pytest.raises(NoReplica, match="within 0.2 s"):  # no deadline: max_wait bounds it
        asyncio.run(pool.call(lambda client: client.infer()))


def test_closing_the_pool_ends_the_calls_waiting_for_a_replica():
    pool = pool_of(ScriptedTriton("a"))
    pool.replicas["a:8001"].up = False

    async def scenario():
        waiting = asyncio.create_task(pool.call(lambda client: client.infer()))
        await until(lambda: pool._waiting, "the call waits")
        await pool.close()
        with pytest.raises(NoReplica, match="stopping"):
            await asyncio.wait_for(waiting, 5)

    asyncio.run(scenario())


def test_health_checks_take_replicas_out_and_bring_them_back_and_report_changes():
    seen = []
    a = ScriptedTriton("a", ready=True)
    b = ScriptedTriton("b", ready=InferenceServerException("connection refused", "StatusCode.UNAVAILABLE"))
    c = ScriptedTriton("c", ready="hang")  # a hung Triton: the check times out
    pool = pool_of(a, b, c, health_timeout=0.2, on_replica_up=lambda endpoint, up: seen.append((endpoint, up)))
    assert asyncio.run(pool.refresh()) is True
    assert {e: r.up for e, r in pool.replicas.items()} == {"a:8001": True, "b:8001": False, "c:8001": False}
    a.ready, b.ready = False, True
    asyncio.run(pool.refresh())
    assert {e: r.up for e, r in pool.replicas.items()} == {"a:8001": False, "b:8001": True, "c:8001": False}
    assert ("b:8001", True) in seen and ("c:8001", False) in seen


def test_dns_names_resolve_to_every_address_and_replicas_follow_the_name(monkeypatch):
    addresses = [["10.0.0.1", "10.0.0.2"]]
    gone = []

    async def getaddrinfo(host, port, type=0):
        assert (host, port) == ("blip-triton", 8001)
        return [(2, 1, 6, "", (a, port)) for a in addresses[0]]

    async def scenario():
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
        pool = ReplicaPool(("dns:///blip-triton:8001", "10.0.0.9:8001"), dns_refresh=0,
                           on_replica_gone=gone.append)
        await pool._update_members()
        first = sorted(pool.replicas)
        addresses[0] = ["10.0.0.2", "10.0.0.3"]
        await pool._update_members()
        second = sorted(pool.replicas)
        await pool.close()
        return first, second

    first, second = asyncio.run(scenario())
    assert first == ["10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.9:8001"]
    assert second == ["10.0.0.2:8001", "10.0.0.3:8001", "10.0.0.9:8001"]
    assert gone == ["10.0.0.1:8001"]


def test_a_name_that_fails_to_resolve_keeps_its_replicas(monkeypatch):
    answers = [["10.0.0.1"]]

    async def getaddrinfo(host, port, type=0):
        if answers[0] is None:
            raise OSError("Temporary failure in name resolution")
        return [(2, 1, 6, "", (a, port)) for a in answers[0]]

    async def scenario():
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
        pool = ReplicaPool(("dns:///blip-triton:8001",), dns_refresh=0)
        await pool._update_members()
        answers[0] = None
        await pool._update_members()
        kept = sorted(pool.replicas)
        await pool.close()
        return kept

    assert asyncio.run(scenario()) == ["10.0.0.1:8001"]


# -- draining: replicas that leave the resolver's answer ------------------------------------------------------


def dns_pool(answer: list[str], *clients: ScriptedTriton, **kwargs) -> ReplicaPool:
    """A pool over dns:///blip-triton:8001, which resolves to the names in `answer` (a list the test changes),
    with `clients` as the replicas it resolved to so far, all up."""

    async def resolver(host, port):
        assert (host, port) == ("blip-triton", 8001)
        return [f"{name}:{port}" for name in answer]

    pool = ReplicaPool(("dns:///blip-triton:8001",), dns_refresh=0, resolver=resolver, **kwargs)
    for client in clients:
        pool.replicas[f"{client.name}:8001"] = Replica(f"{client.name}:8001", client, "blip-triton", up=True)
    return pool


async def until(condition, what: str, timeout: float = 5.0) -> None:
    async def wait():
        while not condition():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(wait(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


def test_a_replica_that_leaves_the_answer_takes_no_new_call_and_its_calls_in_flight_finish():
    a, b = ScriptedTriton("a", [HOLD]), ScriptedTriton("b")
    answer = ["a", "b"]
    seen, gone = [], []
    pool = dns_pool(answer, a, b, on_replica_up=lambda endpoint, up: seen.append((endpoint, up)),
                    on_replica_gone=gone.append)

    async def scenario():
        held = asyncio.create_task(pool.call(lambda client: client.infer()))
        await until(lambda: a.held, "a holds the first call")
        replica = pool.replicas["a:8001"]
        answer.remove("a")
        await asyncio.wait_for(pool.refresh(), 1)  # the drain does not hold up the health loop
        assert replica.draining and pool.draining == {"a:8001": replica} and "a:8001" not in pool.replicas
        assert gone == ["a:8001"]  # the metric series goes at once, and is not reported again
        seen.clear()
        assert [await pool.call(lambda client: client.infer()) for _ in range(3)] == ["b", "b", "b"]
        assert not a.closed and not held.done()  # the call in flight goes on
        a.release()
        assert await held == "a"
        await until(lambda: a.closed, "the drained replica's channel is closed")
        assert replica.closed and pool.draining == {}
        await pool.close()

    asyncio.run(scenario())
    assert a.calls == 1 and b.calls == 3
    assert [endpoint for endpoint, up in seen if endpoint == "a:8001"] == []


def test_a_call_failing_unavailable_on_a_draining_replica_is_retried_without_reporting_the_replica_again():
    a, b = ScriptedTriton("a", [HOLD]), ScriptedTriton("b")
    answer = ["a", "b"]
    seen = []
    pool = dns_pool(answer, a, b, on_replica_up=lambda endpoint, up: seen.append((endpoint, up)))

    async def scenario():
        held = asyncio.create_task(pool.call(lambda client: client.infer()))
        await until(lambda: a.held, "a holds the call")
        answer.remove("a")
        await pool.refresh()
        seen.clear()
        a.held[0].set_exception(unavailable())  # e.g. its Triton stopped before answering
        assert await held == "b"
        await until(lambda: a.closed, "the drained replica is closed")
        await pool.close()

    asyncio.run(scenario())
    assert seen == []


def test_a_draining_replica_resolved_again_is_back_in_service_on_the_same_channel():
    a, b = ScriptedTriton("a", [HOLD]), ScriptedTriton("b")
    answer = ["a", "b"]
    seen = []
    pool = dns_pool(answer, a, b, drain_grace=0.5, on_replica_up=lambda endpoint, up: seen.append((endpoint, up)))

    async def scenario():
        held = asyncio.create_task(pool.call(lambda client: client.infer()))
        await until(lambda: a.held, "a holds the first call")
        replica = pool.replicas["a:8001"]
        answer.remove("a")
        await pool.refresh()
        assert replica.draining
        answer.append("a")
        seen.clear()
        await pool.refresh()
        assert pool.replicas["a:8001"] is replica and not replica.draining and pool.draining == {}
        assert replica.up and ("a:8001", True) in seen  # checked and reported again
        await asyncio.sleep(0.7)  # past the drain grace it would have had
        assert not a.closed and not held.done()
        a.release()
        assert await held == "a"
        assert sorted([await pool.call(lambda client: client.infer()) for _ in range(2)]) == ["a", "b"]  # new calls
        assert not a.closed
        await pool.close()
        assert a.closed

    asyncio.run(scenario())


def test_after_the_grace_a_draining_replica_is_closed_its_calls_cancelled_and_retried_elsewhere(caplog):
    a, b = ScriptedTriton("a", [HOLD]), ScriptedTriton("b")
    answer = ["a", "b"]
    pool = dns_pool(answer, a, b, drain_grace=0.05)

    async def scenario():
        held = asyncio.create_task(pool.call(lambda client: client.infer()))
        await until(lambda: a.held, "a holds the first call")
        answer.remove("a")
        await pool.refresh()
        answer_of_held = await asyncio.wait_for(held, 5)  # never released: cancelled by the close, then retried
        await pool.close()
        return answer_of_held

    with caplog.at_level("INFO", logger="blip-serve.gateway"):
        assert asyncio.run(scenario()) == "b"
    assert a.closed and (a.calls, b.calls) == (1, 1)
    assert "drain grace of 0.05 s is over; closing its channel cancels its 1 calls still in flight" in caplog.text


def test_a_call_cancelled_by_the_end_of_a_drain_with_no_other_replica_waits_for_one_then_is_no_replica():
    a = ScriptedTriton("a", [HOLD])
    answer = ["a"]
    pool = dns_pool(answer, a, drain_grace=0.05, max_wait=0.2)

    async def scenario():
        held = asyncio.create_task(pool.call(lambda client: client.infer()))
        await until(lambda: a.held, "a holds the call")
        answer.clear()
        await pool.refresh()
        try:
            await asyncio.wait_for(held, 5)
        finally:
            await pool.close()

    with pytest.raises(NoReplica, match="within 0.2 s; the last failure: .*was closed during the call"):
        asyncio.run(scenario())


def test_a_caller_cancelling_its_call_on_a_draining_replica_stays_cancelled():
    a, b = ScriptedTriton("a", [HOLD]), ScriptedTriton("b")
    answer = ["a", "b"]
    pool = dns_pool(answer, a, b)

    async def scenario():
        held = asyncio.create_task(pool.call(lambda client: client.infer()))
        await until(lambda: a.held, "a holds the call")
        replica = pool.replicas["a:8001"]
        answer.remove("a")
        await pool.refresh()
        held.cancel()  # the gateway's own caller went away: no retry
        with pytest.raises(asyncio.CancelledError):
            await held
        await until(lambda: a.closed, "the drained replica is closed once its last call ended")
        assert replica.in_flight == 0 and b.calls == 0
        await pool.close()

    asyncio.run(scenario())


def test_closing_the_pool_ends_drains_and_closes_every_channel():
    a, b = ScriptedTriton("a", [HOLD]), ScriptedTriton("b")
    answer = ["a", "b"]
    pool = dns_pool(answer, a, b)  # a grace of 60 s: closing must not wait for it

    async def scenario():
        held = asyncio.create_task(pool.call(lambda client: client.infer()))
        await until(lambda: a.held, "a holds the call")
        answer.remove("a")
        await pool.refresh()
        await asyncio.wait_for(pool.close(), 5)
        assert a.closed and b.closed and pool.replicas == {} and pool.draining == {} and not pool._drains
        with pytest.raises(InferenceServerException, match="was closed during the call"):
            await asyncio.wait_for(held, 5)

    asyncio.run(scenario())


def test_suspended_replicas_stay_out_until_resumed_and_draining_does_not_change_that():
    a, b = ScriptedTriton("a"), ScriptedTriton("b")
    answer = ["a", "b"]
    pool = dns_pool(answer, a, b)

    async def scenario():
        pool.suspend("a:8001", "restarting")
        await pool.refresh()
        assert [await pool.call(lambda client: client.infer()) for _ in range(2)] == ["b", "b"]
        pool.resume("a:8001")
        await pool.refresh()
        assert pool.replicas["a:8001"].up
        answer.remove("b")
        await pool.refresh()
        pool.suspend("b:8001", "ignored: draining")  # not a member any more: nothing happens
        assert [await pool.call(lambda client: client.infer()) for _ in range(2)] == ["a", "a"]
        await pool.close()

    asyncio.run(scenario())


def test_once_the_gateway_stops_a_call_failing_on_its_replica_ends_with_its_failure_instead_of_waiting():
    a = ScriptedTriton("a", [unavailable()])
    pool = pool_of(a)  # a wait of 60 s: the test would time out if the call waited
    pool.stop_waiting()
    with pytest.raises(InferenceServerException, match="Socket closed"):
        asyncio.run(asyncio.wait_for(pool.call(lambda client: client.infer(), 30), 5))
