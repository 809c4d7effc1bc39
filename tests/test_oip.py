"""The Open Inference Protocol v2 on both services, through tritonclient (sync and asyncio) against real
server processes: metadata from the manifests, inference for both models in both datatypes equal to
aevae.v1's, typed contents, clear statuses for bad inputs, streaming, and readiness during shutdown."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from aevae.client import DecoderClient, EncoderClient
from aevae.services.process import ServiceProcess
from helpers import oip_tensor, running, write_tiny_set

MAX_BATCH = 500
ARGS = ["--max-batch", str(MAX_BATCH), "--shutdown-delay", "0"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ae/1, vae/1 (32 x 32, 4-d) and vae8/1 (24 x 20, 8-d): shapes must come from the manifest."""
    return write_tiny_set(tmp_path_factory.mktemp("oip") / "models")


@pytest.fixture(scope="module")
def servers(repo: Path) -> Iterator[dict[str, ServiceProcess]]:
    with running(repo, ARGS) as started:
        yield started


@pytest.fixture(scope="module")
def enc(servers: dict[str, ServiceProcess]) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(servers["encoder"].address) as client:
        yield client


@pytest.fixture(scope="module")
def dec(servers: dict[str, ServiceProcess]) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(servers["decoder"].address) as client:
        yield client


tensor = oip_tensor  # the one helper, in helpers.py


def images(n: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def latents(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def status(error: InferenceServerException) -> str:
    return str(error.status())


def test_metadata_readiness_and_index(enc: triton.InferenceServerClient, dec: triton.InferenceServerClient) -> None:
    for client, kind in ((enc, "encoder"), (dec, "decoder")):
        assert client.is_server_live() and client.is_server_ready()
        assert client.get_server_metadata().name == f"aevae-{kind}"
        assert client.is_model_ready("vae8") and client.is_model_ready("ae", "1")
        assert not client.is_model_ready("gan") and not client.is_model_ready("vae", "7")
        index = client.get_model_repository_index()
        assert {(m.name, m.version, m.state) for m in index.models} == {
            ("ae", "1", "READY"), ("vae", "1", "READY"), ("vae8", "1", "READY")}

    def shapes(meta: Any) -> dict[str, tuple[str, list[int]]]:
        return {t.name: (t.datatype, list(t.shape)) for t in [*meta.inputs, *meta.outputs]}

    meta = enc.get_model_metadata("vae8")
    assert (meta.name, list(meta.versions)) == ("vae8", ["1"])
    assert shapes(meta) == {"images": ("UINT8", [-1, 24, 20]), "mean": ("FP32", [-1, 8]),
                            "logvar": ("FP32", [-1, 8]), "sample": ("FP32", [-1, 8])}
    assert "logvar" not in shapes(enc.get_model_metadata("ae"))
    assert shapes(dec.get_model_metadata("vae8", "1")) == {"latents": ("FP32", [-1, 8]),
                                                           "images": ("FP32", [-1, 24, 20])}
    config = dec.get_model_config("vae").config
    assert [list(i.dims) for i in config.input] == [[-1, 4]] and [list(o.dims) for o in config.output] == [[-1, 32, 32]]
    with pytest.raises(InferenceServerException) as err:
        dec.get_model_metadata("gan")
    assert status(err.value) == "StatusCode.NOT_FOUND" and "available" in err.value.message()


@pytest.mark.parametrize("model,shape", [("vae", (32, 32)), ("vae", (28, 28)), ("ae", (32, 32)), ("vae8", (24, 20))])
def test_encode_equals_aevae_v1(servers: dict[str, ServiceProcess], enc: triton.InferenceServerClient, model: str,
                                shape: tuple[int, int]) -> None:
    x = images(5, shape)
    with EncoderClient(servers["encoder"].address) as v1:
        expected = v1.encode(x, model=model, sample=True, seed=3)
    for datatype, array in (("UINT8", x), ("FP32", x.astype(np.float32) / 255)):
        result = enc.infer(model, [tensor("images", array, datatype)], parameters={"sample": True, "seed": 3})
        assert result.get_response().model_version == str(expected.version)
        np.testing.assert_allclose(result.as_numpy("mean"), expected.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.as_numpy("sample"), expected.sample, rtol=1e-5, atol=1e-6)
        if expected.logvar is None:
            assert result.as_numpy("logvar") is None
        else:
            np.testing.assert_allclose(result.as_numpy("logvar"), expected.logvar, rtol=1e-5, atol=1e-6)
    only = enc.infer(model, [tensor("images", x, "UINT8")], outputs=[triton.InferRequestedOutput("mean")])
    assert [o.name for o in only.get_response().outputs] == ["mean"]


@pytest.mark.parametrize("model,d", [("vae", 4), ("ae", 4), ("vae8", 8)])
def test_decode_equals_aevae_v1(servers: dict[str, ServiceProcess], dec: triton.InferenceServerClient, model: str,
                                d: int) -> None:
    z = latents(7, d)
    with DecoderClient(servers["decoder"].address) as v1:
        for dtype, datatype in (("float32", "FP32"), ("uint8", "UINT8")):
            expected = v1.decode(z, model=model, dtype=dtype)
            result = dec.infer(model, [tensor("latents", z, "FP32")], parameters={"dtype": datatype})
            got = result.as_numpy("images")
            assert got.dtype == expected.dtype and got.shape == expected.shape
            np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=1e-5,
                                       atol=1e-6 if dtype == "float32" else 1)


def test_typed_contents(servers: dict[str, ServiceProcess]) -> None:
    """The typed `contents` fields in, typed contents out; the same numbers as raw."""
    z = latents(2, 4)
    x = images(2, (28, 28))
    with grpc.insecure_channel(servers["decoder"].address) as d_channel, \
            grpc.insecure_channel(servers["encoder"].address) as e_channel:
        dec = service_pb2_grpc.GRPCInferenceServiceStub(d_channel)
        enc = service_pb2_grpc.GRPCInferenceServiceStub(e_channel)
        typed = service_pb2.ModelInferRequest(model_name="vae", model_version="1")
        typed.inputs.add(name="latents", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend(z.ravel().tolist())
        raw = service_pb2.ModelInferRequest(model_name="vae", raw_input_contents=[z.tobytes()])
        raw.inputs.add(name="latents", datatype="FP32", shape=[2, 4])
        typed_out, raw_out = dec.ModelInfer(typed), dec.ModelInfer(raw)
        assert not typed_out.raw_output_contents and list(typed_out.outputs[0].shape) == [2, 32, 32]
        np.testing.assert_allclose(np.array(typed_out.outputs[0].contents.fp32_contents, np.float32),
                                   np.frombuffer(raw_out.raw_output_contents[0], np.float32), rtol=1e-5, atol=1e-6)

        request = service_pb2.ModelInferRequest(model_name="ae")
        request.inputs.add(name="images", datatype="UINT8", shape=[2, 28, 28]).contents.uint_contents.extend(
            x.ravel().tolist())
        out = enc.ModelInfer(request)
        with EncoderClient(servers["encoder"].address) as v1:
            np.testing.assert_allclose(np.array(out.outputs[0].contents.fp32_contents).reshape(2, 4),
                                       v1.encode(x, model="ae").mean, rtol=1e-5, atol=1e-6)
        request.inputs[0].contents.uint_contents[0] = 256
        with pytest.raises(grpc.RpcError) as err:
            enc.ModelInfer(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "0..255" in (err.value.details() or "")


def test_bad_inputs_get_clear_statuses(servers: dict[str, ServiceProcess], enc: triton.InferenceServerClient,
                                       dec: triton.InferenceServerClient) -> None:
    z = latents(2, 4)
    cases: list[tuple[Any, dict[str, Any], str, str]] = [
        (dec, dict(model_name="vae", inputs=[tensor("z", z, "FP32")]), "INVALID_ARGUMENT", "named 'latents'"),
        (dec, dict(model_name="vae", inputs=[tensor("latents", z.astype(np.float64), "FP64")]), "INVALID_ARGUMENT",
         "expected FP32"),
        (dec, dict(model_name="vae8", inputs=[tensor("latents", z, "FP32")]), "INVALID_ARGUMENT", "N x 8"),
        (dec, dict(model_name="gan", inputs=[tensor("latents", z, "FP32")]), "NOT_FOUND", "available"),
        (dec, dict(model_name="vae", model_version="9", inputs=[tensor("latents", z, "FP32")]), "NOT_FOUND",
         "no version 9"),
        (dec, dict(model_name="vae", model_version="x", inputs=[tensor("latents", z, "FP32")]), "INVALID_ARGUMENT",
         "model_version"),
        (dec, dict(model_name="vae", inputs=[tensor("latents", latents(MAX_BATCH + 1, 4), "FP32")]),
         "RESOURCE_EXHAUSTED", str(MAX_BATCH)),
        (dec, dict(model_name="vae", inputs=[tensor("latents", z * np.inf, "FP32")]), "INVALID_ARGUMENT", "finite"),
        (dec, dict(model_name="vae", inputs=[tensor("latents", z, "FP32")], parameters={"dtype": "FP16"}),
         "INVALID_ARGUMENT", "parameters.dtype"),
        (enc, dict(model_name="ae", inputs=[tensor("images", images(1, (32, 32)), "UINT8")],
                   outputs=[triton.InferRequestedOutput("logvar")]), "INVALID_ARGUMENT", "logvar"),
        (enc, dict(model_name="vae", inputs=[tensor("images", images(1, (30, 30)), "UINT8")]), "INVALID_ARGUMENT",
         "N x 32 x 32 or N x 28 x 28"),
        (enc, dict(model_name="vae", inputs=[tensor("images", np.full((1, 32, 32), 2, np.float32), "FP32")]),
         "INVALID_ARGUMENT", "[0, 1]"),
        (enc, dict(model_name="vae", inputs=[tensor("images", images(1, (32, 32)), "UINT8")],
                   parameters={"sample": "yes"}), "INVALID_ARGUMENT", "parameters.sample"),
    ]
    for client, kwargs, code, words in cases:
        with pytest.raises(InferenceServerException) as err:
            client.infer(**kwargs)
        assert status(err.value) == f"StatusCode.{code}", (kwargs, err.value)
        assert words in err.value.message(), (kwargs, err.value.message())
    # raw bytes that do not match the shape (tritonclient cannot send these: a raw stub)
    request = service_pb2.ModelInferRequest(model_name="vae", raw_input_contents=[z.tobytes()[:-4]])
    request.inputs.add(name="latents", datatype="FP32", shape=[2, 4])
    with grpc.insecure_channel(servers["decoder"].address) as channel:
        with pytest.raises(grpc.RpcError) as rpc_err:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert rpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 32 bytes" in (rpc_err.value.details() or "")
    assert dec.infer("vae", [tensor("latents", z, "FP32")]).as_numpy("images").shape == (2, 32, 32)  # still serving


def raw_request(z: np.ndarray, **fields: Any) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="vae", raw_input_contents=[z.tobytes()], **fields)
    request.inputs.add(name="latents", datatype="FP32", shape=list(z.shape))
    return request


def test_malformed_fields_are_invalid_argument(servers: dict[str, ServiceProcess]) -> None:
    """Fields a fuzzer sends: versions that are digits to Python but not version numbers, shapes numpy cannot
    describe, an output named twice (an answer past its admitted size), raw and typed contents together.
    Each gets INVALID_ARGUMENT naming the field, never INTERNAL or UNKNOWN, and nothing in the log."""
    z = latents(2, 4)
    with grpc.insecure_channel(servers["decoder"].address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        cases: list[tuple[Any, Any, str]] = []
        for version in ("²", "١", "01", "00", "9" * 5000, "-1"):
            cases += [(stub.ModelInfer, raw_request(z, model_version=version), "model_version"),
                      (stub.ModelMetadata, service_pb2.ModelMetadataRequest(name="vae", version=version),
                       "model_version"),
                      (stub.ModelReady, service_pb2.ModelReadyRequest(name="vae", version=version), "model_version")]
        for shape in ([0, 2**62, 2**62], [2**40, 0], [2, 4, 1], [2] * 70):
            request = raw_request(np.zeros(0, np.float32))
            request.inputs[0].shape[:] = shape
            cases.append((stub.ModelInfer, request, "latents.shape"))
        twice = raw_request(z)
        twice.outputs.add(name="images")
        twice.outputs.add(name="images")
        cases.append((stub.ModelInfer, twice, "named more than once"))
        both = raw_request(z)
        both.inputs[0].contents.fp32_contents.extend(z.ravel().tolist())
        cases.append((stub.ModelInfer, both, "not both"))
        # 2,000,000 empty inputs (4 MB, 180 MB parsed) and 40,000 outputs named alike (19 s of the event loop
        # at one time): refused on their bytes, before any parse
        crowded = raw_request(z).SerializeToString()
        for field in (b"\x2a\x00", b"\x32\x08\x0a\x06images"):
            cases.append((channel.unary_unary("/inference.GRPCInferenceService/ModelInfer"),
                          crowded + field * (2_000_000 if len(field) == 2 else 40_000),
                          "ModelInferRequest holds more than 1,024 fields"))
        for call, request, words in cases:
            with pytest.raises(grpc.RpcError) as err:
                call(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, err.value)
            assert words in (err.value.details() or ""), (request, err.value.details())
        assert stub.ModelReady(service_pb2.ModelReadyRequest(name="vae", version="1")).ready
        assert not stub.ModelReady(service_pb2.ModelReadyRequest(name="vae", version="7")).ready
        assert stub.ModelInfer(raw_request(z, model_version="1")).model_version == "1"
    assert "Traceback" not in "".join(servers["decoder"].output)


def test_typed_contents_are_written_as_protobuf_would() -> None:
    """typed_contents writes the packed fields from the array's bytes: the same message as extending the
    repeated fields value by value, for every UINT8 value (one-byte and two-byte varints) and for floats."""
    from aevae.services.grpc_inference import typed_contents

    for array in (np.arange(256, dtype=np.uint8).reshape(2, 8, 16), np.zeros((0, 3), np.uint8),
                  np.random.default_rng(0).random((3, 5, 7), dtype=np.float32), np.zeros((0, 4), np.float32)):
        expected = service_pb2.InferTensorContents()
        if array.dtype == np.uint8:
            expected.uint_contents.extend(array.ravel().tolist())
        else:
            expected.fp32_contents.extend(array.ravel().tolist())
        got = service_pb2.InferTensorContents.FromString(typed_contents(array))
        assert got == expected, array.dtype


def test_methods_left_out_are_unimplemented_naming_those_served(servers: dict[str, ServiceProcess],
                                                                 dec: triton.InferenceServerClient) -> None:
    with grpc.insecure_channel(servers["decoder"].address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for call, request in ((stub.ModelStatistics, service_pb2.ModelStatisticsRequest(name="vae")),
                              (stub.RepositoryModelLoad, service_pb2.RepositoryModelLoadRequest(model_name="vae")),
                              (stub.LogSettings, service_pb2.LogSettingsRequest())):
            with pytest.raises(grpc.RpcError) as err:
                call(request)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, err.value
            assert "is not implemented by this server" in err.value.details() and "ModelInfer" in err.value.details()
    assert dec.is_server_live()
    assert "Traceback" not in "".join(servers["decoder"].output)


def test_stream_in_order_with_errors(dec: triton.InferenceServerClient) -> None:
    """Triton's streaming extension: answers in request order; a bad request answers with its error and the
    stream goes on."""
    results: list[tuple[Any, Any]] = []
    dec.start_stream(callback=lambda result, error: results.append((result, error)))
    try:
        for i, n in enumerate([3, 0, 5, 2]):
            z = latents(n, 4, seed=i) if n else latents(1, 3)
            dec.async_stream_infer("vae", [tensor("latents", z, "FP32")], request_id=str(i))
    finally:
        dec.stop_stream()
    assert len(results) == 4
    assert [r.get_response().id if r else None for r, _ in results] == ["0", None, "2", "3"]
    assert [r.as_numpy("images").shape[0] for r, _ in results if r] == [3, 5, 2]
    assert results[1][1] is not None and "INVALID_ARGUMENT" in str(results[1][1]) and "N x 4" in str(results[1][1])


def test_raw_answers_serialized_with_one_copy_are_the_message() -> None:
    """infer_response's bytes (outputs appended after the message's fields) parse to the very message the
    protobuf way builds, for several outputs in the order asked, and wrap into a stream response."""
    from aevae.services.grpc_inference import infer_response, stream_response

    rng = np.random.default_rng(0)
    outputs = {"mean": rng.random((3, 4), dtype=np.float32), "logvar": rng.random((3, 4), dtype=np.float32),
               "sample": rng.random((3, 4), dtype=np.float32)}
    request = service_pb2.ModelInferRequest(model_name="vae", id="x", raw_input_contents=[b""])
    request.outputs.add(name="sample")
    request.outputs.add(name="mean")
    data = infer_response(request, "vae", 3, outputs, raw=True)
    message = infer_response(request, "vae", 3, outputs, raw=True, serialized=False)
    assert isinstance(data, bytes) and isinstance(message, service_pb2.ModelInferResponse)
    assert service_pb2.ModelInferResponse.FromString(data) == message
    assert [o.name for o in message.outputs] == ["sample", "mean"]
    np.testing.assert_array_equal(np.frombuffer(message.raw_output_contents[1], np.float32).reshape(3, 4),
                                  outputs["mean"])
    wrapped = service_pb2.ModelStreamInferResponse.FromString(stream_response(data))  # type: ignore[arg-type]
    assert wrapped.infer_response == message and not wrapped.error_message


def test_stream_answers_a_message_that_does_not_parse_and_goes_on(servers: dict[str, ServiceProcess]) -> None:
    """Bytes that are no ModelInferRequest, and a message over the size limit, fail alone: their answer is
    an error_message naming the position, and the messages after them are answered."""
    z = latents(2, 4)
    good = raw_request(z).SerializeToString()
    messages = [good, b"\xff\xff\xff", good, good + b"\x2a\x00" * 100_000, good]
    with grpc.insecure_channel(servers["decoder"].address) as channel:
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                     request_serializer=lambda b: b,
                                     response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
        answers = list(call(iter(messages), timeout=30))
    assert len(answers) == 5
    assert [bool(a.error_message) for a in answers] == [False, True, False, True, False]
    assert answers[1].error_message.startswith("message 1: INVALID_ARGUMENT")
    assert "not a valid inference.ModelInferRequest" in answers[1].error_message
    assert answers[3].error_message.startswith("message 3: INVALID_ARGUMENT: ModelInferRequest holds more than")
    for answer in answers[2], answers[4]:
        assert np.frombuffer(answer.infer_response.raw_output_contents[0], np.float32).size == 2 * 32 * 32


def test_asyncio_client(servers: dict[str, ServiceProcess]) -> None:
    async def main() -> None:
        async with triton_aio.InferenceServerClient(servers["decoder"].address) as dec, \
                triton_aio.InferenceServerClient(servers["encoder"].address) as enc:
            assert await dec.is_server_ready() and await enc.is_model_ready("vae")
            meta = await enc.get_model_metadata("vae")
            assert [list(i.shape) for i in meta.inputs] == [[-1, 32, 32]]
            z = latents(4, 4)
            result = await dec.infer("vae", [tensor("latents", z, "FP32")], parameters={"dtype": "UINT8"})
            images_u8 = result.as_numpy("images")
            assert images_u8.dtype == np.uint8 and images_u8.shape == (4, 32, 32)
            encoded = await enc.infer("vae", [tensor("images", images_u8, "UINT8")])
            assert encoded.as_numpy("mean").shape == (4, 4)

            async def requests() -> Any:
                for i in range(3):
                    yield {"model_name": "vae", "inputs": [tensor("latents", latents(2, 4, seed=i), "FP32")],
                           "request_id": str(i)}

            ids = [(r.get_response().id, e) async for r, e in dec.stream_infer(requests())]
            assert ids == [("0", None), ("1", None), ("2", None)]
            with pytest.raises(InferenceServerException) as err:
                await dec.infer("vae", [tensor("latents", latents(1, 5), "FP32")])
            assert "StatusCode.INVALID_ARGUMENT" in str(err.value.status())

    asyncio.run(main())


def test_not_ready_while_shutting_down(repo: Path) -> None:
    """SIGTERM: ServerReady and ModelReady answer false during the shutdown delay, while ServerLive still
    answers; then the process exits 0."""
    service = ServiceProcess("decoder", repo, args=["--shutdown-delay", "3", "--grace", "1"]).start()
    try:
        service.wait_healthy()
        with triton.InferenceServerClient(service.address) as client:
            assert client.is_server_ready() and client.is_model_ready("vae")
            service.signal(signal.SIGTERM)
            seen: list[bool] = []
            for _ in range(200):  # bounded: until it answers not ready (the delay is 3 s)
                seen.append(client.is_server_ready())
                if not seen[-1]:
                    break
                time.sleep(0.02)
            assert seen[-1] is False
            assert client.is_model_ready("vae") is False and client.is_server_live() is True
        assert service.process is not None and service.process.wait(30) == 0
    finally:
        service.stop()
