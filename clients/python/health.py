"""The standard grpc.health.v1 check, as the status name ("SERVING", "NOT_SERVING", ...).

Behind a router without the health service (Ray Serve's gRPC proxy answers UNIMPLEMENTED), a successful
ListModels is what "serving" means.
"""

from __future__ import annotations

import grpc

from aevae.v1 import tensor_pb2


def _stub(channel: grpc.Channel | grpc.aio.Channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    return health_pb2, health_pb2_grpc.HealthStub(channel)


def _list_models(channel: grpc.Channel | grpc.aio.Channel, service: str):
    return channel.unary_unary(f"/aevae.v1.{service}/ListModels",
                               request_serializer=tensor_pb2.ListModelsRequest.SerializeToString,
                               response_deserializer=tensor_pb2.ListModelsResponse.FromString)


def check(channel: grpc.Channel, timeout: float | None, service: str | None = None) -> str:
    """`service` ("Encoder" or "Decoder") enables the ListModels fallback; without it, only grpc.health.v1."""
    health_pb2, stub = _stub(channel)
    try:
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNIMPLEMENTED or not service:
            raise
        _list_models(channel, service)(tensor_pb2.ListModelsRequest(), timeout=timeout)
        return "SERVING"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def check_async(channel: grpc.aio.Channel, timeout: float | None, service: str | None = None) -> str:
    health_pb2, stub = _stub(channel)
    try:
        response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNIMPLEMENTED or not service:
            raise
        await _list_models(channel, service)(tensor_pb2.ListModelsRequest(), timeout=timeout)
        return "SERVING"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def serves(channel: grpc.Channel, timeout: float | None, service: str) -> bool | None:
    """Whether the server serves aevae.v1.`service` ("Encoder" or "Decoder"), from its health status for
    that service name (each aevae service reports its own): False for another service (an encoder's address
    given for the decoder, which answers ListModels alike); None when it cannot tell (no health service, as
    behind Ray Serve's proxy; not reachable now)."""
    health_pb2, stub = _stub(channel)
    try:
        stub.Check(health_pb2.HealthCheckRequest(service=f"aevae.v1.{service}"), timeout=timeout)
    except grpc.RpcError as error:
        return False if error.code() == grpc.StatusCode.NOT_FOUND else None
    return True
