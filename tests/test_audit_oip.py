"""The Open Inference Protocol v2 as a Triton or KServe user meets it (tritonclient sync and asyncio, raw
protobuf), against real server processes: what ServerMetadata advertises, ModelMetadata's versions beside a
broken one, Triton's `triton_final_response` flag on every stream answer (clients wait for it), mixed good and
bad stream requests answered in order with the stream going on, typed and raw inputs, datatypes, requested
outputs, parameters, and answers near the max message size."""

from __future__ import annotations

import asyncio
import queue
from pathlib import Path
from typing import Any, Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from aevae.services.process import ServiceProcess
from helpers import oip_tensor, running, write_tiny, write_tiny_set

MAX_MESSAGE = 65536  # the smallest the server takes: 15 FP32 32 x 32 images fit an answer, 16 do not
ARGS = ["--max-message-bytes", str(MAX_MESSAGE), "--shutdown-delay", "0"]
FINAL = "triton_final_response"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ae/1, vae/1, vae8/1 and vae/2, whose weights are truncated: the newest version is broken."""
    root = write_tiny_set(tmp_path_factory.mktemp("audit-oip") / "models")
    write_tiny(root, "vae", "vae", seed=1)
    weights = root / "vae" / "2" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-16])
    return root


@pytest.fixture(scope="module")
def servers(repo: Path) -> Iterator[dict[str, ServiceProcess]]:
    with running(repo, ARGS) as started:
        yield started


@pytest.fixture(scope="module")
def dec(servers: dict[str, ServiceProcess]) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(servers["decoder"].address) as client:
        yield client


@pytest.fixture(scope="module")
def enc(servers: dict[str, ServiceProcess]) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(servers["encoder"].address) as client:
        yield client


tensor = oip_tensor  # the one helper, in helpers.py


def latents(n: int, d: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def raw_request(z: np.ndarray, **fields: Any) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=fields.pop("model_name", "vae"),
                                            raw_input_contents=[z.tobytes()], **fields)
    request.inputs.add(name="latents", datatype="FP32", shape=list(z.shape))
    return request


def refused(call: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(request)
    return err.value


def test_server_metadata_advertises_what_is_served(dec: triton.InferenceServerClient,
                                                   enc: triton.InferenceServerClient) -> None:
    """Triton lists "model_configuration" when it serves ModelConfig; a client looks there before calling it."""
    for client in (dec, enc):
        extensions = list(client.get_server_metadata().extensions)
        assert "model_configuration" in extensions and "parameters" in extensions
        assert "model_repository" not in extensions  # load and unload are UNIMPLEMENTED
        config = client.get_model_config("vae8", "1").config
        assert config.name == "vae8" and [i.name for i in config.input]


def test_metadata_versions_are_the_available_ones(dec: triton.InferenceServerClient) -> None:
    """vae/2 is broken: not ready, UNAVAILABLE in the index, FAILED_PRECONDITION to infer; so ModelMetadata's
    "versions of the model available on the server" leave it out (a client picking the highest listed used to
    get it)."""
    assert dec.is_model_ready("vae", "2") is False  # loads it: now known broken
    assert dec.is_model_ready("vae") is True
    assert list(dec.get_model_metadata("vae").versions) == ["1"]
    assert list(dec.get_model_metadata("vae", "1").versions) == ["1"]
    index = {(m.name, m.version): m.state for m in dec.get_model_repository_index().models}
    assert index[("vae", "2")] == "UNAVAILABLE"
    with pytest.raises(InferenceServerException) as err:
        dec.get_model_metadata("vae", "2")
    assert str(err.value.status()) == "StatusCode.FAILED_PRECONDITION" and "broken" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        dec.get_model_config("gan")
    assert str(err.value.status()) == "StatusCode.NOT_FOUND" and "available" in err.value.message()
    result = dec.infer("vae", [tensor("latents", latents(2), "FP32")])
    assert result.get_response().model_version == "1"


def test_outputs_match_model_metadata(dec: triton.InferenceServerClient, enc: triton.InferenceServerClient) -> None:
    """Every answer's outputs carry the datatype ModelMetadata declares and a shape it allows (-1: any batch)."""
    def fits(shape: list[int], declared: list[int]) -> bool:
        return len(shape) == len(declared) and all(d in (-1, s) for s, d in zip(shape, declared))

    for model, d in (("ae", 4), ("vae", 4), ("vae8", 8)):
        meta = dec.get_model_metadata(model)
        declared = {o.name: (o.datatype, list(o.shape)) for o in meta.outputs}
        (latent_input,) = meta.inputs
        result = dec.infer(model, [tensor(latent_input.name, latents(3, d), latent_input.datatype)])
        for out in result.get_response().outputs:
            assert out.datatype == declared[out.name][0] and fits(list(out.shape), declared[out.name][1])

        meta = enc.get_model_metadata(model)
        declared = {o.name: (o.datatype, list(o.shape)) for o in meta.outputs}
        (image_input,) = meta.inputs
        h, w = image_input.shape[1:]
        x = np.random.default_rng(0).integers(0, 256, (3, h, w), dtype=np.uint8)
        result = enc.infer(model, [tensor("images", x, image_input.datatype)],
                           outputs=[triton.InferRequestedOutput(n) for n in declared])
        assert {o.name for o in result.get_response().outputs} == set(declared)
        for out in result.get_response().outputs:
            assert out.datatype == declared[out.name][0] and fits(list(out.shape), declared[out.name][1])
            assert result.as_numpy(out.name).shape == (3, d)


def test_inputs_typed_raw_and_refused(servers: dict[str, ServiceProcess]) -> None:
    """Typed contents answer like raw ones, the id is echoed; every wrong datatype, count, input or output is
    INVALID_ARGUMENT naming the field and what is accepted; parameters the server does not know pass (Triton
    hands custom parameters to the model)."""
    z = latents(2)
    with grpc.insecure_channel(servers["decoder"].address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        typed = service_pb2.ModelInferRequest(model_name="vae", id="typed-1")
        typed.inputs.add(name="latents", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend(z.ravel().tolist())
        raw = raw_request(z, id="raw-1")
        raw.parameters["binary_data_output"].bool_param = True  # HTTP's: nothing to do over gRPC
        raw.parameters["my_custom_parameter"].int64_param = 42
        typed_out, raw_out = stub.ModelInfer(typed), stub.ModelInfer(raw)
        assert (typed_out.id, raw_out.id) == ("typed-1", "raw-1")
        np.testing.assert_allclose(np.array(typed_out.outputs[0].contents.fp32_contents, np.float32),
                                   np.frombuffer(raw_out.raw_output_contents[0], np.float32), rtol=1e-5, atol=1e-6)

        cases: list[tuple[service_pb2.ModelInferRequest, str]] = []
        for datatype, data in (("FP16", z.astype(np.float16)), ("FP64", z.astype(np.float64)),
                               ("INT32", z.astype(np.int32))):
            request = raw_request(z)
            request.inputs[0].datatype, request.raw_input_contents[0] = datatype, data.tobytes()
            cases.append((request, f"expected FP32, got '{datatype}'"))
        as_bytes = service_pb2.ModelInferRequest(model_name="vae")
        as_bytes.inputs.add(name="latents", datatype="BYTES", shape=[2, 4]).contents.bytes_contents.extend([b"1"] * 8)
        cases.append((as_bytes, "expected FP32, got 'BYTES'"))
        short = service_pb2.ModelInferRequest(model_name="vae")
        short.inputs.add(name="latents", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend([0.0] * 7)
        cases.append((short, "needs 8 values, got 7"))
        cases.append((raw_request(z.reshape(8)), "expected 2 dimensions [N, d]"))
        cases.append((service_pb2.ModelInferRequest(model_name="vae"), "expected one input named 'latents', got []"))
        two = raw_request(z)
        two.inputs.add(name="extra", datatype="FP32", shape=[1])
        two.raw_input_contents.append(b"\0" * 4)
        cases.append((two, "expected one input named 'latents'"))
        unknown_output = raw_request(z)
        unknown_output.outputs.add(name="pixels")
        cases.append((unknown_output, "gives ['images']"))
        for request, words in cases:
            err = refused(stub.ModelInfer, request)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, err)
            assert words in (err.details() or ""), (words, err.details())
    assert "Traceback" not in "".join(servers["decoder"].output)


def test_sample_parameter_and_output_must_agree(enc: triton.InferenceServerClient) -> None:
    """`sample: false` with the `sample` output requested was answered with a sample; now a clear refusal.
    A seed sent as a float (tritonclient sends Python floats as double_param) names the fields accepted."""
    x = np.zeros((1, 32, 32), np.uint8)
    with pytest.raises(InferenceServerException) as err:
        enc.infer("vae", [tensor("images", x, "UINT8")], parameters={"sample": False},
                  outputs=[triton.InferRequestedOutput("sample")])
    assert str(err.value.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "parameters.sample is false but the output 'sample' is requested" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        enc.infer("vae", [tensor("images", x, "UINT8")], parameters={"sample": True, "seed": 1.0})
    assert "int64_param or uint64_param, got double_param" in err.value.message()
    seeded = [enc.infer("vae", [tensor("images", x, "UINT8")], parameters={"sample": True, "seed": 7})
              .as_numpy("sample") for _ in range(2)]
    np.testing.assert_array_equal(seeded[0], seeded[1])
    only = enc.infer("vae", [tensor("images", x, "UINT8")], outputs=[triton.InferRequestedOutput("sample")])
    assert [o.name for o in only.get_response().outputs] == ["sample"]


def test_stream_answers_carry_the_final_flag(dec: triton.InferenceServerClient) -> None:
    """The loop Triton's stream clients run with enable_empty_final_response: read answers until one says
    `triton_final_response` (or is an error). Without the flag it waited for ever after the first answer."""
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    dec.start_stream(callback=lambda result, error: answers.put((result, error)))
    good = [tensor("latents", latents(2), "FP32")]
    bad = [tensor("latents", latents(2).astype(np.float16), "FP16")]
    seen: list[tuple[str, str]] = []
    try:
        for index, inputs in enumerate([good, bad, good]):
            dec.async_stream_infer("vae", inputs, request_id=f"r{index}", enable_empty_final_response=True)
            while True:
                result, error = answers.get(timeout=20)
                if error is not None:
                    seen.append(("error", str(error)))
                    break
                response = result.get_response()
                seen.append(("answer", response.id))
                if FINAL in response.parameters and response.parameters[FINAL].bool_param:
                    break
                assert len(seen) < 10, seen  # bounded: answers without the flag would loop here
    finally:
        dec.stop_stream()
    assert [kind for kind, _ in seen] == ["answer", "error", "answer"]
    assert seen[0][1] == "r0" and seen[2][1] == "r2"
    assert seen[1][1].startswith("message 1: INVALID_ARGUMENT") and "expected FP32" in seen[1][1]


def test_raw_stream_mixed_requests_each_answered_in_order(servers: dict[str, ServiceProcess]) -> None:
    """Good and bad requests on one stream: each bad one answers error_message (its position and status
    first, its id echoed) and the stream goes on, as in Triton; every answer carries the final flag. Bad:
    an unknown model, bytes that are no request, an answer over the max message size, a request over it,
    an unknown output."""
    z = latents(2)
    over_answer = raw_request(latents(16), id="big-answer")  # 16 x 4096 bytes of images: past 64 KiB
    over_request = raw_request(latents(MAX_MESSAGE // 16 + 1), id="big-request")  # one 64 KiB+ message
    unknown_output = raw_request(z, id="out")
    unknown_output.outputs.add(name="pixels")
    messages = [raw_request(z, id="a").SerializeToString(),
                raw_request(z, model_name="gan", id="gan").SerializeToString(),
                b"\xff\xff\xff",
                over_answer.SerializeToString(),
                raw_request(latents(15), id="fits").SerializeToString(),
                over_request.SerializeToString(),
                unknown_output.SerializeToString(),
                raw_request(z, id="last").SerializeToString()]
    with grpc.insecure_channel(servers["decoder"].address) as channel:
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                     request_serializer=lambda b: b,
                                     response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
        answers = list(call(iter(messages), timeout=30))
    assert len(answers) == len(messages)
    errors = [a.error_message for a in answers]
    assert [bool(e) for e in errors] == [False, True, True, True, False, True, True, False]
    assert errors[1].startswith("message 1: NOT_FOUND: unknown model 'gan'")
    assert errors[2].startswith("message 2: INVALID_ARGUMENT") and "not a valid" in errors[2]
    assert errors[3].startswith("message 3: RESOURCE_EXHAUSTED") and "at most 15" in errors[3]
    assert errors[5].startswith("message 5: RESOURCE_EXHAUSTED") and "over the max message size" in errors[5]
    assert errors[6].startswith("message 6: INVALID_ARGUMENT") and "'pixels'" in errors[6]
    assert [a.infer_response.id for a in answers] == ["a", "gan", "", "big-answer", "fits", "", "out", "last"]
    assert all(a.infer_response.parameters[FINAL].bool_param for a in answers)
    assert list(answers[4].infer_response.outputs[0].shape) == [15, 32, 32]
    assert len(answers[4].infer_response.raw_output_contents[0]) == 15 * 32 * 32 * 4
    assert "Traceback" not in "".join(servers["decoder"].output)


def test_unary_near_the_message_limit(dec: triton.InferenceServerClient) -> None:
    """15 images fit the 64 KiB answer, 16 are RESOURCE_EXHAUSTED saying how many fit; UINT8 fits 4x more."""
    assert dec.infer("vae", [tensor("latents", latents(15), "FP32")]).as_numpy("images").shape == (15, 32, 32)
    with pytest.raises(InferenceServerException) as err:
        dec.infer("vae", [tensor("latents", latents(16), "FP32")])
    assert str(err.value.status()) == "StatusCode.RESOURCE_EXHAUSTED" and "at most 15" in err.value.message()
    images = dec.infer("vae", [tensor("latents", latents(63), "FP32")], parameters={"dtype": "UINT8"})
    assert images.as_numpy("images").dtype == np.uint8 and images.as_numpy("images").shape == (63, 32, 32)


def test_asyncio_client_end_to_end(servers: dict[str, ServiceProcess]) -> None:
    """tritonclient.grpc.aio: metadata, config, infer and a stream of good and bad requests."""
    async def main() -> None:
        async with triton_aio.InferenceServerClient(servers["decoder"].address) as client:
            assert "model_configuration" in (await client.get_server_metadata()).extensions
            meta = await client.get_model_metadata("vae8")
            assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [("latents", "FP32", [-1, 8])]
            config = await client.get_model_config("vae8")
            assert [list(o.dims) for o in config.config.output] == [[-1, 24, 20]]
            result = await client.infer("vae8", [tensor("latents", latents(3, 8), "FP32")], request_id="q")
            assert result.get_response().id == "q" and result.as_numpy("images").shape == (3, 24, 20)

            async def requests() -> Any:
                for i, z in enumerate([latents(2), latents(2, 5), latents(1)]):
                    yield {"model_name": "vae", "inputs": [tensor("latents", z, "FP32")], "request_id": str(i)}

            got = [(r.get_response().id if r else None, r.get_response().parameters[FINAL].bool_param if r else None,
                    str(e) if e else None) async for r, e in client.stream_infer(requests())]
            assert [(i, f) for i, f, _ in got] == [("0", True), (None, None), ("2", True)]
            assert got[1][2] is not None and "message 1: INVALID_ARGUMENT" in got[1][2] and "N x 4" in got[1][2]

    asyncio.run(main())
