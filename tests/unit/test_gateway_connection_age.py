"""The gateway's maximum connection age, over real gRPC with the Triton call replaced: after the age the server
sends GOAWAY, clients' new calls go over a new connection without failing, calls in flight go on until the grace
ends and are then cancelled (UNAVAILABLE). And the flags that set it, and the drain grace, reach the gateway.

Every wait here is bounded; nothing asserts how long anything took."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from blip_client import CaptionClient
from blip_client import _errors as client_errors
from blip_server.config import GatewayConfig, ServeConfig, parse_command_line
from blip_server.gateway import main as gateway_command
from blip_server.gateway.grpc_server import connection_age_options, create_server
from blip_server.gateway.main import main as gateway_main
from support.fake_captioner import IMAGE, FakeCaptioner
from support.gateway import BackgroundGateway


class AgedGateway(BackgroundGateway):
    """BackgroundGateway whose server has a maximum connection age."""

    def __init__(self, captioner, max_age: float, grace: float):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.gateway = self.call(create_server("127.0.0.1:0", captioner, max_connection_age=max_age,
                                               max_connection_age_grace=grace))
        self.address = f"127.0.0.1:{self.gateway.port}"


class States:
    """The connectivity states a client's channel goes through (IDLE after READY: the connection went away)."""

    def __init__(self, client: CaptionClient):
        self.seen: list[str] = []
        client._channel.subscribe(lambda state: self.seen.append(state.name), try_to_connect=False)

    def goaways(self) -> int:
        # Adjacent pairs of states: the shifted copy is one shorter, so truncating is intended.
        return sum(1 for before, after in zip(self.seen, self.seen[1:], strict=False)
                   if (before, after) == ("READY", "IDLE"))


def wait_for(condition, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def in_thread(function) -> tuple[threading.Thread, dict]:
    outcome = {}

    def run():
        try:
            outcome["result"] = function()
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


async def _release(captioner) -> None:
    captioner.release.set()


def test_the_options_are_grpc_cores_in_milliseconds_and_zero_means_no_limit():
    assert connection_age_options(300, 120) == [("grpc.max_connection_age_ms", 300_000),
                                                ("grpc.max_connection_age_grace_ms", 120_000)]
    assert connection_age_options(0.25, 0) == [("grpc.max_connection_age_ms", 250)]  # grace: gRPC's, unlimited
    assert connection_age_options(0, 120) == []
    with pytest.raises(ValueError, match="cannot be negative"):
        connection_age_options(-1, 0)


@pytest.mark.parametrize("retry", ["default", None], ids=["default_retry_policy", "no_retry_policy"])
def test_after_the_connection_age_new_calls_go_over_a_new_connection_and_none_fails(retry):
    """Four SDK clients' threads caption in a loop over one channel while the gateway sends GOAWAY every ~0.2 s:
    the channel reconnects by itself, and calls racing a GOAWAY are retried by gRPC (transparently, before the
    server saw them), so no call fails, also for a client without a retry policy."""
    gateway = AgedGateway(FakeCaptioner(), max_age=0.2, grace=30)
    try:
        with (CaptionClient(gateway.address) if retry == "default"
              else CaptionClient(gateway.address, retry=None)) as client:
            states = States(client)
            failures, calls, stop = [], [0], threading.Event()

            def caption_in_a_loop(offset: int) -> None:
                i = offset
                while not stop.is_set():
                    try:
                        assert client.caption(IMAGE, prompt=f"p{i}").text.startswith(f"p{i}")
                        calls[0] += 1
                    except Exception as exc:  # noqa: BLE001 - every failure is a finding
                        failures.append(exc)
                    i += 4

            threads = [threading.Thread(target=caption_in_a_loop, args=(i,)) for i in range(4)]
            for thread in threads:
                thread.start()
            try:
                wait_for(lambda: states.goaways() >= 3 or failures, "the connection was renewed three times")
            finally:
                stop.set()
                for thread in threads:
                    thread.join(timeout=30)
            assert not failures, failures[:3]
            assert client.caption(IMAGE, prompt="after").text.startswith("after")
    finally:
        gateway.stop()
    assert calls[0] > 0 and states.goaways() >= 3


def test_calls_in_flight_outlive_the_goaway_within_the_grace():
    """A Caption and a CaptionStream held by the captioner across the GOAWAY: meanwhile a new call succeeds (over
    a new connection), and both held calls then finish normally."""
    captioner = FakeCaptioner()
    gateway = AgedGateway(captioner, max_age=0.3, grace=60)
    try:
        with CaptionClient(gateway.address, retry=None) as client:
            states = States(client)
            unary, unary_outcome = in_thread(lambda: client.caption(IMAGE, prompt="slow").text)
            stream, stream_outcome = in_thread(lambda: list(client.caption_stream([IMAGE, IMAGE], prompt="slow")))
            wait_for(lambda: len(captioner.seen) >= 3, "the captioner holds the three images")
            wait_for(lambda: states.goaways() >= 1, "the gateway sent GOAWAY")
            assert client.caption(IMAGE, prompt="new").text.startswith("new")
            assert unary.is_alive() and stream.is_alive()
            gateway.call(_release(captioner))
            unary.join(timeout=20)
            stream.join(timeout=20)
    finally:
        gateway.stop()
    assert unary_outcome == {"result": "slow []"}
    items = stream_outcome["result"]
    assert sorted(index for index, _ in items) == [0, 1]
    assert all(result.text == "slow []" for _, result in items)


def test_calls_still_in_flight_at_the_end_of_the_grace_are_unavailable():
    captioner = FakeCaptioner()  # "slow" never released: the calls outlast the grace
    gateway = AgedGateway(captioner, max_age=0.2, grace=0.3)
    try:
        with CaptionClient(gateway.address, retry=None) as client:
            unary, unary_outcome = in_thread(lambda: client.caption(IMAGE, prompt="slow", timeout=60))
            stream, stream_outcome = in_thread(lambda: list(client.caption_stream([IMAGE], prompt="slow",
                                                                                   timeout=60)))
            unary.join(timeout=30)
            stream.join(timeout=30)
            assert client.caption(IMAGE, prompt="new").text.startswith("new")
    finally:
        gateway.call(_release(captioner))
        gateway.stop()
    for outcome in (unary_outcome, stream_outcome):
        assert isinstance(outcome.get("error"), client_errors.UnavailableError), outcome
        assert "max connection age" in outcome["error"].message


def test_the_flags_and_environment_set_the_connection_age_and_the_drain_grace():
    config = parse_command_line(GatewayConfig, ["--triton", "a:8001", "--max-connection-age", "60",
                                                "--drain-grace", "5"], prog="blip-gateway", description="",
                                environ={"BLIP_MAX_CONNECTION_AGE_GRACE": "30"})
    assert (config.max_connection_age, config.max_connection_age_grace, config.drain_grace) == (60, 30, 5)
    defaults = GatewayConfig()
    assert (defaults.max_connection_age, defaults.max_connection_age_grace, defaults.drain_grace) == (300, 120, 60)
    serve = ServeConfig()  # blip-serve's gateway has the same connection age (it has no dns:/// replicas to drain)
    assert (serve.max_connection_age, serve.max_connection_age_grace) == (300, 120)


def test_start_gateway_passes_the_options_to_the_server_and_the_pool(monkeypatch):
    seen = {}

    async def recording_create_server(*args, **kwargs):
        seen.update(kwargs)
        return await create_server(*args, **kwargs)

    monkeypatch.setattr(gateway_command, "create_server", recording_create_server)
    config = parse_command_line(GatewayConfig, ["--triton", "127.0.0.1:1", "--port", "0", "--max-connection-age",
                                                "42", "--max-connection-age-grace", "7", "--drain-grace", "3"],
                                prog="blip-gateway", description="", environ={})

    async def scenario():
        gateway = await gateway_command.start_gateway(config, config.triton, config.dns_refresh, config.drain_grace)
        try:
            return gateway.captioner.replicas.drain_grace
        finally:
            await gateway.stop(0)

    assert asyncio.run(scenario()) == 3
    assert (seen["max_connection_age"], seen["max_connection_age_grace"]) == (42, 7)


def test_blip_gateway_refuses_negative_durations(capsys):
    assert gateway_main(["--triton", "127.0.0.1:1", "--port", "0", "--drain-grace", "-1"]) == 2
    assert "blip-gateway: error: the drain grace cannot be negative" in capsys.readouterr().err
    assert gateway_main(["--triton", "127.0.0.1:1", "--port", "0", "--max-connection-age", "-1"]) == 2
    assert "cannot be negative" in capsys.readouterr().err


def test_a_client_without_a_retry_policy_keeps_grpcs_transparent_retries():
    """Turning gRPC's retries off altogether (`grpc.enable_retries` 0) also stops the transparent retry of a call
    that raced a GOAWAY and never reached the server: such a call then fails UNAVAILABLE (measured: 2 of about
    2,400 calls over 38 renewals at a 0.1 s age), which the test above catches only by chance."""
    from blip_client._requests import channel_options

    assert ("grpc.enable_retries", 0) not in channel_options(None)
    assert not any(name == "grpc.service_config" for name, _ in channel_options(None))
