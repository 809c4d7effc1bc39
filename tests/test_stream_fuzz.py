"""Streams and the open endpoints under an outside fuzzer and fault injector, against real server processes:
messages valid and invalid mixed in one stream, shapes no array can take, OIP errors naming whatever a
request carries, grpc's own health service asked for what it lacks, and clients SIGKILLed mid-stream. Every bad
request gets a clear status (never UNKNOWN or INTERNAL), the server logs no traceback for it, and it gives
back everything the calls held."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from typing import Any, Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from aevae.services.process import ServiceProcess
from aevae.v1 import decoder_pb2, decoder_pb2_grpc, encoder_pb2, tensor_pb2
from aevae.v1.tensors import from_tensor, to_tensor
from helpers import metrics_url, scrape, write_tiny

MAX_MESSAGE = 65536
ARGS = ["--max-message-bytes", str(MAX_MESSAGE), "--metrics-port", "0"]
CLEAR = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE}


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    root = tmp_path_factory.mktemp("stream_fuzz") / "models"
    write_tiny(root, "vae")
    write_tiny(root, "ae", "ae")
    write_tiny(root, "two")
    write_tiny(root, "two", seed=1)
    with ServiceProcess("encoder", root, args=ARGS) as enc, ServiceProcess("decoder", root, args=ARGS) as dec:
        enc.wait_healthy()
        dec.wait_healthy()
        yield {"encoder": enc, "decoder": dec}
    for service in (enc, dec):
        assert "Traceback" not in "".join(service.output), "".join(service.output)[-3000:]


@pytest.fixture(scope="module")
def channels(services: dict[str, ServiceProcess]) -> Iterator[dict[str, grpc.Channel]]:
    with grpc.insecure_channel(services["encoder"].address) as enc, \
            grpc.insecure_channel(services["decoder"].address) as dec:
        yield {"encoder": enc, "decoder": dec}


def _decode(n: int = 2, seed: int = 0, **kw: Any) -> decoder_pb2.DecodeRequest:
    z = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    return decoder_pb2.DecodeRequest(latents=to_tensor(z), **{"model": "vae", **kw})


def _encode(n: int = 2, seed: int = 0, **kw: Any) -> encoder_pb2.EncodeRequest:
    images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32), dtype=np.uint8)
    return encoder_pb2.EncodeRequest(images=to_tensor(images), **{"model": "vae", **kw})


def _oip(n: int = 2, id: str = "") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="vae", id=id,
                                            raw_input_contents=[np.zeros((n, 4), np.float32).tobytes()])
    request.inputs.add(name="latents", datatype="FP32", shape=[n, 4])
    return request


def _raw(channel: grpc.Channel, path: str, streaming: bool = False, parse: Any = None) -> Any:
    make = channel.stream_stream if streaming else channel.unary_unary
    return make(path, request_serializer=lambda b: b, response_deserializer=parse)


def _stream(call: Any, messages: list[Any], timeout: float = 20) -> tuple[list[Any], grpc.RpcError | None]:
    """The answers of a stream, and the error that ended it (None: it ended OK)."""
    answers = []
    try:
        for answer in call(iter(messages), timeout=timeout):
            answers.append(answer)
    except grpc.RpcError as error:
        return answers, error
    return answers, None


def _no_traceback(service: ServiceProcess, since: int) -> None:
    """No traceback in what the service printed from line `since` on (the test's own calls)."""
    time.sleep(0.2)  # the output is read by a thread
    printed = "".join(service.output[since:])
    assert "Traceback" not in printed, printed[-3000:]


def test_health_methods_the_server_lacks_are_unimplemented_without_a_traceback(
        services: dict[str, ServiceProcess], channels: dict[str, grpc.Channel]) -> None:
    """grpc.health.v1.Health/List is in the generated base class but not in grpcio-health-checking's servicer:
    each call raised NotImplementedError in the servicer, which gRPC logged with a traceback (UNIMPLEMENTED
    "Unexpected <class 'NotImplementedError'>"). Health takes calls without a token, so that was a log flood
    open to anyone."""
    since = len(services["decoder"].output)
    for bytes_ in (b"", b"\xff\xff"):
        with pytest.raises(grpc.RpcError) as error:
            _raw(channels["decoder"], "/grpc.health.v1.Health/List")(bytes_, timeout=10)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "grpc.health.v1.Health/List is not implemented" in error.value.details()
        assert "Check" in error.value.details(), error.value.details()
    health = health_pb2_grpc.HealthStub(channels["decoder"])
    with pytest.raises(grpc.RpcError) as error:  # grpc_health's NOT_FOUND said nothing
        health.Check(health_pb2.HealthCheckRequest(service="aevae.v1.Nope"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no health status for service 'aevae.v1.Nope'" in error.value.details()
    assert "'aevae.v1.Decoder'" in error.value.details()
    for name in ("", "aevae.v1.Decoder"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    _no_traceback(services["decoder"], since)


HUGE = 2**40  # the largest dimension from_tensor takes


@pytest.mark.parametrize("shape", [[HUGE, HUGE, 0], [0, HUGE, HUGE], [2**30, 2**30, 0, 4]])
def test_shapes_no_array_can_take_are_invalid_argument(services: dict[str, ServiceProcess],
                                                      channels: dict[str, grpc.Channel], shape: list[int]) -> None:
    """A shape with a 0 holds no values, so it passes the byte-length check, but numpy refuses any shape whose
    other dimensions multiply past 2**63 bytes: that ValueError was INTERNAL with a traceback, in unary calls
    and in streams alike."""
    since = {kind: len(service.output) for kind, service in services.items()}
    dec, enc = channels["decoder"], channels["encoder"]
    tensor = tensor_pb2.Tensor(dtype="float32", shape=shape, data=b"")
    bad_decode = decoder_pb2.DecodeRequest(model="vae", latents=tensor).SerializeToString()
    bad_encode = encoder_pb2.EncodeRequest(model="vae", images=tensor).SerializeToString()
    with pytest.raises(grpc.RpcError) as error:
        _raw(dec, "/aevae.v1.Decoder/Decode")(bad_decode, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert error.value.details().startswith("latents.shape: ") and "2**63 bytes" in error.value.details()
    for channel, path, good, bad in ((dec, "/aevae.v1.Decoder/DecodeStream", _decode(), bad_decode),
                                     (enc, "/aevae.v1.Encoder/EncodeStream", _encode(), bad_encode)):
        answers, failed = _stream(_raw(channel, path, streaming=True),
                                  [good.SerializeToString(), bad, good.SerializeToString()])
        assert len(answers) == 1 and failed is not None
        assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.details()
        assert failed.details().startswith("message 1: ") and ".shape: " in failed.details()
    _no_traceback(services["decoder"], since["decoder"])
    _no_traceback(services["encoder"], since["encoder"])


def test_oip_shapes_no_array_can_take_are_invalid_argument(services: dict[str, ServiceProcess],
                                                          channels: dict[str, grpc.Channel]) -> None:
    """The same on the Open Inference Protocol: FP32 images [0, 2**31 - 1, 2**31 - 1] (each dimension within
    the protocol's bound) took the encoder to INTERNAL, raw or typed, unary or in a stream."""
    since = len(services["encoder"].output)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channels["encoder"])
    for raw in (True, False):
        request = service_pb2.ModelInferRequest(model_name="vae", raw_input_contents=[b""] if raw else [])
        request.inputs.add(name="images", datatype="FP32", shape=[0, 2**31 - 1, 2**31 - 1])
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request, timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert "images.shape" in error.value.details() and "2**63 bytes" in error.value.details()
        (answer,) = list(stub.ModelStreamInfer(iter([request]), timeout=10))
        assert answer.error_message.startswith("message 0: INVALID_ARGUMENT: images.shape")
    _no_traceback(services["encoder"], since)


def test_oip_errors_naming_what_a_request_carries_stay_short(services: dict[str, ServiceProcess],
                                                             channels: dict[str, grpc.Channel]) -> None:
    """An OIP error listed every input name (or unknown output name) a request carried. 1,500 inputs named
    with 19 NUL bytes (a 35 KB request, under the limit) made a 120 KB error: unary, the client got
    RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" instead of INVALID_ARGUMENT; in a stream
    the error answer was over the max message size, gRPC refused to send it and the stream ended there,
    losing the answers to the messages after it. Now the lists name a few and count the rest."""
    since = len(services["decoder"].output)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channels["decoder"])
    many_inputs = _oip(2, "b")
    for _ in range(1500):
        many_inputs.inputs.add(name="\0" * 19, datatype="FP32", shape=[1])
    many_outputs = _oip(2, "c")
    for i in range(1500):
        many_outputs.outputs.add(name=f"{i:05d}" + "\0" * 14)
    for request, words, count in ((many_inputs, "inputs: expected one input named 'latents'", 1501),
                                  (many_outputs, "outputs: model 'vae' gives ['images']", 1500)):
        assert request.ByteSize() < MAX_MESSAGE
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request, timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert error.value.details().startswith(words) and f", ... ({count} in all)" in error.value.details()
        assert len(error.value.details()) < 1000
    answers = list(stub.ModelStreamInfer(iter([_oip(2, "a"), many_inputs, many_outputs, _oip(3, "d")]), timeout=20))
    assert [a.infer_response.id for a in answers] == ["a", "b", "c", "d"]
    assert [a.error_message.split(":")[1:2] for a in answers] == [[], [" INVALID_ARGUMENT"], [" INVALID_ARGUMENT"], []]
    assert all(len(a.error_message) < 1000 for a in answers)
    assert len(answers[3].infer_response.raw_output_contents[0]) == 3 * 32 * 32 * 4
    _no_traceback(services["decoder"], since)


BAD_MESSAGES = [b"\xff\xff", b"", b"\x0a\x80\x80\x80\x80\x10",
                decoder_pb2.DecodeRequest(model="vae", latents=tensor_pb2.Tensor(
                    dtype="float32", shape=[2, 4], data=b"\0" * 31)).SerializeToString(),
                decoder_pb2.DecodeRequest(model="nope", latents=to_tensor(np.zeros((1, 4), np.float32))).SerializeToString()]


def test_streams_of_valid_and_invalid_messages_answer_every_message_before_the_first_bad_one(
        services: dict[str, ServiceProcess], channels: dict[str, grpc.Channel]) -> None:
    """Seeded mixes of valid messages (models, versions, dtypes and row counts switching) and invalid ones in
    DecodeStream and EncodeStream: the answers are exactly those of the messages before the first bad one, each
    as its unary call answers, and the error names that message's position with a clear status."""
    since = {kind: len(service.output) for kind, service in services.items()}
    rng = random.Random(11)
    calls = {"decoder": (_raw(channels["decoder"], "/aevae.v1.Decoder/DecodeStream", True),
                         decoder_pb2.DecodeResponse.FromString,
                         [_decode(1 + i % 5, i, dtype=["", "uint8"][i % 2], model=["vae", "ae"][i % 3 == 0])
                          for i in range(8)]),
             "encoder": (_raw(channels["encoder"], "/aevae.v1.Encoder/EncodeStream", True),
                         encoder_pb2.EncodeResponse.FromString,
                         [_encode(1 + i % 4, i, version=i % 2) for i in range(8)])}
    unary = {}  # each message's answer on its own
    for kind, method in (("decoder", "/aevae.v1.Decoder/Decode"), ("encoder", "/aevae.v1.Encoder/Encode")):
        _, parse, goods = calls[kind]
        unary[kind] = [_raw(channels[kind], method, parse=parse)(good.SerializeToString(), timeout=10)
                       for good in goods]
    for case in range(40):
        kind = "encoder" if case % 2 else "decoder"
        call, parse, goods = calls[kind]
        chosen = [rng.randrange(len(goods)) for _ in range(rng.randint(0, 8))]
        messages = [goods[i].SerializeToString() for i in chosen]
        first_bad = rng.randrange(len(messages)) if messages and rng.random() < 0.75 else None
        if first_bad is not None:
            messages[first_bad] = rng.choice(BAD_MESSAGES)
        answers, failed = _stream(call, messages)
        expected = len(messages) if first_bad is None else first_bad
        assert len(answers) == expected, (case, failed and failed.details())
        assert [parse(a) for a in answers] == [unary[kind][i] for i in chosen[:expected]], case
        if first_bad is None:
            assert failed is None, failed.details()
        else:
            assert failed is not None and failed.code() in CLEAR, (failed.code(), failed.details())
            assert failed.details().startswith(f"message {first_bad}: ")
    _no_traceback(services["decoder"], since["decoder"])
    _no_traceback(services["encoder"], since["encoder"])


CLIENT = """
import sys, time, threading
import grpc, numpy as np
from aevae.v1 import decoder_pb2, decoder_pb2_grpc
from aevae.v1.tensors import to_tensor
address, read = sys.argv[1], sys.argv[2] == "1"
def requests():
    z = to_tensor(np.zeros((15, 4), np.float32))
    while True:
        yield decoder_pb2.DecodeRequest(model="vae", latents=z)
channels = [grpc.insecure_channel(address) for _ in range(4)]
streams = [decoder_pb2_grpc.DecoderStub(c).DecodeStream(requests()) for c in channels]
for s in streams:
    next(s)
    if read:
        threading.Thread(target=lambda s=s: [None for _ in s], daemon=True).start()
print("streaming", flush=True)
time.sleep(600)
"""


def _admission(url: str) -> dict[str, float]:
    return {name: value for (name, _), value in scrape(url).items() if name.startswith("aevae_admission_")}


def test_clients_killed_mid_stream_give_back_every_slot_byte_and_descriptor(
        services: dict[str, ServiceProcess], channels: dict[str, grpc.Channel]) -> None:
    """Client processes SIGKILLed while their streams are in flight (some reading as fast as they can, some
    never reading): the server keeps answering others meanwhile, and afterwards holds no call, no request,
    answer or unsent byte, and no more file descriptors than before."""
    import psutil

    service = services["decoder"]
    url = metrics_url(service.output)
    assert service.process is not None
    server = psutil.Process(service.process.pid)
    stub = decoder_pb2_grpc.DecoderStub(channels["decoder"])
    assert len(from_tensor(stub.Decode(_decode(3), timeout=10).images, "images")) == 3
    fds = server.num_fds()
    clients = [subprocess.Popen([sys.executable, "-c", CLIENT, service.address, read], stdout=subprocess.PIPE,
                                text=True) for read in ("0", "1")]
    try:
        for client in clients:
            assert client.stdout is not None and client.stdout.readline().strip() == "streaming"
        assert _admission(url)["aevae_admission_calls"] >= 8
        assert len(from_tensor(stub.Decode(_decode(3), timeout=10).images, "images")) == 3  # others are served
    finally:
        for client in clients:
            client.send_signal(signal.SIGKILL)
            client.wait()
    deadline = time.monotonic() + 20
    while any(_admission(url).values()) or server.num_fds() > fds:
        assert time.monotonic() < deadline, (_admission(url), server.num_fds(), fds)
        time.sleep(0.1)
    answers, failed = _stream(decoder_pb2_grpc.DecoderStub(channels["decoder"]).DecodeStream,
                              [_decode(2, i) for i in range(20)])
    assert failed is None and [len(from_tensor(a.images, "images")) for a in answers] == [2] * 20


def test_a_version_asked_by_number_in_a_stream_does_not_become_its_newest(channels: dict[str, grpc.Channel]) -> None:
    """A stream pins "the newest" to the version its first such message got; a message asking for an older
    version by number pinned that one instead, so a later message asking for the newest got the old one."""
    stub = decoder_pb2_grpc.DecoderStub(channels["decoder"])
    answers, error = _stream(stub.DecodeStream, [_decode(model="two", version=1), _decode(model="two"),
                                                 _decode(model="two")])
    assert error is None and [a.version for a in answers] == [1, 2, 2]
    oip = service_pb2_grpc.GRPCInferenceServiceStub(channels["decoder"])
    first, newest = _oip(), _oip()
    first.model_name = newest.model_name = "two"
    first.model_version = "1"
    answers, error = _stream(oip.ModelStreamInfer, [first, newest])
    assert error is None and [a.infer_response.model_version for a in answers] == ["1", "2"], answers
