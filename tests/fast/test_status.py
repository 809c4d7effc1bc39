"""The status every servicer answers an error with (services/status.py): details gRPC can always send."""

from __future__ import annotations

from pathlib import Path

import grpc

from aevae.errors import FailedPrecondition, NotFound
from aevae.services.status import DETAILS_MAX_BYTES, status_of


def test_details_that_are_no_utf8_are_escaped() -> None:
    """A lone surrogate (what Python makes of a file name's undecodable byte) left the call unanswered until
    its deadline: gRPC could not encode the details."""
    code, details = status_of(NotFound("no model '\udcff'"))
    assert code == grpc.StatusCode.NOT_FOUND
    details.encode("utf-8")  # raises UnicodeEncodeError if the surrogate were left in
    assert "\\udcff" in details


def test_long_details_are_cut_under_grpcs_metadata_limit() -> None:
    """Details past gRPC's metadata limit turned the call's status into RESOURCE_EXHAUSTED about metadata."""
    for text in ("x" * 100_000, "é" * 50_000, "no loadable version: " + "\U0001F600" * 10_000):
        code, details = status_of(FailedPrecondition(text))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert len(details.encode("utf-8")) <= DETAILS_MAX_BYTES
        assert details.endswith("...") and text.startswith(details[:-3])


def test_short_details_are_unchanged() -> None:
    text = "unknown model 'vea'; available: ae, vae (versions 1, 2)"
    assert status_of(NotFound(text)) == (grpc.StatusCode.NOT_FOUND, text)


def test_a_refused_request_is_released_when_its_call_ends(tiny_repo: Path) -> None:
    """grpc.aio keeps the exception of `context.abort` on the call's state, and its traceback's frames reach
    the call's context again: a cycle that held each refused request (a 60 MiB model name: 20 calls left 2.4 GB)
    until Python's cyclic collector ran, which needs other traffic. With the collector off, nothing of the
    requests may be left once their calls are answered."""
    import asyncio
    import gc
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from aevae.services import server
    from aevae.services.registration import Bulk
    from aevae.services.settings import ServiceSettings
    from aevae.v1 import decoder_pb2, decoder_pb2_grpc
    from aevae.v1.tensors import to_tensor

    latents = to_tensor(np.zeros((1, 4), np.float32))
    refused = [(decoder_pb2.DecodeRequest(model="a" * (1 << 20), latents=latents), grpc.StatusCode.NOT_FOUND),
               (decoder_pb2.DecodeRequest(model="vae", dtype="a" * (1 << 20), latents=latents),
                grpc.StatusCode.INVALID_ARGUMENT)]

    async def main() -> list[object]:
        settings = ServiceSettings(models_dir=str(tiny_repo))
        with ThreadPoolExecutor(2) as executor:
            served, _ = server.build("decoder", settings, server.open_store(settings), server.engine(settings,
                                                                                                        executor))
            port = served.add_insecure_port("127.0.0.1:0")
            await served.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    decode = decoder_pb2_grpc.DecoderStub(channel).Decode
                    for request, code in refused * 2:
                        try:
                            await decode(request, timeout=30)
                        except grpc.aio.AioRpcError as error:
                            assert error.code() == code, error
                        else:
                            raise AssertionError("answered OK")
                await asyncio.sleep(0.2)  # the calls' tasks end after their status is sent
                return [o for o in gc.get_objects() if type(o) is Bulk]
            finally:
                await served.stop(0)

    gc.collect()
    gc.disable()
    try:
        left = asyncio.run(main())
    finally:
        gc.enable()
    assert left == [], f"{len(left)} refused request(s) still held"
