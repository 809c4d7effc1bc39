"""The services' logic without a transport: validation, limits and errors as the gRPC servicers map them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aevae.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from aevae.services.decoder import DecoderLogic
from aevae.services.encoder import EncoderLogic
from aevae.services.inputs import LATENT_BOUND
from aevae.services.settings import Limits
from aevae.store import ModelStore

LIMITS = Limits(max_message_bytes=64 * 1024, max_batch=100)


@pytest.fixture
def dec(tiny_repo: Path) -> DecoderLogic:
    return DecoderLogic(ModelStore(tiny_repo), LIMITS)


@pytest.fixture
def enc(tiny_repo: Path) -> EncoderLogic:
    return EncoderLogic(ModelStore(tiny_repo), LIMITS)


def test_decode_and_encode_round_trip_shapes(dec: DecoderLogic, enc: EncoderLogic) -> None:
    out = dec.decode("vae", None, np.zeros((3, 4), np.float32), "uint8")
    assert (out.model, out.version, out.images.shape, out.images.dtype) == ("vae", 1, (3, 32, 32), np.uint8)
    encoded = enc.encode("vae", 1, out.images, np.random.default_rng(0))
    assert encoded.mean.shape == encoded.logvar.shape == encoded.sample.shape == (3, 4)  # type: ignore[union-attr]
    ae = enc.encode("ae", None, out.images, np.random.default_rng(0))
    assert ae.logvar is None and np.array_equal(ae.sample, ae.mean)  # type: ignore[arg-type]


def test_a_model_of_another_shape_is_validated_by_its_own_manifest(dec: DecoderLogic, enc: EncoderLogic) -> None:
    images = dec.decode("vae8", None, np.zeros((2, 8), np.float32)).images
    assert images.shape == (2, 24, 20)
    assert enc.encode("vae8", None, images).mean.shape == (2, 8)
    assert enc.encode("vae8", None, np.zeros((2, 20, 16), np.uint8)).mean.shape == (2, 8)  # before padding
    with pytest.raises(InvalidArgument, match=r"expected N x 24 x 20 or N x 20 x 16, got \[2, 32, 32\]"):
        enc.encode("vae8", None, np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(InvalidArgument, match=r"model 'vae8' expects N x 8 latents, got \[1, 4\]"):
        dec.decode("vae8", None, np.zeros((1, 4), np.float32))


@pytest.mark.parametrize("latents, message", [
    (np.full((2, 4), np.nan, np.float32), r"latents: expected finite values, got nan at index \[0, 0\]"),
    (np.array([[0, 0, 0, 0], [0, 1e22, 0, 0]], np.float32), r"values must lie in \[-10000, 10000\]; row 1"),
    (np.zeros((2, 3), np.float32), r"expects N x 4 latents, got \[2, 3\]"),
    (np.zeros((2, 2, 4), np.float32), r"expects N x 4 latents, got \[2, 2, 4\]"),
])
def test_bad_latents_are_invalid_argument_naming_what_is_accepted(dec: DecoderLogic, latents: np.ndarray,
                                                                  message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        dec.decode("vae", None, latents)


def test_latents_at_the_bound_decode_to_finite_images(dec: DecoderLogic) -> None:
    out = dec.decode("vae", None, np.full((1, 4), LATENT_BOUND, np.float32)).images
    assert np.isfinite(out).all() and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("images, message", [
    (np.full((1, 32, 32), 2.0, np.float32), r"float32 pixels must lie in \[0, 1\]"),
    (np.full((1, 32, 32), np.inf, np.float32), r"expected finite values"),
    (np.zeros((1, 30, 30), np.uint8), r"expected N x 32 x 32 or N x 28 x 28, got \[1, 30, 30\]"),
])
def test_bad_images_are_invalid_argument(enc: EncoderLogic, images: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        enc.encode("vae", None, images)


def test_limits_are_resource_exhausted_with_the_limit(dec: DecoderLogic, enc: EncoderLogic) -> None:
    with pytest.raises(ResourceExhausted, match="maximum batch per request of 100"):
        dec.decode("vae", None, np.zeros((101, 4), np.float32), "uint8")
    # 16 images of 4 KiB are the whole 64 KiB: with the answer's other fields they would not fit, so 15 at most
    with pytest.raises(ResourceExhausted, match=r"over the max message size of 65536 bytes; send at most 15"):
        dec.decode("vae", None, np.zeros((16, 4), np.float32))
    assert dec.decode("vae", None, np.zeros((15, 4), np.float32)).images.shape == (15, 32, 32)
    with pytest.raises(ResourceExhausted, match="maximum batch per request of 100"):
        enc.encode("vae", None, np.zeros((101, 32, 32), np.uint8))


def test_names_dtypes_and_versions(dec: DecoderLogic, enc: EncoderLogic) -> None:
    with pytest.raises(InvalidArgument, match="model: expected a model name"):
        dec.decode("", None, np.zeros((1, 4), np.float32))
    with pytest.raises(InvalidArgument, match=r"dtype: expected float32 or uint8 .*got 'float16'"):
        dec.decode("vae", None, np.zeros((1, 4), np.float32), "float16")
    with pytest.raises(NotFound, match="has no version 9"):
        enc.latent_stats("vae", 9)
    name, version, stats = enc.latent_stats("vae8", None)
    assert (name, version, len(stats["dims"])) == ("vae8", 1, 8)


def test_latent_statistics_gone_since_the_load_name_the_file_not_the_servers_folders(tiny_repo: Path,
                                                                                      enc: EncoderLogic) -> None:
    enc.encode("vae", 1, np.zeros((1, 32, 32), np.float32))
    (tiny_repo / "vae" / "1" / "latent_stats.json").unlink()
    with pytest.raises(FailedPrecondition) as error:
        enc.latent_stats("vae", 1)
    assert str(error.value) == ("the latent statistics of vae/1 cannot be read: latent_stats.json: No such file or "
                                "directory")


def test_a_broken_default_is_skipped_and_an_explicit_request_names_the_reason(tiny_repo: Path) -> None:
    from helpers import write_tiny

    version = write_tiny(tiny_repo, "vae", seed=5)
    version.file("weights.pt").write_bytes(b"not a zip")
    dec = DecoderLogic(ModelStore(tiny_repo), LIMITS)
    assert dec.decode("vae", None, np.zeros((1, 4), np.float32)).version == 1
    with pytest.raises(FailedPrecondition, match="model 'vae' version 2 is broken: .*checksum"):
        dec.decode("vae", 2, np.zeros((1, 4), np.float32))
    (summary,) = [s for s in dec.list_models() if s.name == "vae"]
    assert summary.number == 1 and list(summary.broken) == [2]


def test_a_stream_s_samples_are_drawn_in_message_order_whatever_order_handlers_run() -> None:
    """The handler of message 2 may run before that of message 1 (it found message 0 done without yielding);
    the draws of the stream's one generator must still follow the messages."""
    import asyncio

    from aevae.services.grpc_encoder import InOrder

    async def main() -> list[int]:
        order, drawn = InOrder(), []

        async def message(index: int, samples: bool) -> None:
            if not samples:
                order.pass_on(index)
                return
            await order.turn(index)
            try:
                await asyncio.sleep(0.001 * (5 - index))  # the earlier message takes longer
                drawn.append(index)
            finally:
                order.done(index)

        plan = {0: True, 1: True, 2: False, 3: True, 4: True}
        await asyncio.gather(*(message(i, plan[i]) for i in (4, 3, 1, 2, 0)))  # started out of order
        return drawn

    assert asyncio.run(main()) == [0, 1, 3, 4]
