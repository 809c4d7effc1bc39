"""Serving that survives faults and floods (issue 9), against real server processes: a repository that
agrees with the disk, wire errors with their own statuses, admission control, and a bounded shutdown."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aevae.services.process import ServiceProcess
from aevae.v1 import decoder_pb2, decoder_pb2_grpc, tensor_pb2
from aevae.v1.tensors import from_tensor, to_tensor
from helpers import Samples, metrics_url, run_aevae, scrape, write_tiny

MAX_MESSAGE = 65536
ARGS = ["--max-message-bytes", str(MAX_MESSAGE), "--refresh-seconds", "0.1"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hardening") / "models"
    write_tiny(root, "vae")
    write_tiny(root, "ae", "ae")
    return root


@pytest.fixture(scope="module")
def decoder(repo: Path) -> Iterator[ServiceProcess]:
    with ServiceProcess("decoder", repo, args=ARGS) as service:
        service.wait_healthy()
        yield service


@pytest.fixture(scope="module")
def channel(decoder: ServiceProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(decoder.address) as ch:
        yield ch


def _request(n: int = 2, model: str = "vae", **kw: object) -> decoder_pb2.DecodeRequest:
    z = np.random.default_rng(n).normal(size=(n, 4)).astype(np.float32)
    return decoder_pb2.DecodeRequest(model=model, latents=to_tensor(z), **kw)  # type: ignore[arg-type]


def _raw(channel: grpc.Channel, method: str, streaming: bool = False):  # type: ignore[no-untyped-def]
    path = f"/aevae.v1.Decoder/{method}"
    make = channel.stream_stream if streaming else channel.unary_unary
    return make(path, request_serializer=lambda b: b, response_deserializer=decoder_pb2.DecodeResponse.FromString)


def _status(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code(), error.value.details()


def test_unparsable_request_bytes_are_invalid_argument(channel: grpc.Channel) -> None:
    code, details = _status(lambda: _raw(channel, "Decode")(b"\xff\xff\xff\xff"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid aevae.v1.DecodeRequest" in details


def test_health_and_reflection_requests_that_do_not_parse_are_invalid_argument(decoder: ServiceProcess,
                                                                                channel: grpc.Channel) -> None:
    """grpc's own health and reflection services take calls without a token: bytes that do not parse get
    INVALID_ARGUMENT naming the message (not UNKNOWN), and no traceback in the log for anyone to flood."""
    check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b)
    code, details = _status(lambda: check(b"\xff\xff\xff", timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "grpc.health.v1.HealthCheckRequest" in details
    reflect = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                    request_serializer=lambda b: b)
    code, details = _status(lambda: list(reflect(iter([b"\xff\xff\xff"]), timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "ServerReflectionRequest" in details
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND  # the servicer's own answers pass through
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # a stream written with context.write
    watch.cancel()
    assert "Traceback" not in "".join(decoder.output)


def test_in_a_stream_earlier_answers_arrive_before_the_error_naming_its_position(channel: grpc.Channel) -> None:
    good = _request(3).SerializeToString()
    too_big = decoder_pb2.DecodeRequest(model="vae", latents=tensor_pb2.Tensor(
        dtype="float32", shape=[MAX_MESSAGE // 16 + 256, 4], data=b"\0" * (MAX_MESSAGE + 4096))).SerializeToString()
    assert MAX_MESSAGE < len(too_big) < 2 * MAX_MESSAGE + 100
    for bad, code, words in ((b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "not a valid"),
                             (too_big, grpc.StatusCode.RESOURCE_EXHAUSTED, f"max message size of {MAX_MESSAGE}")):
        responses = []
        with pytest.raises(grpc.RpcError) as error:
            for response in _raw(channel, "DecodeStream", streaming=True)(iter([good, good, bad, good])):
                responses.append(response)
        assert len(responses) == 2 and all(len(from_tensor(r.images, "i")) == 3 for r in responses), error.value.details()
        assert error.value.code() == code
        assert error.value.details().startswith("message 2: ") and words in error.value.details()


@pytest.mark.parametrize("tensor, words", [
    (tensor_pb2.Tensor(dtype="float32", shape=[1] * 33, data=b"\0" * 4), "at most 32 dimensions"),
    (tensor_pb2.Tensor(dtype="float32", shape=[0, 2**62], data=b""), "below 2**40"),
    (to_tensor(np.array([[0, 0, 0, 0], [1e22, 0, 0, 0]], np.float32)), "values must lie in [-10000, 10000]; row 1"),
])
def test_unrepresentable_shapes_and_huge_latents_are_invalid_argument(channel: grpc.Channel,
                                                                        tensor: tensor_pb2.Tensor,
                                                                        words: str) -> None:
    stub = decoder_pb2_grpc.DecoderStub(channel)
    code, details = _status(lambda: stub.Decode(decoder_pb2.DecodeRequest(model="vae", latents=tensor)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details


def test_a_huge_model_name_is_not_found_with_a_short_message(channel: grpc.Channel) -> None:
    stub = decoder_pb2_grpc.DecoderStub(channel)
    code, details = _status(lambda: stub.Decode(_request(model="m" * 30_000)))  # the details travel in 8 KiB of metadata
    assert code == grpc.StatusCode.NOT_FOUND and len(details) < 400 and "30000 chars" in details


def test_oip_answers_past_the_max_message_size_are_refused_clearly(decoder: ServiceProcess,
                                                                     channel: grpc.Channel) -> None:
    """The Open Inference Protocol's answers carry more than their outputs (the id, echoed whole; names and
    shapes): 16 rows of 32 x 32 floats are exactly MAX_MESSAGE bytes of outputs, which the logic admits, but
    not the whole answer. RESOURCE_EXHAUSTED naming the sizes and the rows that fit, not gRPC's "Sent
    message larger than max"; in a stream, that message's error_message, and the stream goes on (also when
    echoing a failed request's long id would pass the size)."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    def request(n: int, id: str = "", data: bytes | None = None) -> service_pb2.ModelInferRequest:
        z = np.ones((n, 4), np.float32).tobytes()
        message = service_pb2.ModelInferRequest(model_name="vae", id=id, raw_input_contents=[z if data is None else data])
        message.inputs.add(name="latents", datatype="FP32", shape=[n, 4])
        return message

    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    code, details = _status(lambda: stub.ModelInfer(request(16), timeout=20))  # the images alone fill it
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "send at most 15 per request" in details
    code, details = _status(lambda: stub.ModelInfer(request(15, "i" * 5000), timeout=20))  # the id does not fit
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"over the max message size of {MAX_MESSAGE} bytes" in details and "at most about 14 rows" in details
    long_failing = request(2, "y" * (MAX_MESSAGE - 80), data=b"abc")  # fits; its error answer with the id would not
    assert long_failing.ByteSize() < MAX_MESSAGE
    messages = [request(2, "a"), request(15, "x" * 40000), long_failing, request(2, "d")]
    answers = list(stub.ModelStreamInfer(iter(messages), timeout=20))
    assert [a.infer_response.id[:1] for a in answers] == ["a", "x", "", "d"]
    assert [a.error_message.split(":")[1:2] for a in answers] == [[], [" RESOURCE_EXHAUSTED"], [" INVALID_ARGUMENT"], []]
    assert "the request's id of 40000 bytes" in answers[1].error_message
    assert "needs 32 bytes" in answers[2].error_message and "left out of this answer" in answers[2].error_message
    assert len(answers[3].infer_response.raw_output_contents[0]) == 2 * 32 * 32 * 4
    assert stub.ModelInfer(request(15), timeout=20).model_version == "1"  # still serving
    assert "Traceback" not in "".join(decoder.output)


def test_an_answer_of_the_whole_max_message_size_is_refused_before_it_is_computed(channel: grpc.Channel) -> None:
    """aevae.v1: 16 images of 4 KiB are exactly MAX_MESSAGE bytes; with the answer's name, version and shape
    gRPC would refuse to send it ("Sent message larger than max"), so the logic refuses it first, naming the
    15 that fit, and 15 answer."""
    stub = decoder_pb2_grpc.DecoderStub(channel)
    code, details = _status(lambda: stub.Decode(decoder_pb2.DecodeRequest(
        model="vae", latents=to_tensor(np.zeros((16, 4), np.float32))), timeout=20))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "send at most 15 per request" in details, details
    answer = stub.Decode(decoder_pb2.DecodeRequest(model="vae", latents=to_tensor(np.zeros((15, 4), np.float32))),
                         timeout=20)
    assert list(answer.images.shape) == [15, 32, 32]


def test_bad_requests_leave_no_traceback_and_no_server_path(decoder: ServiceProcess, repo: Path) -> None:
    assert "Traceback" not in "".join(decoder.output)
    stub = decoder_pb2_grpc.DecoderStub(decoder_channel := grpc.insecure_channel(decoder.address))
    try:
        code, details = _status(lambda: stub.Decode(_request(model="nope")))
    finally:
        decoder_channel.close()
    assert code == grpc.StatusCode.NOT_FOUND and str(repo.parent) not in details


def test_a_corrupt_newest_version_is_reported_skipped_and_refused_by_name(repo: Path, channel: grpc.Channel) -> None:
    version = write_tiny(repo, "vae", seed=4)
    data = bytearray(version.file("weights.pt").read_bytes())
    data[200:264] = bytes(b ^ 0xFF for b in data[200:264])
    version.file("weights.pt").write_bytes(bytes(data))
    time.sleep(0.3)  # the refresh interval
    stub = decoder_pb2_grpc.DecoderStub(channel)
    (info,) = [m for m in stub.ListModels(tensor_pb2.ListModelsRequest()).models if m.name == "vae"]
    assert info.version == 1 and list(info.versions) == [1]
    assert [(b.version, "checksum" in b.reason) for b in info.broken] == [(2, True)]
    assert stub.Decode(_request()).version == 1
    code, details = _status(lambda: stub.Decode(_request(version=2)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "version 2 is broken" in details


def test_admission_caps_calls_while_health_and_list_models_answer(repo: Path) -> None:
    with ServiceProcess("decoder", repo, args=["--max-concurrent-rpcs", "1"]) as service:
        service.wait_healthy()
        with grpc.insecure_channel(service.address) as channel:
            stub = decoder_pb2_grpc.DecoderStub(channel)
            held: list[decoder_pb2.DecodeRequest] = []

            def requests() -> Iterator[decoder_pb2.DecodeRequest]:
                yield _request(1)
                while not held:  # keep the stream open until the test is done
                    time.sleep(0.05)

            stream = stub.DecodeStream(requests())
            next(stream)
            code, details = _status(lambda: stub.Decode(_request()))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-concurrent-rpcs 1" in details
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert stub.ListModels(tensor_pb2.ListModelsRequest()).models
            held.append(_request())
            assert list(stream) == []
            assert stub.Decode(_request()).version == 1  # the slot is free again


def test_sigterm_under_a_backlog_exits_within_the_grace(repo: Path) -> None:
    grace = 2.0
    service = ServiceProcess("decoder", repo, args=["--grace", str(grace), "--shutdown-delay", "0.1"]).start()
    try:
        service.wait_healthy()
        z = np.random.default_rng(0).normal(size=(2048, 4)).astype(np.float32)  # 2 MiB of uint8 images
        channels = [grpc.insecure_channel(service.address) for _ in range(8)]
        streams = [decoder_pb2_grpc.DecoderStub(ch).DecodeStream(
            iter([decoder_pb2.DecodeRequest(model="vae", latents=to_tensor(z), dtype="uint8")] * 400))
            for ch in channels]
        for stream in streams:
            next(stream)  # every stream is in flight, with hundreds of messages behind it
        started = time.monotonic()
        service.signal(signal.SIGTERM)
        code = service.process.wait(grace + 30)  # type: ignore[union-attr]
        elapsed = time.monotonic() - started
        for ch in channels:
            ch.close()
        assert code == 0
        assert elapsed < grace + 0.1 + 2.0 + 3.0, f"exited {elapsed:.1f} s after SIGTERM (grace {grace} s)"
    finally:
        service.stop()


def test_calls_cancelled_while_computing_give_their_answer_budget_back(repo: Path) -> None:
    """Clients that give up on big decodes leave the answer budget as they found it: the next big answer is
    computed at once. (Before, a cancelled call's share came back only when the server's garbage collector
    freed its frame, which the metrics interceptor's traceback kept in a cycle: on a server with nothing else
    to do, never, and this stream waited out its deadline.)"""
    big = _request(4000)  # 64 KB of latents, 16 MB of images: more than the budget, so each waits for an empty one
    args = ["--max-inflight-bytes", str(4 << 20), "--metrics-port", "0"]
    with ServiceProcess("decoder", repo, args=args) as service:
        service.wait_healthy()
        with grpc.insecure_channel(service.address, options=[("grpc.max_receive_message_length", -1)]) as channel:
            stub = decoder_pb2_grpc.DecoderStub(channel)
            futures = [stub.Decode.future(big) for _ in range(10)]
            time.sleep(0.05)  # some wait for the budget, one computes
            for future in futures:
                future.cancel()
            time.sleep(0.5)
            stream = list(stub.DecodeStream(iter([big, _request(3)]), timeout=20))
            assert [from_tensor(r.images, "images").shape[0] for r in stream] == [4000, 3]


def test_streams_cancelled_while_answers_are_written_log_no_traceback(repo: Path) -> None:
    big = _request(4000)
    with ServiceProcess("decoder", repo) as service:
        service.wait_healthy()
        with grpc.insecure_channel(service.address, options=[("grpc.max_receive_message_length", -1)]) as channel:
            stub = decoder_pb2_grpc.DecoderStub(channel)
            streams = [stub.DecodeStream(iter([big] * 50)) for _ in range(4)]
            next(streams[0])
            time.sleep(1.0)  # the server is writing answers nobody reads
            for stream in streams:
                stream.cancel()
            time.sleep(0.5)
            assert stub.Decode(_request(3)).version == 1
    output = "".join(service.output)  # all of it: the process has exited
    assert "Traceback" not in output and "ExecuteBatchError" not in output, output[-2000:]


def test_streams_whose_clients_stop_reading_hold_at_most_the_unsent_budget(repo: Path) -> None:
    """A flood of streams whose clients never read: each holds its answers in the server until they are sent,
    so without a cap memory grows with the number of streams (uncapped, this flood grew the server by 413 MiB;
    16 streams of 64 MB answers by 3 GiB). With --max-unsent-bytes the answers computed and not sent stay under
    it, the other streams wait before computing theirs, unary calls are answered meanwhile, and the budget
    comes back when the clients go."""
    import psutil

    big = _request(4000)  # 16 MB of float32 images per answer
    cap = 24 << 20  # one answer fits, two do not
    args = ["--max-unsent-bytes", str(cap), "--metrics-port", "0"]
    with ServiceProcess("decoder", repo, args=args) as service:
        service.wait_healthy()
        url = metrics_url(service.output)
        assert service.process is not None
        server = psutil.Process(service.process.pid)
        options = [("grpc.max_receive_message_length", -1)]
        channels = [grpc.insecure_channel(service.address, options=options) for _ in range(9)]
        try:
            stub = decoder_pb2_grpc.DecoderStub(channels[0])
            assert stub.Decode(_request(3)).version == 1  # warm: the model is loaded
            before = server.memory_info().rss
            stalled = [decoder_pb2_grpc.DecoderStub(c).DecodeStream(iter([big] * 3)) for c in channels[1:]]  # unread
            deadline = time.monotonic() + 20
            while value_of(scrape(url), "aevae_admission_unsent_bytes") == 0:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            time.sleep(1.0)  # what more the streams would take, they take now
            unsent = value_of(scrape(url), "aevae_admission_unsent_bytes")
            assert 0 < unsent <= cap
            grown = server.memory_info().rss - before
            assert grown < 150 << 20, f"the server grew by {grown >> 20} MiB"  # capped: about 70; uncapped: 413
            assert len(from_tensor(stub.Decode(_request(3), timeout=10).images, "images")) == 3  # unary answers
            for stream in stalled:
                stream.cancel()
            deadline = time.monotonic() + 20
            while value_of(scrape(url), "aevae_admission_unsent_bytes") != 0:
                assert time.monotonic() < deadline, "the stalled streams' bytes did not come back"
                time.sleep(0.1)
            answers = list(stub.DecodeStream(iter([big, big, _request(3)]), timeout=30))
            assert [from_tensor(r.images, "images").shape[0] for r in answers] == [4000, 4000, 3]
        finally:
            for channel in channels:
                channel.close()


def test_a_stream_whose_client_stopped_reading_ends_with_its_connections_age(repo: Path) -> None:
    """A live client that stops reading a stream answers the keepalive pings, and grpc.aio cannot end a call
    whose write waits on flow control: the stream held its call slot (and what gRPC had taken of its answers)
    for as long as the connection lived, for good. --max-connection-age-s asks the client to reconnect, and
    after --max-connection-age-grace-s the connection closes: the slot and the bytes come back, and a client
    that goes on calling is answered throughout (its next calls on a new connection)."""
    big = _request(4000)  # 16 MB of float32 images per answer
    args = ["--max-concurrent-rpcs", "2", "--max-connection-age-s", "1", "--max-connection-age-grace-s", "1",
            "--metrics-port", "0"]
    with ServiceProcess("decoder", repo, args=args) as service:
        service.wait_healthy()
        url = metrics_url(service.output)
        options = [("grpc.max_receive_message_length", -1)]
        with grpc.insecure_channel(service.address, options=options) as stalled_channel, \
                grpc.insecure_channel(service.address, options=options) as channel:
            stalled = decoder_pb2_grpc.DecoderStub(stalled_channel).DecodeStream(iter([big] * 20))  # never read
            stub = decoder_pb2_grpc.DecoderStub(channel)
            deadline = time.monotonic() + 30
            while value_of(scrape(url), "aevae_admission_calls") < 1:  # the stream holds its slot
                assert time.monotonic() < deadline
                time.sleep(0.05)
            answered = 0
            while value_of(scrape(url), "aevae_admission_calls") > 0 or answered < 20:
                assert time.monotonic() < deadline, "the stalled stream kept its slot past its connection's age"
                assert stub.Decode(_request(3), timeout=10).version == 1  # answered across the reconnections
                answered += 1
                time.sleep(0.1)
            assert value_of(scrape(url), "aevae_admission_unsent_bytes") == 0
            with pytest.raises(grpc.RpcError) as ended:
                for _ in stalled:  # what the client had received, then the end of the connection
                    pass
            assert ended.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                          grpc.StatusCode.INTERNAL), ended.value
    output = "".join(service.output)
    assert "Traceback" not in output, output[-2000:]


def test_the_client_resumes_streams_cut_by_their_connections_age(repo: Path) -> None:
    """A stream longer than its connection's age plus the grace is cut when the connection closes: aevae's
    client resumes it after its last answer, on a new connection, and every image comes back, in order."""
    from aevae.client import DecoderClient
    from aevae.store import ModelStore

    z = np.random.default_rng(0).normal(size=(150_000, 4)).astype(np.float32)
    args = ["--max-connection-age-s", "0.2", "--max-connection-age-grace-s", "0.2", "--metrics-port", "0"]
    with ServiceProcess("decoder", repo, args=args) as service:
        service.wait_healthy()
        with DecoderClient(service.address, timeout=120) as client:
            images = client.decode(z, model="vae")
        streams = sum(v for (n, labels), v in scrape(metrics_url(service.output)).items()
                      if n == "aevae_grpc_requests_total" and ("method", "DecodeStream") in labels)
    assert streams >= 2, f"{streams} stream(s): none was cut, so nothing was resumed"
    expected = ModelStore(repo).get("vae").decode(z)
    assert images.shape == expected.shape and np.array_equal(images, expected)


def value_of(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


class _SilentRelay:
    """A TCP relay to `target` that can fall silent: after `silence()` it relays nothing more but keeps both
    connections open, as a client whose host crashed or whose network vanished (no FIN, no RST)."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.silent = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        self.silent.set()

    def close(self) -> None:
        for s in [self.listener, *self.sockets]:
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        while True:
            try:
                data = a.recv(65536)
                if not data or self.silent.is_set():
                    return  # silent: nothing is forwarded, nothing closed (the sockets stay open until close())
                b.sendall(data)
            except OSError:
                return


def test_a_client_gone_without_closing_its_connection_loses_its_stream_to_keepalive(repo: Path) -> None:
    """A stream whose client vanished holds its admission slot only until the server's pings go unanswered
    (--keepalive-seconds); without them, until TCP gives up, hours later."""
    args = ["--max-concurrent-rpcs", "1", "--keepalive-seconds", "1"]
    with ServiceProcess("decoder", repo, args=args) as service:
        service.wait_healthy()
        relay = _SilentRelay(service.address)
        held = threading.Event()

        def requests() -> Iterator[decoder_pb2.DecodeRequest]:
            yield _request(2)
            held.wait(60)  # an open stream: more may come

        try:
            with grpc.insecure_channel(relay.address) as far, grpc.insecure_channel(service.address) as near:
                stream = decoder_pb2_grpc.DecoderStub(far).DecodeStream(requests())
                assert len(from_tensor(next(stream).images, "images")) == 2
                direct = decoder_pb2_grpc.DecoderStub(near)
                code, details = _status(lambda: direct.Decode(_request(1)))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # the stream holds the one slot
                relay.silence()
                deadline = time.monotonic() + 20
                while True:
                    try:
                        assert direct.Decode(_request(1)).version == 1  # the slot came back
                        break
                    except grpc.RpcError as error:
                        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                        time.sleep(0.2)
                held.set()
                stream.cancel()
        finally:
            held.set()
            relay.close()


def _one_then_held(done: threading.Event) -> Iterator[decoder_pb2.DecodeRequest]:
    """A stream's requests: one message, then nothing until `done` (the stream stays open, holding its slot)."""
    yield _request(1)
    done.wait(60)


def test_streams_that_send_nothing_hold_no_call_slot(repo: Path) -> None:
    """256 streams opened on one connection that sent nothing held every slot of --max-concurrent-rpcs, and
    every other client's calls were refused for --stream-idle-s (and again when they were reopened). A stream
    now takes its slot with its first message."""
    with ServiceProcess("decoder", repo, args=["--max-concurrent-rpcs", "1"]) as service:
        service.wait_healthy()
        done = threading.Event()

        def nothing() -> Iterator[decoder_pb2.DecodeRequest]:
            done.wait(60)
            return
            yield

        def one() -> Iterator[decoder_pb2.DecodeRequest]:
            return _one_then_held(done)

        with grpc.insecure_channel(service.address) as channel:
            stub = decoder_pb2_grpc.DecoderStub(channel)
            empty = [stub.DecodeStream(nothing()) for _ in range(8)]
            try:
                time.sleep(0.5)  # the streams are open on the server
                assert stub.Decode(_request(1)).version == 1  # none of them holds the one slot
                working = stub.DecodeStream(one())
                assert len(from_tensor(next(working).images, "images")) == 1
                code, details = _status(lambda: stub.Decode(_request(1)))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-concurrent-rpcs 1" in details
                late = stub.DecodeStream(one())  # its first message finds no slot: refused, saying so
                code, details = _status(lambda: next(late))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-concurrent-rpcs 1" in details
            finally:
                done.set()
                for call in empty:
                    call.cancel()
            assert list(working) == []
            assert stub.Decode(_request(1)).version == 1  # the slot is free again


def test_streams_that_stop_reading_leave_unary_calls_a_quarter_of_the_slots(repo: Path) -> None:
    """Streams whose clients wrote and never read held every slot (the auditor's 256, for up to the
    connection's age) and every other client's Decode was refused. With 8 slots, 6 streams are let in, the
    seventh is refused saying why, and Decode still answers."""
    with ServiceProcess("decoder", repo, args=["--max-concurrent-rpcs", "8"]) as service:
        service.wait_healthy()
        done = threading.Event()
        with grpc.insecure_channel(service.address) as channel:
            stub = decoder_pb2_grpc.DecoderStub(channel)
            held = [stub.DecodeStream(_one_then_held(done)) for _ in range(6)]
            try:
                for call in held:  # each is admitted: its first answer comes
                    assert len(from_tensor(next(call).images, "images")) == 1
                code, details = _status(lambda: next(stub.DecodeStream(_one_then_held(done))))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
                assert "6 streams open" in details and "kept for unary calls" in details, details
                assert stub.Decode(_request(1)).version == 1  # the unary calls' quarter
            finally:
                done.set()
                for call in held:
                    call.cancel()


def test_an_idle_stream_ends_after_stream_idle_s_and_gives_its_slot_back(repo: Path) -> None:
    """A live client that opens a stream and then sends nothing holds its admission slot only for
    --stream-idle-s; the stream ends with DEADLINE_EXCEEDED naming the flag, after the answers it was owed."""
    args = ["--max-concurrent-rpcs", "1", "--stream-idle-s", "0.5"]
    with ServiceProcess("decoder", repo, args=args) as service:
        service.wait_healthy()
        held = threading.Event()

        def requests() -> Iterator[decoder_pb2.DecodeRequest]:
            yield _request(2)
            yield _request(3)
            held.wait(60)  # open, and idle

        try:
            with grpc.insecure_channel(service.address) as ch:
                stub = decoder_pb2_grpc.DecoderStub(ch)
                stream = stub.DecodeStream(requests())
                assert [len(from_tensor(r.images, "images")) for r in (next(stream), next(stream))] == [2, 3]
                code, _ = _status(lambda: stub.Decode(_request(1)))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # the open stream holds the one slot
                code, details = _status(lambda: next(stream))
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "--stream-idle-s" in details, details
                assert stub.Decode(_request(1)).version == 1  # the slot came back
        finally:
            held.set()


def test_a_models_dir_that_is_a_file_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "models").write_text("not a folder")
    done = run_aevae("serve", "decoder", "--port", "0", "--models-dir", str(tmp_path / "models"), timeout=60)
    assert done.returncode == 2 and "is a file, not a folder" in done.stderr, done.stderr
