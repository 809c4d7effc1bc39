"""The echo floor: a bare grpc.aio server that returns each request's bytes, unary and streaming.

    python benchmarks/echo_server.py PORT

The benchmarks call it the way they call aevae (the same channel options, the same clients), so that what is
left over is what aevae itself costs. Prints "echo serving on 127.0.0.1:PORT" once it listens.
"""

from __future__ import annotations

import asyncio
import sys
from typing import AsyncIterator

import grpc

METHOD_UNARY = "/echo.Echo/Unary"
METHOD_STREAM = "/echo.Echo/Stream"


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def main(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.stream_stream_rpc_method_handler(_stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", handlers),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"echo serving on 127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
