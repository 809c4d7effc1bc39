"""Server bootstrap for either service: the servicer, health, reflection, limits and graceful shutdown.

On SIGTERM (or SIGINT) health turns NOT_SERVING at once, so load balancers stop sending; after
`shutdown_delay` seconds the server stops taking new calls, lets the calls in flight finish within `grace`
seconds, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aevae.services.limits import Limits
from aevae.services.model_cache import ModelCache

log = logging.getLogger(__name__)
DEFAULT_PORTS = {"encoder": 50051, "decoder": 50052}


@dataclass(frozen=True)
class ServerConfig:
    kind: str  # "encoder" or "decoder"
    models_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int | None = None  # None: the kind's default; 0: any free port (printed on start)
    limits: Limits = Limits()
    workers: int = 2
    torch_threads: int | None = None
    inline_max: int = 64
    refresh_seconds: float = 2.0
    grace: float = 10.0
    shutdown_delay: float = 0.5


def build(config: ServerConfig, cache: ModelCache, executor: ThreadPoolExecutor) -> tuple[grpc.aio.Server, str]:
    """The servicer for config.kind on a grpc.aio server; returns the server and its service's full name."""
    from aevae.services.grpc_common import Runner

    run = Runner(executor, config.inline_max)
    size = config.limits.max_message_bytes
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 0),
    ])
    if config.kind == "encoder":
        from aevae.services.encoder import EncoderLogic
        from aevae.services.grpc_encoder import EncoderServicer
        from aevae.v1 import encoder_pb2, encoder_pb2_grpc

        encoder_pb2_grpc.add_EncoderServicer_to_server(EncoderServicer(EncoderLogic(cache, config.limits), run), server)
        name = encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name
    elif config.kind == "decoder":
        from aevae.services.decoder import DecoderLogic
        from aevae.services.grpc_decoder import DecoderServicer
        from aevae.v1 import decoder_pb2, decoder_pb2_grpc

        decoder_pb2_grpc.add_DecoderServicer_to_server(DecoderServicer(DecoderLogic(cache, config.limits), run), server)
        name = decoder_pb2.DESCRIPTOR.services_by_name["Decoder"].full_name
    else:
        raise ValueError(f"kind must be encoder or decoder, got {config.kind!r}")
    return server, name


async def serve(config: ServerConfig) -> int:
    # Request tensors are read-only views on the message bytes; the model only reads them.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix=f"aevae-{config.kind}")
    cache = ModelCache(config.models_dir, refresh_seconds=config.refresh_seconds)
    server, service = build(config, cache, executor)
    loop = asyncio.get_running_loop()

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((service, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    port = DEFAULT_PORTS[config.kind] if config.port is None else config.port
    address = f"{config.host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address} (in use?): {exc}") from None
    await server.start()
    for name in ("", service):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(f"aevae {config.kind} serving {service} on {config.host}:{bound} "
          f"(models in {cache.repository.root.resolve()}: {cache.repository.describe()})", flush=True)
    preloading = loop.run_in_executor(executor, cache.preload)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("shutting down: NOT_SERVING, then draining for up to %.1f s", config.grace)
    print(f"aevae {config.kind}: stopping (NOT_SERVING, draining)", file=sys.stderr, flush=True)
    await health_servicer.enter_graceful_shutdown()
    await asyncio.sleep(config.shutdown_delay)
    await server.stop(config.grace)
    preloading.cancel()
    executor.shutdown(wait=True)
    return 0
