"""Server reflection's v1 schema, made from the v1alpha one that grpcio-reflection ships.

grpcurl, Postman and grpcui ask `grpc.reflection.v1.ServerReflection` first. Its messages are v1alpha's on the
wire, so one servicer answers under both names (services.server); but the servicer lists and describes only
what the descriptor pool holds, and grpcio-reflection puts only v1alpha's file there: a client listing the
services saw v1alpha's name and not the v1 it was talking to, and describing v1's own service failed with
NOT_FOUND. This adds v1's file (the same messages under package `grpc.reflection.v1`) to the pool, derived
from v1alpha's descriptor rather than a second copy of the .proto to keep in step.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2

PACKAGE = "grpc.reflection.v1"
SERVICE_NAME = f"{PACKAGE}.ServerReflection"
FILE_NAME = "grpc/reflection/v1/reflection.proto"  # where v1's .proto lives upstream


def _renamed(old: str, new: str, type_name: str) -> str:
    """A fully qualified type reference (".grpc.reflection.v1alpha.X") moved to the new package."""
    prefix = f".{old}."
    return f".{new}.{type_name[len(prefix):]}" if type_name.startswith(prefix) else type_name


def v1_file() -> descriptor_pb2.FileDescriptorProto:
    """v1alpha's file descriptor under v1's package and file name, every type reference moved with it."""
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old = file.package
    file.name, file.package = FILE_NAME, PACKAGE
    file.ClearField("options")  # v1alpha's: deprecated, and its Java and Go package names
    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # messages' fields only: set on a scalar, it fails the pool
                field.type_name = _renamed(old, PACKAGE, field.type_name)
    for service in file.service:
        for method in service.method:
            method.input_type = _renamed(old, PACKAGE, method.input_type)
            method.output_type = _renamed(old, PACKAGE, method.output_type)
    return file


def add_v1(pool: descriptor_pool.DescriptorPool | None = None) -> str:
    """Puts v1's file in `pool` (the default pool, which the reflection servicer reads), once per process;
    returns v1's service name, to list beside the others."""
    pool = pool or descriptor_pool.Default()
    try:
        pool.FindFileByName(FILE_NAME)
    except KeyError:
        pool.Add(v1_file())
    return SERVICE_NAME
