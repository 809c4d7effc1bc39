"""What Ray Serve's gRPC proxy registers for aevae.v1 (`grpc_servicer_functions` in deploy/serve/config.yaml):
the generated add_*Servicer_to_server, but parsing requests as `aevae serve` does.

With the generated functions the proxy parsed with protobuf's own FromString, and request bytes that are no
valid message failed in the proxy: UNKNOWN, "Unexpected DecodeError", where `aevae serve` answers
INVALID_ARGUMENT naming the message. Here such bytes become `Unreadable`, which the proxy passes to the replica
like any request, and the servicer answers it as `aevae serve` does. The proxy replaces the handlers' behaviour
with its routing (the servicer it passes is a stand-in) and keeps their parsing. Sizes are the replicas' to
check (serve_app._sized): the proxy takes messages up to 2 GiB.
"""

from __future__ import annotations

from typing import Any

from aevae.services.grpc_common import register
from aevae.v1 import decoder_pb2, encoder_pb2

PROXY_MAX_BYTES = 2**31 - 1


def add_EncoderServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 - the generated name
    register(servicer, server, encoder_pb2.DESCRIPTOR.services_by_name["Encoder"], PROXY_MAX_BYTES, split=False)


def add_DecoderServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 - the generated name
    register(servicer, server, decoder_pb2.DESCRIPTOR.services_by_name["Decoder"], PROXY_MAX_BYTES, split=False)
