"""TLS and mutual TLS on the gateway, with API keys: the typed API, health and reflection all over TLS; what is not
allowed in is refused. Certificates are made by trustme for this run."""

from __future__ import annotations

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from blip_client import CaptionClient, UnauthenticatedError, UnavailableError
from blip_server.gateway.grpc_server import server_credentials
from blip_server.gateway.probe import check
from support.fake_captioner import IMAGE, FakeCaptioner
from support.gateway import BackgroundGateway


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca, rogue = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@example.com")
    stranger = rogue.issue_cert("stranger@example.com")
    files = {}
    for name, blob in [("ca", ca.cert_pem), ("server_cert", server.cert_chain_pems[0]),
                       ("server_key", server.private_key_pem), ("client_cert", client.cert_chain_pems[0]),
                       ("client_key", client.private_key_pem), ("stranger_cert", stranger.cert_chain_pems[0]),
                       ("stranger_key", stranger.private_key_pem)]:
        files[name] = root / f"{name}.pem"
        blob.write_to_path(str(files[name]))
    return files


def _gateway(pki, mutual: bool, api_keys=()):
    credentials = server_credentials(pki["server_cert"], pki["server_key"], pki["ca"] if mutual else None)
    gateway = BackgroundGateway(FakeCaptioner(), api_keys=api_keys, credentials=credentials)
    gateway.call(gateway.gateway.set_serving(True))
    return gateway


def test_tls_serves_the_api_health_and_reflection_and_refuses_plaintext(pki):
    gateway = _gateway(pki, mutual=False)
    try:
        with CaptionClient(gateway.address, tls_ca=pki["ca"]) as client:
            assert client.caption(IMAGE, prompt="secure").text.startswith("secure")
        assert check(gateway.address, tls_ca=pki["ca"])
        credentials = grpc.ssl_channel_credentials(pki["ca"].read_bytes())
        with grpc.secure_channel(gateway.address, credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            answer = next(reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            assert "blip.caption.v1.CaptionService" in {s.name for s in answer.list_services_response.service}
        with CaptionClient(gateway.address, retry=None, timeout=5) as plaintext, pytest.raises(UnavailableError):
            plaintext.caption(IMAGE)
        assert not check(gateway.address)
    finally:
        gateway.stop()


def test_mutual_tls_requires_a_client_certificate_from_the_trusted_ca(pki):
    gateway = _gateway(pki, mutual=True)
    try:
        with CaptionClient(gateway.address, tls_ca=pki["ca"], tls_cert=pki["client_cert"],
                           tls_key=pki["client_key"]) as client:
            assert client.caption(IMAGE, prompt="mutual").text.startswith("mutual")
        for cert, key in [(None, None), (pki["stranger_cert"], pki["stranger_key"])]:
            with CaptionClient(gateway.address, tls_ca=pki["ca"], tls_cert=cert, tls_key=key, retry=None,
                               timeout=5) as refused, pytest.raises(UnavailableError):
                refused.caption(IMAGE)
        assert check(gateway.address, tls_ca=pki["ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"])
    finally:
        gateway.stop()


def test_api_keys_over_tls_with_health_left_open(pki):
    gateway = _gateway(pki, mutual=False, api_keys=["k1"])
    try:
        with CaptionClient(gateway.address, tls_ca=pki["ca"]) as anonymous, pytest.raises(UnauthenticatedError):
            anonymous.caption(IMAGE)
        with CaptionClient(gateway.address, tls_ca=pki["ca"], api_key="k1") as client:
            assert client.caption(IMAGE, prompt="keyed").text.startswith("keyed")
        assert check(gateway.address, tls_ca=pki["ca"])
    finally:
        gateway.stop()


def test_tls_settings_that_do_not_fit_are_refused(pki):
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        server_credentials(pki["server_cert"], None, None)
    with pytest.raises(ValueError, match="--tls-client-ca needs --tls-cert and --tls-key"):
        server_credentials(None, None, pki["ca"])
    with pytest.raises(ValueError, match="give both tls_cert and tls_key"):
        CaptionClient("127.0.0.1:1", tls_ca=pki["ca"], tls_cert=pki["client_cert"])
