"""The standard grpc.health.v1 check, as the status name ("SERVING", "NOT_SERVING", ...)."""

from __future__ import annotations

import grpc


def _stub(channel: grpc.Channel | grpc.aio.Channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    return health_pb2, health_pb2_grpc.HealthStub(channel)


def check(channel: grpc.Channel, timeout: float | None) -> str:
    health_pb2, stub = _stub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def check_async(channel: grpc.aio.Channel, timeout: float | None) -> str:
    health_pb2, stub = _stub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
