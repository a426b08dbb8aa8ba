"""Container health check: asks the server's grpc.health.v1 service if it serves.

    python -m tracking_grpc.observability.probe --addr 127.0.0.1:50051

Exits 0 when the answer is SERVING, 1 otherwise (not serving, unreachable, timeout),
printing the status, like grpc_health_probe.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(addr: str, service: str = "", timeout_s: float = 2.0) -> str:
    """The serving status name, or the gRPC error code name when the call fails."""
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:50051", help="host:port")
    parser.add_argument("--service", default="", help="service name; empty: server")
    parser.add_argument("--timeout-s", type=float, default=2.0)
    args = parser.parse_args(argv)
    status = check(args.addr, args.service, args.timeout_s)
    print(f"status: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
