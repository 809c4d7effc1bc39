"""The wire's conversions: "the newest" is None in Python and 0 only on the wire; and the Open Inference
Protocol's request fields (versions, tensor parameters, typed contents) as services/grpc_inference.py reads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aevae.v1.tensors import WireError, version_from_wire, version_to_wire


def test_newest_is_none_in_python_and_zero_on_the_wire() -> None:
    assert version_from_wire(0) is None and version_to_wire(None) == 0
    assert version_from_wire(7) == 7 and version_to_wire(np.int64(7)) == 7


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2", 2**63])
def test_a_python_version_must_be_none_or_positive(bad: object) -> None:
    with pytest.raises(WireError, match="expected None"):
        version_to_wire(bad)  # type: ignore[arg-type]


def test_a_negative_wire_version_is_refused() -> None:
    with pytest.raises(WireError, match=r"version: expected 0 \(the newest\) or a positive version, got -3"):
        version_from_wire(-3)


def test_shapes_numpy_cannot_hold_are_tensor_errors() -> None:
    from aevae.v1 import tensor_pb2
    from aevae.v1.tensors import TensorError, from_tensor

    with pytest.raises(TensorError, match="at most 32 dimensions, got 33"):
        from_tensor(tensor_pb2.Tensor(dtype="uint8", shape=[1] * 33, data=b"\0"), "x")
    with pytest.raises(TensorError, match="below 2\\*\\*40"):
        from_tensor(tensor_pb2.Tensor(dtype="uint8", shape=[0, 2**62], data=b""), "x")
    with pytest.raises(TensorError, match=r"expected float32, got 'xxxx.*\.\.\."):
        from_tensor(tensor_pb2.Tensor(dtype="x" * 10_000, shape=[1], data=b"\0"), "x", dtypes=("float32",))


@pytest.mark.parametrize("dtype, n", [("float32", 5), ("uint8", 5), ("float32", 0)])
def test_a_response_written_with_one_copy_is_an_ordinary_message(dtype: str, n: int) -> None:
    from aevae.v1 import decoder_pb2
    from aevae.v1.tensors import TensorResponse, from_tensor, serialize_with_data, tensor_head

    images = (np.random.default_rng(0).random((n, 6, 7)) * 200).astype(dtype)
    head = decoder_pb2.DecodeResponse(model="vae", version=3, images=tensor_head(images))
    data = serialize_with_data(head, 3, images)
    message = decoder_pb2.DecodeResponse.FromString(data)  # protobuf's own reader merges the two parts
    assert (message.model, message.version) == ("vae", 3)
    assert np.array_equal(from_tensor(message.images, "images"), images)
    fast = TensorResponse.parse(data)  # and ours reads it without copying the data
    assert (fast.model, fast.version) == ("vae", 3) and np.array_equal(fast.array, images)
    plain = TensorResponse.parse(message.SerializeToString())  # and reads protobuf's serialization too
    assert np.array_equal(plain.array, images)


def test_a_big_request_parses_to_the_same_message_with_its_data_split_off_uncopied() -> None:
    """The bulk path (split_payload, registration.Bulk): what the handler sees equals protobuf's whole parse,
    also when the Tensor field occurs twice (protobuf merges the occurrences; the last data wins)."""
    from aevae.services.registration import BULK_MIN_BYTES, Bulk, _parser, request_array
    from aevae.v1 import decoder_pb2, encoder_pb2
    from aevae.v1.tensors import split_payload, to_tensor

    images = np.random.default_rng(0).random((80, 32, 32), dtype=np.float32)
    request = encoder_pb2.EncodeRequest(model="vae", version=3, images=to_tensor(images), sample=True, seed=7)
    data = request.SerializeToString()
    assert len(data) >= BULK_MIN_BYTES
    parsed = _parser(encoder_pb2.EncodeRequest, 1 << 30)(data)
    assert isinstance(parsed, Bulk) and parsed.ByteSize() == request.ByteSize()
    assert (parsed.model, parsed.version, parsed.sample, parsed.seed) == ("vae", 3, True, 7)
    array = request_array(parsed, "images")
    np.testing.assert_array_equal(array, images)
    assert not array.flags.writeable and array.base is not None  # a view on the received bytes
    parsed.version = 5  # writes go to the message (a stream pins its version so)
    assert parsed.message.version == 5

    first = decoder_pb2.DecodeRequest(latents=to_tensor(np.zeros((2, 4), np.float32))).SerializeToString()
    second = decoder_pb2.DecodeRequest(model="m", latents=to_tensor(np.ones((2, 4), np.float32))).SerializeToString()
    head, payload = split_payload(first + second, 3)  # type: ignore[misc]
    whole = decoder_pb2.DecodeRequest.FromString(first + second)
    merged = decoder_pb2.DecodeRequest.FromString(head)
    merged.latents.data = bytes(payload)
    assert merged == whole
    assert split_payload(data[:-5], 3) is None  # truncated: left to protobuf, which names the problem
    assert split_payload(decoder_pb2.DecodeRequest(model="m").SerializeToString(), 3) is None


# -- the Open Inference Protocol's request fields (services/grpc_inference.py) ---------------------------------
@pytest.mark.parametrize("text", ["1\n", "9223372036854775808", "9999999999999999999", " 1", "01"])
def test_an_oip_model_version_must_be_a_whole_version_number_within_int64(text: str) -> None:
    """The repository's pattern ends in `$`, which also matches before a trailing newline; and no folder can
    name a version past int64 (repository.version_number refuses it): both are malformed, not unknown."""
    from aevae.errors import InvalidArgument
    from aevae.services.grpc_inference import version_from_oip

    with pytest.raises(InvalidArgument, match="model_version: expected a version number"):
        version_from_oip(text)
    assert version_from_oip("") is None and version_from_oip("0") is None
    assert version_from_oip("9223372036854775807") == 2**63 - 1


def _oip_request() -> Any:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="vae", raw_input_contents=[np.ones((2, 4), np.float32).tobytes()])
    request.inputs.add(name="latents", datatype="FP32", shape=[2, 4])
    return request


@pytest.mark.parametrize("where, parameter", [("input", "shared_memory_region"), ("output", "shared_memory_region"),
                                              ("output", "shared_memory_byte_size"), ("output", "classification")])
def test_oip_extensions_the_server_lacks_are_refused_not_ignored(where: str, parameter: str) -> None:
    """Ignored, a shared memory region would leave the client reading a region nobody wrote (or the server
    reading an input from the wrong place), and classification would answer raw scores for class labels."""
    from aevae.errors import InvalidArgument
    from aevae.services.grpc_inference import check_extensions

    request = _oip_request()
    check_extensions(request)
    tensor = request.inputs[0] if where == "input" else request.outputs.add(name="images")
    tensor.parameters[parameter].int64_param = 1
    with pytest.raises(InvalidArgument, match=f"{where}s\\[.*{parameter}.*does not implement"):
        check_extensions(request)


def test_oip_typed_values_in_a_field_the_datatype_does_not_read_are_refused() -> None:
    from aevae.errors import InvalidArgument
    from aevae.services.grpc_inference import read_input

    request = _oip_request()
    del request.raw_input_contents[:]
    contents = request.inputs[0].contents
    contents.fp32_contents.extend([0.5] * 8)
    assert read_input(request, "latents", ("FP32",), "N, d").array().tolist() == [[0.5] * 4] * 2
    contents.int_contents.extend([7] * 8)
    with pytest.raises(InvalidArgument, match="values go in fp32_contents, got values in int_contents"):
        read_input(request, "latents", ("FP32",), "N, d")


def test_oip_inputs_outputs_and_dimensions_past_what_a_model_takes_are_counted_not_read() -> None:
    """30,000 outputs named alike were checked for repeats name by name against the whole list (19 s of the
    event loop at 40,000); 16,000,000 dimensions were made Python ints before their number was checked; every
    input was named in the error. Each is refused naming the count and a few of the names."""
    from aevae.errors import InvalidArgument
    from aevae.services.grpc_inference import read_input, requested_outputs

    request = _oip_request()
    for _ in range(30_000):
        request.outputs.add(name="images")
    with pytest.raises(InvalidArgument, match="^outputs: each output may be named once; 'images' is named more"):
        requested_outputs(request, "vae", ["images"])
    del request.outputs[:]
    request.outputs.add(name="images")
    assert requested_outputs(request, "vae", ["images"]) == ["images"]

    request.inputs[0].shape.extend(range(100_000))
    with pytest.raises(InvalidArgument, match=r"latents.shape: expected 2 dimensions \[N, d\], got 100002: "
                                              r"'\[2, 4, 0, 1, 2, 3, 4, 5, \.\.\.\]'$"):
        read_input(request, "latents", ("FP32",), "N, d")
    for i in range(10_000):
        request.inputs.add(name=f"x{i}")
    with pytest.raises(InvalidArgument, match=r"got \['latents', 'x0', 'x1', 'x2', 'x3', \.\.\. \(10001 in all\)\]$"):
        read_input(request, "latents", ("FP32",), "N, d")


def test_requests_crowded_with_fields_are_refused_before_they_are_parsed() -> None:
    """2,000,000 empty inputs are 4 MB on the wire and 180 MB parsed: a ModelInferRequest and each of its inputs
    and outputs may hold MAX_FIELDS fields, counted on the bytes. Real requests, big ones included, pass; so do
    bytes that are no protobuf (the parser says what is wrong with them), and aevae.v1 requests are not walked."""
    from tritonclient.grpc import service_pb2

    from aevae.services.field_limit import MAX_FIELDS, WALK_FROM_BYTES, check_for
    from aevae.v1 import decoder_pb2

    check = check_for(service_pb2.ModelInferRequest)
    assert check is not None and check_for(decoder_pb2.DecodeRequest) is None
    head = service_pb2.ModelInferRequest(model_name="vae").SerializeToString()
    assert check(head + b"\x2a\x00" * 2_000_000) == (
        f"ModelInferRequest holds more than {MAX_FIELDS:,} fields, and no request this server answers needs that "
        "many (a ModelInferRequest has one input, an output or two and a few parameters); send one request per batch")
    crowded_input = service_pb2.ModelInferRequest(model_name="vae")
    tensor = crowded_input.inputs.add(name="latents", datatype="FP32", shape=[1, 4])
    for i in range(MAX_FIELDS + 1):
        tensor.parameters[f"p{i:05}"].int64_param = i
    tensor.contents.fp32_contents.extend([0.5] * 20_000)  # past WALK_FROM_BYTES
    problem = check(crowded_input.SerializeToString())
    assert problem is not None and problem.startswith("ModelInferRequest.inputs[0] holds more than 1,024 fields")
    # one budget for the whole request: 1,000 inputs of 100 fields each passed a budget per message
    spread = service_pb2.ModelInferRequest(model_name="vae")
    for i in range(1000):
        each = spread.inputs.add(name=f"x{i}")
        for j in range(100):
            each.parameters[f"p{j}"].bool_param = True
    problem = check(spread.SerializeToString())
    assert problem is not None and problem.startswith("ModelInferRequest.inputs[")

    big = _oip_request()
    big.raw_input_contents[0] = np.ones((8192, 4), np.float32).tobytes()
    big.inputs[0].shape[:] = [8192, 4]
    big.outputs.add(name="images").parameters["binary_data"].bool_param = True
    for i in range(100):
        big.parameters[f"p{i}"].string_param = "x"
    data = big.SerializeToString()
    assert len(data) > WALK_FROM_BYTES and check(data) is None
    typed = _oip_request()
    del typed.raw_input_contents[:]
    typed.inputs[0].contents.fp32_contents.extend([0.5] * 100_000)
    assert check(typed.SerializeToString()) is None
    assert check(b"\xff" * WALK_FROM_BYTES) is None
    assert check(head + b"\x2a\x00" * (WALK_FROM_BYTES // 2)) is not None
    assert check(head + b"\x2a\x00" * 1000) is None  # small: not walked, and parsed at little cost


def test_oip_typed_values_are_read_after_the_batch_bound_and_off_the_event_loop(tmp_path: Path) -> None:
    """Typed contents are converted value by value (a [65536, 28, 28] request held the event loop for 0.9 s,
    every client's calls with it, and one refused afterwards for its batch size 1.4 s): the request's shape is
    checked against the batch bound before any value is read, and the values are read in the job, which the
    Runner sends off the loop by the number of values."""
    from types import SimpleNamespace

    from aevae.errors import ResourceExhausted
    from aevae.services.decoder import DecoderLogic
    from aevae.services.grpc_inference import decoder_job, read_input
    from aevae.services.settings import Limits
    from aevae.store import ModelStore

    request = _oip_request()
    del request.raw_input_contents[:]
    request.inputs[0].shape[:] = [9, 4]
    request.inputs[0].contents.fp32_contents.extend([0.5] * 36)
    tensor = read_input(request, "latents", ("FP32",), "N, d")
    assert tensor.raw is None and tensor.rows == 9 and tensor.work == 36
    assert tensor.array().shape == (9, 4)
    servicer = SimpleNamespace(logic=DecoderLogic(ModelStore(tmp_path), Limits(max_message_bytes=1 << 20, max_batch=8)))
    request.inputs[0].contents.fp32_contents[0] = float("nan")  # would be refused if it were read
    with pytest.raises(ResourceExhausted, match="batch of 9 exceeds the maximum batch per request of 8"):
        decoder_job(servicer, request)
    request.inputs[0].shape[:] = [1, 36]
    prepare, work, ready = decoder_job(servicer, request)  # nothing read yet: the NaN is not seen here
    assert work == 36 and ready is False
