"""Exit 0 when a server answers SERVING on grpc.health.v1.Health, 1 otherwise.

    python -m moe_common.healthcheck 127.0.0.1:50051 [--service NAME] [--timeout 2]

For container health checks (Docker, compose) that cannot speak gRPC themselves;
Kubernetes probes call the health service natively.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_common import tls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("address")
    p.add_argument("--service", default="")
    p.add_argument("--timeout", type=float, default=2.0)
    tls.add_arguments(p)
    a = p.parse_args(argv)
    try:
        with tls.from_args(a).channel(a.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=a.service),
                                                              timeout=a.timeout)
    except grpc.RpcError as err:
        print(f"{a.address}: {err.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{a.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    raise SystemExit(main())
