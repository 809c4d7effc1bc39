"""The thin aevae client: numpy in, numpy out, and never a torch import.

    from aevae.client import EncoderClient, DecoderClient
    with EncoderClient("localhost:50051") as enc, DecoderClient("localhost:50052") as dec:
        z = enc.encode(images, model="vae").mean
        images = dec.decode(z, model="vae")
        result = dec.decode_result(z, model="vae")  # the images with the model and version that decoded them

Errors raise AevaeError with the gRPC status `.code()` and the server's `.details()`.
"""

from aevae.client.decoder import AsyncDecoderClient, DecoderClient
from aevae.client.encoder import AsyncEncoderClient, EncoderClient
from aevae.client.errors import AevaeError
from aevae.client.results import DecodeResult, EncodeResult, ModelInfo

__all__ = [
    "AevaeError", "AsyncDecoderClient", "AsyncEncoderClient", "DecodeResult", "DecoderClient", "EncodeResult",
    "EncoderClient", "ModelInfo",
]
