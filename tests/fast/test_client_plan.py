"""The client's batching plan: messages sized by the server's limits and the model's own image shape; and
answers checked before they become the caller's data."""

from __future__ import annotations

import asyncio
import re

import grpc
import numpy as np
import pytest

from aevae.client import AevaeError
from aevae.client.core import HEADROOM, ServerLimits, Unlisted, broken, prepare_images
from aevae.client.decoder import _Plan, _parse
from aevae.client.encoder import _Plan as EncodePlan
from aevae.client.fanout import Assembler
from aevae.v1 import decoder_pb2, encoder_pb2
from aevae.v1.tensors import to_tensor

LIMITS = ServerLimits(max_message_bytes=HEADROOM + 10 * 32 * 32 * 4, max_batch=1000,
                      image_shapes={"vae": (32, 32), "small": (8, 8)})


def test_a_batch_that_fits_is_one_unary_call() -> None:
    plan = _Plan(np.zeros((10, 4)), "vae", None, "float32", LIMITS, stream_chunk=4096)
    assert plan.unary and plan.spans == [(0, 10)] and plan.version == 0


def test_a_bigger_batch_is_split_by_the_response_size_of_its_model() -> None:
    plan = _Plan(np.zeros((25, 4)), "vae", 3, "float32", LIMITS, stream_chunk=4096)
    assert not plan.unary and plan.spans == [(0, 10), (10, 20), (20, 25)] and plan.version == 3
    assert _Plan(np.zeros((25, 4)), "vae", None, "uint8", LIMITS, 4096).unary  # 4x smaller responses
    assert _Plan(np.zeros((150, 4)), "small", None, "float32", LIMITS, 4096).unary  # 8 x 8 images


def test_the_stream_chunk_caps_each_message() -> None:
    plan = _Plan(np.zeros((25, 4)), "vae", None, "float32", LIMITS, stream_chunk=4)
    assert plan.spans[:2] == [(0, 4), (4, 8)] and plan.spans[-1] == (24, 25)


def test_bad_arguments_fail_before_any_call() -> None:
    with pytest.raises(AevaeError, match="version: expected None"):
        _Plan(np.zeros((1, 4)), "vae", -1, "float32", LIMITS, 4096)
    with pytest.raises(AevaeError, match="dtype"):
        _Plan(np.zeros((1, 4)), "vae", None, "float16", LIMITS, 4096)


def _answer(images: np.ndarray) -> bytes:
    return decoder_pb2.DecodeResponse(model="vae", version=1, images=to_tensor(images)).SerializeToString()


def test_an_answer_that_is_not_what_was_asked_is_an_error_never_data() -> None:
    """A server that answers the wrong rows, dtype or shape, or bytes that do not parse: the caller gets
    INTERNAL saying what was wrong, never images that are not its own (nor uninitialized rows)."""
    plan = _Plan(np.zeros((3, 4)), "vae", None, "float32", LIMITS, 4096)
    good = np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)
    assert np.array_equal(plan.unary_result(_parse(_answer(good))).images, good)
    for answer, words in [(_answer(good[:2]), "shape [2, 32, 32]; asked for 3 of float32"),
                          (_answer((good * 255).astype(np.uint8)), "uint8 images"),
                          (_answer(good.reshape(3, 1024)), "shape [3, 1024]"),
                          (_answer(good)[:-10], "unreadable"),
                          (b"\xff\xff\xff", "unreadable")]:
        with pytest.raises(AevaeError, match="the server's answer is not usable: .*" + re.escape(words)) as error:
            plan.unary_result(_parse(answer))
        assert error.value.code().name == "INTERNAL"
    streamed = _Plan(np.zeros((25, 4)), "vae", None, "float32", LIMITS, 4096)
    streamed.add(_parse(_answer(np.zeros((10, 32, 32), np.float32))))
    with pytest.raises(AevaeError, match=r"response 1 holds .* \[10, 16, 64\]; asked for 10 of float32, each "
                                          r"\[32, 32\]"):
        streamed.add(_parse(_answer(np.zeros((10, 16, 64), np.float32))))


def test_an_encoder_answer_with_the_wrong_rows_or_width_is_an_error() -> None:
    def answer(mean: np.ndarray) -> encoder_pb2.EncodeResponse:
        return encoder_pb2.EncodeResponse(model="vae", version=1, mean=to_tensor(mean))

    plan = EncodePlan(np.zeros((3, 32, 32), np.uint8), "vae", None, False, None, LIMITS, 4096)
    assert plan.result([answer(np.ones((3, 4), np.float32))]).mean.shape == (3, 4)
    with pytest.raises(AevaeError, match=r"response 0: mean is float32 of shape \[2, 4\]; expected 3 rows"):
        plan.result([answer(np.ones((2, 4), np.float32))])
    broken = encoder_pb2.EncodeResponse(model="vae", version=1)
    broken.mean.dtype, broken.mean.shape[:] = "float32", [3, 4]
    with pytest.raises(AevaeError, match=r"response 0: mean.data: .* needs 48 bytes, got 0"):
        plan.result([broken])


def test_replicas_that_disagree_on_the_image_shape_are_an_error() -> None:
    out = Assembler(20)
    out.put(0, {"images": np.zeros((10, 32, 32), np.float32)})
    with pytest.raises(AevaeError, match=r"replicas disagree on images: float32 rows of \[16, 64\] at row 10"):
        out.put(10, {"images": np.zeros((10, 16, 64), np.float32)})


# -- arguments refused before any call, answers refused before they become data (issue: an outside audit) ------

LISTED = ServerLimits(max_message_bytes=HEADROOM + 10 * 32 * 32 * 4, max_batch=1000, image_shapes={"vae": (32, 32)},
                      latent_dims={"vae": 4}, versions={"vae": 1})


def test_latents_of_another_width_than_the_listed_version_takes_are_refused_and_other_versions_left_to_the_server(
        ) -> None:
    with pytest.raises(Unlisted, match=r"model 'vae' takes 4 values per row \(N x 4\), got rows of 20000"):
        _Plan(np.zeros((1, 20000)), "vae", None, "float32", LISTED, 4096)
    with pytest.raises(Unlisted):
        _Plan(np.zeros((1, 3)), "vae", 1, "float32", LISTED, 4096)
    assert _Plan(np.zeros((2, 8)), "vae", 2, "float32", LISTED, 4096).image_shape is None  # version 2: not listed


def test_an_answer_from_another_model_or_version_or_of_another_shape_than_listed_is_refused() -> None:
    plan = _Plan(np.zeros((2, 4)), "vae", None, "float32", LISTED, 4096)

    def answer(model: str, version: int, shape: tuple[int, ...]) -> bytes:
        images = np.zeros((2, *shape), np.float32)
        return decoder_pb2.DecodeResponse(model=model, version=version, images=to_tensor(images)).SerializeToString()

    with pytest.raises(AevaeError, match=r"each \[32, 32\]"):
        plan.unary_result(_parse(answer("vae", 1, (1, 1))))
    with pytest.raises(AevaeError, match=r"from model 'ae' version 1; asked for 'vae'"):
        plan.unary_result(_parse(answer("ae", 1, (32, 32))))
    pinned = _Plan(np.zeros((2, 4)), "vae", 3, "float32", LISTED, 4096)
    with pytest.raises(AevaeError, match=r"from model 'vae' version 7; asked for 'vae' version 3"):
        pinned.unary_result(_parse(answer("vae", 7, (32, 32))))
    other = _Plan(np.zeros((2, 8)), "vae", 2, "float32", LISTED, 4096)  # another version: its own shape
    assert other.unary_result(_parse(answer("vae", 2, (16, 16)))).images.shape == (2, 16, 16)


def test_encoder_messages_are_sized_by_the_model_s_latent_width() -> None:
    wide = ServerLimits(max_message_bytes=65536, max_batch=1000, image_shapes={"wide": (32, 32)},
                        latent_dims={"wide": 256}, versions={"wide": 1})
    plan = EncodePlan(np.zeros((100, 32, 32), np.uint8), "wide", None, False, None, wide, 4096)
    rows = (65536 - HEADROOM) // (3 * 4 * 256)  # mean, log-variance and sample of 256 float32 each
    assert plan.spans[0] == (0, rows) and len(plan.spans) == -(-100 // rows)


def test_an_incomplete_encoder_answer_is_an_error() -> None:
    def part(rows: int, version: int = 1, logvar: bool = True, sample: bool = True) -> encoder_pb2.EncodeResponse:
        ones = to_tensor(np.ones((rows, 4), np.float32))
        response = encoder_pb2.EncodeResponse(model="vae", version=version, mean=ones)
        if logvar:
            response.logvar.CopyFrom(ones)
        if sample:
            response.sample.CopyFrom(ones)
        return response

    asked = EncodePlan(np.zeros((2, 32, 32), np.uint8), "vae", None, True, 0, LISTED, 4096)
    with pytest.raises(AevaeError, match="response 0 carries no sample"):
        asked.result([part(2, sample=False)])
    streamed = EncodePlan(np.zeros((100, 32, 32), np.uint8), "vae", None, False, None, LISTED, 50)
    assert [stop - start for start, stop in streamed.spans] == [40, 40, 20]  # 40 images of 1 KiB a message
    for rows, logvar in ((40, True), (40, False), (20, False)):
        streamed.add(part(rows, logvar=logvar, sample=False))
    with pytest.raises(AevaeError, match="response 1 carries no logvar, which 1 of 3 carry"):
        streamed.result(streamed.parts)
    mixed = EncodePlan(np.zeros((100, 32, 32), np.uint8), "vae", None, False, None, LISTED, 50)
    mixed.add(part(40, version=1))
    with pytest.raises(AevaeError, match="response 1 is from model 'vae' version 2; asked for 'vae' version 1"):
        mixed.add(part(40, version=2))


def test_arguments_that_are_not_what_is_accepted_fail_before_any_call() -> None:
    from aevae.client import DecoderClient, EncoderClient

    with DecoderClient("127.0.0.1:1", retries=0) as dec, EncoderClient("127.0.0.1:1", retries=0) as enc:
        with pytest.raises(AevaeError, match="model: expected a model name"):
            dec.decode(np.zeros((1, 4)), 3)  # type: ignore[arg-type]
        with pytest.raises(AevaeError, match="model: expected a model name"):
            enc.latent_stats(None)  # type: ignore[arg-type]
        with pytest.raises(AevaeError, match="timeout: expected seconds"):
            dec.list_models(timeout="5")  # type: ignore[arg-type]
        with pytest.raises(AevaeError, match="latents: expected an N x d array of numbers"):
            dec.decode([[1.0, 2.0], [3.0]])
    with pytest.raises(AevaeError, match=r"seed: expected None or a whole number from 0 to 2\*\*64 - 1"):
        EncodePlan(np.zeros((1, 32, 32), np.uint8), "vae", None, True, 2 ** 64, LISTED, 4096)
    assert prepare_images(np.zeros((2, 32, 32), ">f8")).dtype == np.float32  # big-endian float64: narrowed


def test_a_closed_client_refuses_calls_with_an_aevae_error_and_closes_twice() -> None:
    from aevae.client import AsyncDecoderClient, DecoderClient

    client = DecoderClient("127.0.0.1:1", token="t", retries=0)  # a token: the intercepted channel
    client.close()
    for call in (lambda: client.decode(np.zeros((1, 4))), client.health, client.list_models):
        with pytest.raises(AevaeError, match="is closed; make a new one") as error:
            call()
        assert error.value.code().name == "FAILED_PRECONDITION"
    client.close()

    async def closed_async() -> None:
        aclient = AsyncDecoderClient("127.0.0.1:1", retries=0)
        await aclient.close()
        with pytest.raises(AevaeError, match="is closed"):
            await aclient.decode(np.zeros((1, 4)))
        await aclient.close()

    asyncio.run(closed_async())


def test_small_pieces_of_the_client_contract() -> None:
    import copy
    import pickle

    import grpc

    from aevae.client.credentials import ChannelSecurity
    from aevae.client.fanout import _newest
    from aevae.client.results import ModelInfo, latent_stats

    error = AevaeError(grpc.StatusCode.NOT_FOUND, "no model 'x'")  # gRPC copies a failed call's response
    for twin in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert (twin.code(), twin.details(), str(twin)) == (error.code(), error.details(), str(error))
    assert ChannelSecurity.resolve(token="secret\n", env={}).token == "secret"  # open(f).read() keeps the newline
    with pytest.raises(AevaeError, match="printable ASCII"):
        ChannelSecurity.resolve(token="se\x01cret", env={})
    assert broken(AevaeError(grpc.StatusCode.INTERNAL, "Internal error from Core"))  # grpc.aio's cut stream
    assert not broken(AevaeError(grpc.StatusCode.INTERNAL, "the model produced NaN"))
    assert _newest([ModelInfo(name="vae", version=0, versions=[], kind="vae", latent_dim=4, image_shape=(32, 32),
                              metrics={}, runtime="", broken={1: "checksum"})], "vae") is None  # none loads
    with pytest.raises(AevaeError, match="the latent statistics: pca.components"):
        latent_stats(encoder_pb2.LatentStats(model="vae", version=1))


@pytest.mark.parametrize("target", ["127.0.0.1:99999", "[::1]:70000", "dns:///decoders.example:65536",
                                    "a:1,localhost:100000", "localhost", "127.0.0.1:", "127.0.0.1:-1", "127.0.0.1:0",
                                    "host:notaport", "[::1", "http://h:50052", "h:50052/", ":50052", "[]:50052"])
def test_a_target_that_is_no_host_port_is_refused_not_guessed(target: str) -> None:
    """gRPC would read 99999 as 34463 and call whatever listens there, "localhost" and "host:" as port 443,
    -1 as 65535; "host:notaport" and the like failed every call as UNAVAILABLE, which callers retry, and in a
    fleet such a replica was left out without a word."""
    from aevae.client import DecoderClient
    from aevae.client.fanout import parse_targets

    with pytest.raises(AevaeError) as error:
        parse_targets(target)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected host:port with a port from 1 to 65535" in error.value.details()
    with pytest.raises(AevaeError, match="expected host:port"):
        DecoderClient(["127.0.0.1:50052", target])


def test_ports_up_to_65535_and_other_target_forms_pass() -> None:
    from aevae.client.fanout import parse_targets

    assert parse_targets("127.0.0.1:65535, [::1]:50052, unix:/tmp/aevae.sock") == [
        "127.0.0.1:65535", "[::1]:50052", "unix:/tmp/aevae.sock"]


@pytest.mark.parametrize("argument, value", [("tls_ca", 5), ("token_file", 3), ("tls", "no"), ("token", b"x"),
                                             ("security", "x")])
def test_credential_arguments_of_another_type_are_refused(argument: str, value: object) -> None:
    """tls_ca=5 was a TypeError from pathlib, security="x" an AttributeError, and tls="no" turned TLS on."""
    from aevae.client import DecoderClient

    with pytest.raises(AevaeError) as error:
        DecoderClient("127.0.0.1:50052", **{argument: value})  # type: ignore[arg-type]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error.value.details().startswith(argument)


def test_arrays_of_another_rank_are_refused_before_any_call_and_numpy_dtypes_are_taken() -> None:
    """A 5000 x 4 x 1 batch, over the message size, heard "split the batch into smaller messages" from the
    server, advice that could not help: it is no N x d batch. np.uint8 (the type) was refused, np.dtype not."""
    from aevae.client.core import output_dtype, prepare_images, prepare_latents

    with pytest.raises(AevaeError, match=r"latents: expected an N x d array \(or one d-vector\), got shape \[5000, 4, 1\]"):
        prepare_latents(np.zeros((5000, 4, 1), np.float32))
    with pytest.raises(AevaeError, match=r"images: expected an N x H x W array .* got shape \[2, 1, 28, 28\]"):
        prepare_images(np.zeros((2, 1, 28, 28), np.uint8))
    with pytest.raises(AevaeError, match=r"got shape \[784\]"):
        prepare_images(np.zeros(784, np.uint8))
    assert prepare_images(np.zeros((28, 28), np.uint8)).shape == (1, 28, 28)
    assert output_dtype(np.uint8) == output_dtype("uint8") == np.dtype(np.uint8)
    assert output_dtype(np.float32) == np.dtype(np.float32)
    assert output_dtype("u1") == output_dtype(np.dtype("u1")) and output_dtype("<f4") == np.dtype(np.float32)
    for refused in ("float64", ">f4", "", None, 5):
        with pytest.raises(AevaeError, match="dtype: expected 'float32' or 'uint8'"):
            output_dtype(refused)  # type: ignore[arg-type]


def test_inputs_numpy_would_send_wrongly_are_refused_saying_what_to_do() -> None:
    """A masked value was sent as the value under its mask; float64 past float32's range became inf (numpy's
    overflow warning, then "expected finite values"); a frame's nullable columns were refused as "object"; a
    torch tensor that requires grad escaped as torch's RuntimeError; a NaN in a batch split into messages was
    named by its place in one message."""
    import warnings

    from aevae.client.core import prepare_images, prepare_latents

    with pytest.raises(AevaeError, match="masked array with masked values; fill them"):
        prepare_latents(np.ma.masked_array(np.ones((2, 4)), mask=np.eye(2, 4)))
    assert prepare_latents(np.ma.masked_array(np.ones((2, 4)))).dtype == np.float32  # nothing masked: taken
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        far = np.zeros((3, 4))
        far[2, 1] = -1e39
        with pytest.raises(AevaeError, match=r"latents: -1e\+39 at index \[2, 1\] is beyond float32's range"):
            prepare_latents(far)
        with pytest.raises(AevaeError, match=r"images: 1e\+300 at index \[0, 0, 0\] is beyond float32's range"):
            prepare_images(np.full((1, 4, 4), 1e300))
    with pytest.raises(AevaeError, match=r"got Python objects .* frame.to_numpy\('float32'\)"):
        prepare_latents(np.array([[1.0, None]], dtype=object))
    with pytest.raises(AevaeError, match="INVALID_ARGUMENT: latents: expected finite values, got inf at index \\[7000, 0\\]"):
        big = np.zeros((8000, 4), np.float32)
        big[7000, 0] = np.inf
        prepare_latents(big)
    torch = pytest.importorskip("torch")
    with pytest.raises(AevaeError, match="INVALID_ARGUMENT: .*requires grad"):
        prepare_latents(torch.zeros(2, 4, requires_grad=True))


def test_a_stream_message_s_refusal_is_said_of_the_caller_s_rows() -> None:
    from aevae.client.core import located

    parts = [(0, 10), (10, 20), (20, 25)]
    refused = AevaeError(grpc.StatusCode.INVALID_ARGUMENT, "message 1: latents: row 3 holds [2e4]")
    assert located(refused, parts, 0, "latents").details() == (
        "latents 10 to 19 of the batch, sent as message 1 (a position below counts from 10): latents: row 3 holds [2e4]")
    assert located(refused, parts, 1, "latents").details().startswith("latents 20 to 24 of the batch, sent as message 2")
    assert located(refused, parts, 2, "latents") is refused  # no such message: left as the server said it
    other = AevaeError(grpc.StatusCode.NOT_FOUND, "unknown model 'gan'")
    assert located(other, parts, 0, "latents") is other
    cut = AevaeError(grpc.StatusCode.UNAVAILABLE, "Socket closed")
    assert located(cut, parts, 0, "latents") is cut  # nothing answered: gRPC's words, with the client's hints
    assert located(cut, parts, 2, "latents", answered=2).details().startswith(
        "Socket closed (the stream broke after 2 of 3 answers and could not be resumed")


def test_a_client_and_its_token_file_pickle_without_a_connection(tmp_path) -> None:
    import pickle

    from aevae.client import AsyncDecoderClient, DecoderClient

    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with DecoderClient("127.0.0.1:1", timeout=7, retries=1, token_file=str(token)) as client:
        copy = pickle.loads(pickle.dumps(client))
    with copy:
        assert (copy.target, copy.timeout, copy._retry.retries) == ("127.0.0.1:1", 7, 1)
        assert copy.security.current_token() == "s3cret"

    async def in_a_loop() -> str:
        async with AsyncDecoderClient("127.0.0.1:1,127.0.0.1:2") as fan:
            async with pickle.loads(pickle.dumps(fan)) as again:
                return again.target

    assert asyncio.run(in_a_loop()) == "127.0.0.1:1,127.0.0.1:2"


class _Cut(grpc.RpcError):
    """What gRPC raises for a stream cut by its server going away."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the replica died before answering"


def test_a_stream_cut_before_its_first_answer_starts_over_up_to_retries_times() -> None:
    """gRPC retries a stream only while what it sent fits its retry buffer (256 KiB): a big call cut before
    its first answer (its Ray Serve replica killed) failed UNAVAILABLE although the error said it may be
    retried. It now starts over, `retries` times at most; one that was answered in part resumes as before."""
    from aevae.client.core import Retry, restarts_big

    calls: list[int] = []

    def cut_twice(timeout: float | None) -> str:
        calls.append(1)
        if len(calls) <= 2:
            raise _Cut()
        return "images"

    assert Retry(3, 0.001).resumable(cut_twice, progress=lambda: 0, timeout=10, restart=True) == "images"
    assert len(calls) == 3

    def always_cut(timeout: float | None) -> str:
        calls.append(1)
        raise _Cut()

    calls.clear()
    with pytest.raises(AevaeError) as failed:
        Retry(3, 0.001).resumable(always_cut, progress=lambda: 0, timeout=10, restart=True)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and len(calls) == 4  # the call and 3 restarts
    calls.clear()
    with pytest.raises(AevaeError):  # small enough for gRPC's retry buffer: gRPC retried it already
        Retry(3, 0.001).resumable(always_cut, progress=lambda: 0, timeout=10)
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(AevaeError):
        Retry(0, 0.001).resumable(always_cut, progress=lambda: 0, timeout=10, restart=True)  # a fan-out's replica
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(AevaeError):  # answered in part and cannot resume (a seeded sample): never started over
        Retry(3, 0.001).resumable(always_cut, progress=lambda: 0, timeout=10, answered=lambda: True, restart=True)
    assert len(calls) == 1

    async def cut_once() -> str:
        calls.clear()

        async def attempt(timeout: float | None) -> str:
            calls.append(1)
            if len(calls) == 1:
                raise _Cut()
            return "images"

        return await Retry(3, 0.001).resumable_async(attempt, progress=lambda: 0, timeout=10, restart=True)

    assert asyncio.run(cut_once()) == "images" and len(calls) == 2
    assert restarts_big(20_000 * 784) and not restarts_big(100 * 16)
