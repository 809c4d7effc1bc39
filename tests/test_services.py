"""The encoder and decoder services as real processes: statuses, limits, streaming order, reflection,
new versions without a restart, and graceful shutdown. Raw stubs, so that requests can be wrong on purpose."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aevae.services.process import ServiceProcess
from helpers import running
from aevae.v1 import decoder_pb2, decoder_pb2_grpc, encoder_pb2, encoder_pb2_grpc, tensor_pb2
from aevae.v1.tensors import from_tensor, to_tensor

MAX_MESSAGE = 65536
MAX_BATCH = 1000
LIMITS = ["--max-message-bytes", str(MAX_MESSAGE), "--max-batch", str(MAX_BATCH), "--refresh-seconds", "0.2"]


@pytest.fixture(scope="module")
def repo(trained_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy: the last test of the module adds a version to it."""
    copy = tmp_path_factory.mktemp("services") / "models"
    shutil.copytree(trained_repo, copy)
    return copy


@pytest.fixture(scope="module")
def servers(repo: Path) -> Iterator[dict[str, ServiceProcess]]:
    with running(repo, LIMITS) as started:
        yield started


@pytest.fixture(scope="module")
def dec(servers: dict[str, ServiceProcess]) -> Iterator[decoder_pb2_grpc.DecoderStub]:
    with grpc.insecure_channel(servers["decoder"].address) as channel:
        yield decoder_pb2_grpc.DecoderStub(channel)


@pytest.fixture(scope="module")
def enc(servers: dict[str, ServiceProcess]) -> Iterator[encoder_pb2_grpc.EncoderStub]:
    with grpc.insecure_channel(servers["encoder"].address) as channel:
        yield encoder_pb2_grpc.EncoderStub(channel)


@pytest.fixture(scope="module")
def vae(trained_repo: Path):
    from aevae.store import ModelStore

    return ModelStore(trained_repo).get("vae")


def latents(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def decode_request(array: np.ndarray, model: str = "vae", **kw) -> decoder_pb2.DecodeRequest:
    return decoder_pb2.DecodeRequest(model=model, latents=to_tensor(array), **kw)


def raw(dtype: str, shape: list[int], data: bytes) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def assert_still_serving(dec, enc) -> None:
    out = dec.Decode(decode_request(latents(3)))
    assert from_tensor(out.images, "images").shape == (3, 32, 32)
    out = enc.Encode(encoder_pb2.EncodeRequest(model="ae", images=to_tensor(np.zeros((2, 28, 28), np.uint8))))
    assert from_tensor(out.mean, "mean").shape == (2, 4)


def nan_latents() -> np.ndarray:
    z = latents(2)
    z[1, 2] = np.nan
    return z


BAD_DECODES = {
    "rank": (raw("float32", [4], np.zeros(4, np.float32).tobytes()), "", "latents.shape: model 'vae' expects N x 4 latents, got [4]"),
    "latent dim": (to_tensor(latents(2)[:, :3]), "", "expects N x 4 latents, got [2, 3]"),
    "byte length": (raw("float32", [2, 4], b"\0" * 12), "", "latents.data: shape [2, 4] of float32 needs 32 bytes, got 12"),
    "nan": (to_tensor(nan_latents()), "", "latents: expected finite values, got nan at index [1, 2]"),
    "inf": (to_tensor(np.full((1, 4), np.inf, np.float32)), "", "latents: expected finite values, got inf"),
    "unknown dtype": (raw("float64", [1, 4], b"\0" * 32), "", "latents.dtype: expected float32, got 'float64'"),
    "uint8 latents": (to_tensor(np.zeros((1, 4), np.uint8)), "", "latents.dtype: expected float32, got 'uint8'"),
    "output dtype": (to_tensor(latents(1)), "int8", "dtype: expected float32 or uint8 (or empty for float32), got 'int8'"),
}


@pytest.mark.parametrize("case", list(BAD_DECODES))
def test_bad_latents_are_invalid_argument_and_the_server_keeps_serving(dec, enc, case: str) -> None:
    tensor, dtype, message = BAD_DECODES[case]
    with pytest.raises(grpc.RpcError) as info:
        dec.Decode(decoder_pb2.DecodeRequest(model="vae", latents=tensor, dtype=dtype))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    assert_still_serving(dec, enc)


def float_images(n: int, value: float = 0.5, size: int = 32) -> np.ndarray:
    return np.full((n, size, size), value, np.float32)


BAD_ENCODES = {
    "rank": (to_tensor(np.zeros((32, 32), np.uint8)), "images.shape: expected N x 32 x 32 or N x 28 x 28, got [32, 32]"),
    "shape": (to_tensor(np.zeros((2, 30, 30), np.uint8)), "expected N x 32 x 32 or N x 28 x 28, got [2, 30, 30]"),
    "byte length": (raw("uint8", [1, 28, 28], b"\0" * 700), "images.data: shape [1, 28, 28] of uint8 needs 784 bytes, got 700"),
    "nan": (to_tensor(float_images(1, np.nan)), "images: expected finite values, got nan"),
    "range": (to_tensor(float_images(1, 255.0)), "images: float32 pixels must lie in [0, 1] (send uint8 for 0..255)"),
    "unknown dtype": (to_tensor(np.zeros((1, 32, 32), np.int32)), "images.dtype: expected float32 or uint8, got 'int32'"),
    "no dtype": (raw("", [1, 32, 32], b""), "images.dtype: expected float32 or uint8, got no dtype"),
}


@pytest.mark.parametrize("case", list(BAD_ENCODES))
def test_bad_images_are_invalid_argument_and_the_server_keeps_serving(dec, enc, case: str) -> None:
    tensor, message = BAD_ENCODES[case]
    with pytest.raises(grpc.RpcError) as info:
        enc.Encode(encoder_pb2.EncodeRequest(model="vae", images=tensor))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    assert_still_serving(dec, enc)


def test_model_and_version_must_be_named_sensibly(dec, enc) -> None:
    with pytest.raises(grpc.RpcError) as info:
        dec.Decode(decode_request(latents(1), model=""))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model: expected a model name" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        enc.Encode(encoder_pb2.EncodeRequest(model="vae", version=-1, images=to_tensor(float_images(1))))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "version: expected 0" in info.value.details()


def test_unknown_model_and_version_are_not_found_listing_what_exists(dec, enc) -> None:
    calls = {
        "decode model": lambda: dec.Decode(decode_request(latents(1), model="gan")),
        "decode version": lambda: dec.Decode(decode_request(latents(1), version=9)),
        "encode model": lambda: enc.Encode(encoder_pb2.EncodeRequest(model="gan", images=to_tensor(float_images(1)))),
        "stats version": lambda: enc.GetLatentStats(encoder_pb2.GetLatentStatsRequest(model="ae", version=9)),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, name
        assert "available: ae: 1; vae: 1" in info.value.details(), name
    assert_still_serving(dec, enc)


def test_limits_are_resource_exhausted_with_the_limit_in_the_message(dec, enc) -> None:
    with pytest.raises(grpc.RpcError) as info:  # the response (100 x 4 KiB) would not fit one message
        dec.Decode(decode_request(latents(100)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"max message size of {MAX_MESSAGE} bytes" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # more rows than one request may hold
        dec.Decode(decode_request(latents(MAX_BATCH + 1), dtype="uint8"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"maximum batch per request of {MAX_BATCH}" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # a request bigger than the message limit: gRPC's own check
        enc.Encode(encoder_pb2.EncodeRequest(model="vae", images=to_tensor(float_images(20))))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_MESSAGE) in info.value.details()
    assert_still_serving(dec, enc)


def test_decode_stream_answers_every_message_in_order(dec, vae) -> None:
    sizes = [1, 7, 13, 2, 9, 0, 5, 11]
    chunks = [latents(n, seed=i) for i, n in enumerate(sizes)]
    responses = list(dec.DecodeStream(iter([decode_request(c) for c in chunks])))
    assert [r.version for r in responses] == [1] * len(sizes)
    for chunk, response in zip(chunks, responses, strict=True):
        images = from_tensor(response.images, "images")
        assert images.shape == (len(chunk), 32, 32)
        np.testing.assert_allclose(images, vae.decode(chunk), atol=1e-5)


def test_a_stream_error_names_the_failing_message(dec, enc) -> None:
    requests = [decode_request(latents(2)), decode_request(latents(2)[:, :3]), decode_request(latents(2))]
    with pytest.raises(grpc.RpcError) as info:
        list(dec.DecodeStream(iter(requests)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("message 1: latents.shape")
    assert_still_serving(dec, enc)


def test_list_models_reports_kinds_dims_metrics_and_limits(dec, enc) -> None:
    for stub in (dec, enc):
        response = stub.ListModels(tensor_pb2.ListModelsRequest())
        models = {m.name: m for m in response.models}
        assert sorted(models) == ["ae", "vae"]
        assert models["vae"].kind == "vae" and models["ae"].kind == "ae"
        assert models["vae"].latent_dim == 4 and list(models["vae"].versions) == [1]
        assert list(models["vae"].image_shape) == [32, 32]
        assert models["vae"].metrics["test_bce"] > 0
        assert response.limits.max_message_bytes == MAX_MESSAGE and response.limits.max_batch == MAX_BATCH


def test_health_and_reflection_need_no_proto_files(servers) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    for kind, service in (("encoder", "aevae.v1.Encoder"), ("decoder", "aevae.v1.Decoder")):
        with grpc.insecure_channel(servers[kind].address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            database = ProtoReflectionDescriptorDatabase(channel)
            assert service in database.get_services() and "grpc.health.v1.Health" in database.get_services()
            described = database.FindFileContainingSymbol(service)
            methods = [m.name for s in described.service for m in s.method]
            assert "ListModels" in methods and ("DecodeStream" in methods or "EncodeStream" in methods)


def test_reflection_answers_under_v1_as_well_as_v1alpha(servers) -> None:
    """grpcurl, Postman and grpcui ask grpc.reflection.v1 first: it answers, with v1alpha's messages (the
    same on the wire), listing the services and describing the API."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    with grpc.insecure_channel(servers["decoder"].address) as channel:
        for version in ("v1", "v1alpha"):
            reflect = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            listed, described = reflect(iter([
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="aevae.v1.Decoder")]), timeout=10)
            assert "aevae.v1.Decoder" in {s.name for s in listed.list_services_response.service}
            files = described.file_descriptor_response.file_descriptor_proto
            assert any(b"DecodeStream" in f for f in files), version
            # the reflection service itself, under the name the client used: listed and described
            own = f"grpc.reflection.{version}.ServerReflection"
            assert own in {s.name for s in listed.list_services_response.service}, version
            [itself] = reflect(iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=own)]), timeout=10)
            [proto] = itself.file_descriptor_response.file_descriptor_proto
            file = descriptor_pb2.FileDescriptorProto.FromString(proto)
            assert file.package == f"grpc.reflection.{version}", version
            assert {m.input_type for s in file.service for m in s.method} == {f".{file.package}.ServerReflectionRequest"}


def test_encode_sample_is_seeded_and_the_ae_has_no_log_variance(enc) -> None:
    images = to_tensor(np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8))
    first, again, other = (enc.Encode(encoder_pb2.EncodeRequest(model="vae", images=images, sample=True, seed=s))
                           for s in (7, 7, 8))
    assert from_tensor(first.sample, "s").tobytes() == from_tensor(again.sample, "s").tobytes()
    assert not np.allclose(from_tensor(first.sample, "s"), from_tensor(other.sample, "s"))
    ae = enc.Encode(encoder_pb2.EncodeRequest(model="ae", images=images))
    assert ae.HasField("mean") and not ae.HasField("logvar") and not ae.HasField("sample")


def test_a_new_version_is_served_without_a_restart(repo: Path, dec) -> None:
    """Last in the module: it adds vae/2 (a copy of vae/1, renamed into place as the trainer does)."""
    staging = repo / "vae" / ".incoming-test"
    shutil.copytree(repo / "vae" / "1", staging)
    os.rename(staging, repo / "vae" / "2")
    names = {m.name: m for m in dec.ListModels(tensor_pb2.ListModelsRequest()).models}
    assert list(names["vae"].versions) == [1, 2] and names["vae"].version == 2
    assert dec.Decode(decode_request(latents(1))).version == 2
    assert dec.Decode(decode_request(latents(1), version=1)).version == 1


def test_sigterm_turns_health_not_serving_lets_calls_in_flight_finish_and_exits_0(trained_repo: Path) -> None:
    """Also: the health Watch, told NOT_SERVING, then ends (UNAVAILABLE): one left open made every SIGTERM wait
    out the whole --grace (11.8 s against 1.5 s without it)."""
    import time

    service = ServiceProcess("decoder", trained_repo, args=["--shutdown-delay", "0.5", "--grace", "30"]).start()
    try:
        service.wait_healthy()
        with grpc.insecure_channel(service.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            chunks = [latents(2000, seed=i) for i in range(12)]
            stream = decoder_pb2_grpc.DecoderStub(channel).DecodeStream(
                iter([decode_request(c, dtype="uint8") for c in chunks]))
            first = next(stream)  # the stream is in flight
            started = time.monotonic()
            service.signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            rest = list(stream)
            assert len(rest) == len(chunks) - 1
            assert [len(from_tensor(r.images, "i")) for r in (first, *rest)] == [2000] * len(chunks)
            with pytest.raises(grpc.RpcError) as ended:
                next(watch)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in ended.value.details()
            assert service.process.wait(60) == 0  # the watch's channel still open
            assert time.monotonic() - started < 15, "the drain waited out the grace for the watch"
    finally:
        service.stop()


def test_sigterm_right_after_the_start_does_not_wait_for_every_model_to_load(trained_repo: Path,
                                                                             tmp_path: Path) -> None:
    """Preloading ran as one job of the executor, which the shutdown waited for: every model of the repository
    loaded before the process could exit, whatever --grace said (60 models: 5.2 s)."""
    import time

    models = tmp_path / "models"
    for i in range(40):  # hard links: 40 models of the trained size, loaded one after the other
        shutil.copytree(trained_repo / "vae" / "1", models / f"m{i}" / "1", copy_function=os.link)
    service = ServiceProcess("decoder", models, args=["--grace", "0", "--shutdown-delay", "0"]).start()
    try:
        started = time.monotonic()
        service.signal(signal.SIGTERM)
        assert service.process.wait(60) == 0
        assert time.monotonic() - started < 1.5, "".join(service.output)
    finally:
        service.stop()
