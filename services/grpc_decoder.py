"""aevae.v1.Decoder over gRPC: request -> validation -> model (off the event loop) -> response."""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from aevae.services.decoder import DecoderLogic
from aevae.services.grpc_common import Runner, guarded, models_response, served_stream
from aevae.v1 import decoder_pb2, decoder_pb2_grpc, tensor_pb2
from aevae.v1.tensors import from_tensor, to_tensor, version_from_wire


class DecoderServicer(decoder_pb2_grpc.DecoderServicer):
    def __init__(self, logic: DecoderLogic, run: Runner, stream_depth: int = 2):
        self.logic = logic
        self.run = run
        self.stream_depth = stream_depth

    def _decode(self, request: decoder_pb2.DecodeRequest, version: int | None) -> decoder_pb2.DecodeResponse:
        latents = from_tensor(request.latents, "latents", dtypes=("float32",))
        out = self.logic.decode(request.model, version, latents, request.dtype)
        return decoder_pb2.DecodeResponse(model=out.model, version=out.version, images=to_tensor(out.images))

    async def _submit(self, request: decoder_pb2.DecodeRequest) -> decoder_pb2.DecodeResponse:
        version = version_from_wire(request.version)
        n = request.latents.shape[0] if request.latents.shape else 0
        return await self.run(lambda: self._decode(request, version), n, self.logic.ready(request.model, version))

    async def Decode(self, request: decoder_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        return await guarded(context, self._submit(request))

    async def DecodeStream(
        self, request_iterator: AsyncIterator[decoder_pb2.DecodeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decoder_pb2.DecodeResponse]:
        async for response in served_stream(context, request_iterator, lambda _, r: self._submit(r),
                                            self.stream_depth):
            yield response

    async def ListModels(self, request: tensor_pb2.ListModelsRequest, context: grpc.aio.ServicerContext):
        summaries = await guarded(context, self.run(self.logic.list_models, 0, False))
        return models_response(summaries, self.logic.limits)
