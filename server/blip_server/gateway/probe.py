"""A health probe for containers: exit 0 when the gateway answers SERVING through `grpc.health.v1`.

    python -m blip_server.gateway.probe 127.0.0.1:50051                      # ready: a Triton replica is ready
    python -m blip_server.gateway.probe 127.0.0.1:50051 --service liveness   # alive: the process answers

Kubernetes has gRPC probes of its own; Compose and `docker run` health checks use this.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from blip_client import PemSource, channel_credentials
from blip_server.gateway.grpc_server import SERVICE_NAME


def check(address: str, service: str = SERVICE_NAME, timeout: float = 3.0, tls_ca: PemSource | None = None,
          tls_cert: PemSource | None = None, tls_key: PemSource | None = None) -> bool:
    credentials = channel_credentials(tls_ca, tls_cert, tls_key)
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip_server.gateway.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="HOST:PORT of the gateway")
    parser.add_argument("--service", default=SERVICE_NAME, help="health service name (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--tls-ca", help="CA certificate of a gateway that serves TLS")
    parser.add_argument("--tls-cert", help="client certificate, for a gateway that requires mutual TLS")
    parser.add_argument("--tls-key", help="client key, with --tls-cert")
    args = parser.parse_args(argv)
    return 0 if check(args.address, args.service, args.timeout, args.tls_ca, args.tls_cert, args.tls_key) else 1


if __name__ == "__main__":
    sys.exit(main())
