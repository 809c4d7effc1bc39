"""aevae.v1.Decoder over gRPC: request -> validation -> batch -> model -> response."""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator

import grpc

from aevae.services.admission import Engine
from aevae.services.batching import Batcher
from aevae.services.decoder import DecodeJob, Decoded, DecoderLogic
from aevae.services.listing import ListsModels
from aevae.services.registration import readable, request_array, rows
from aevae.services.status import guarded
from aevae.services.streams import Reply, served_stream
from aevae.v1 import decoder_pb2
from aevae.v1.tensors import serialize_with_data, tensor_head, to_tensor, version_from_wire


class DecoderServicer(ListsModels):
    """Registered by registration.register (its request parsing), so it needs no generated base class."""

    def __init__(self, logic: DecoderLogic, engine: Engine):
        self.logic = logic
        self.engine = engine
        self.batcher: Batcher[DecodeJob, Decoded] = Batcher.of_jobs(logic.run, engine)

    async def _decode(self, request: decoder_pb2.DecodeRequest, unary: bool = False) -> Reply:
        """One message: validated on its own, then decoded together with whatever else is waiting (a unary
        call's, on a busy server, waiting a moment for others: Batcher.submit)."""
        with self.engine.admission.hold(request.ByteSize()):
            version = version_from_wire(request.version)
            latents = request_array(request, "latents", dtypes=("float32",))
            job = await self.engine.run(lambda: self.logic.prepare(request.model, version, latents, request.dtype),
                                        rows(latents), self.logic.ready(request.model, version))
            async with self.engine.answered(self.batcher, job, unary) as out:
                response = self._response(out)
        return Reply(out.model, out.version, response, out.content)

    def _response(self, out: Decoded) -> object:
        if self.engine.raw_responses:  # the images' bytes copied once, straight into the wire message
            head = decoder_pb2.DecodeResponse(model=out.model, version=out.version, images=tensor_head(out.images))
            return serialize_with_data(head, 3, out.images)
        return decoder_pb2.DecodeResponse(model=out.model, version=out.version, images=to_tensor(out.images))

    async def Decode(self, request: Any, context: grpc.aio.ServicerContext) -> decoder_pb2.DecodeResponse | bytes:
        async def call() -> Any:
            with self.engine.admission.call():
                return (await self._decode(readable(request), unary=True)).response

        return await guarded(context, call())

    async def DecodeStream(self, request_iterator: AsyncIterator[Any],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[decoder_pb2.DecodeResponse | bytes]:
        async with aclosing(served_stream(context, self.engine.admission, request_iterator,
                                          lambda _, r: self._decode(r), self.engine.stream_depth)) as responses:
            async for response in responses:  # closed with this one: its budget is given back at once
                yield response
