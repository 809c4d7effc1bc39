"""The services against a hostile outside user, on real `aevae serve` processes: request bytes that parse as
no message on the methods whose request has no fields, streams the client cancels or lets time out (their
status in the metrics), calls cut at the end of the shutdown's grace, connections opened and abandoned, a
flood of bad calls (descriptors, threads and the admission budgets afterwards), and a new version appearing
half-written in the repository of a running server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from aevae.services.process import ServiceProcess
from aevae.v1 import decoder_pb2, decoder_pb2_grpc, tensor_pb2
from aevae.v1.tensors import from_tensor, to_tensor
from helpers import (DATA, END_STREAM, H2_PREFACE, SETTINGS, Samples, grpc_call_start, grpc_message, h2_frame,
                     metrics_url, read_call_frames, running, scrape, still_open, write_tiny)

GARBAGE = b"\xff\xff\xff\xff"  # a field key with no end: no protobuf message parses from it


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audit") / "models"
    write_tiny(root, "vae")
    return root


@pytest.fixture(scope="module")
def services(repo: Path) -> Iterator[dict[str, ServiceProcess]]:
    # one worker thread: the warm-up of the flood test has made every thread the server will make
    with running(repo, ["--metrics-port", "0", "--shutdown-delay", "0", "--workers", "1"]) as started:
        yield started


def _request(n: int = 2, model: str = "vae") -> decoder_pb2.DecodeRequest:
    return decoder_pb2.DecodeRequest(model=model, latents=to_tensor(np.zeros((n, 4), np.float32)))


def _failure(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def _value(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("Threads:")).split()[1])


def test_methods_whose_request_has_no_fields_refuse_bytes_that_are_no_request(
        services: dict[str, ServiceProcess]) -> None:
    """ListModels and the OIP's ServerLive, ServerReady and ServerMetadata ignored their request, so bytes that
    are no message at all were answered OK, as if they were one; every other method answers them
    INVALID_ARGUMENT naming the message it expected."""
    methods = {
        "encoder": ["/aevae.v1.Encoder/ListModels"],
        "decoder": ["/aevae.v1.Decoder/ListModels", "/inference.GRPCInferenceService/ServerLive",
                    "/inference.GRPCInferenceService/ServerReady", "/inference.GRPCInferenceService/ServerMetadata"],
    }
    for kind, paths in methods.items():
        with grpc.insecure_channel(services[kind].address) as channel:
            for path in paths:
                call = channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
                error = _failure(lambda: call(GARBAGE, timeout=10))
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, path
                assert "are not a valid" in error.details() and "Request message" in error.details(), path
                assert call(b"", timeout=10) is not None  # the empty message is the request: answered
    with grpc.insecure_channel(services["decoder"].address) as channel:
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                   request_serializer=service_pb2.ServerLiveRequest.SerializeToString,
                                   response_deserializer=service_pb2.ServerLiveResponse.FromString)
        assert live(service_pb2.ServerLiveRequest(), timeout=10).live


def test_cancelled_and_timed_out_streams_are_counted_as_such_not_as_unknown(
        services: dict[str, ServiceProcess]) -> None:
    """A stream whose client cancels it, or whose deadline passes, ends by gRPC closing the servicer's
    response generator: the metrics counted those as UNKNOWN, a status no client ever saw."""
    decoder = services["decoder"]
    url = metrics_url(decoder.output)
    stream = dict(service="aevae.v1.Decoder", method="DecodeStream")
    before = scrape(url)
    endless = threading.Event()

    def requests() -> Iterator[decoder_pb2.DecodeRequest]:
        while not endless.is_set():  # as fast as flow control lets them go: the server always has work
            yield _request(2)

    try:
        with grpc.insecure_channel(decoder.address) as channel:
            stub = decoder_pb2_grpc.DecoderStub(channel)
            for _ in range(10):
                call = stub.DecodeStream(requests(), timeout=30)
                assert len(from_tensor(next(call).images, "images")) == 2
                call.cancel()
            for _ in range(2):
                error = _failure(lambda: list(stub.DecodeStream(requests(), timeout=0.5)))
                assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        endless.set()
    deadline = time.monotonic() + 20
    while True:  # the server counts a stream once its handler has ended, a moment after the client's end,
        # and gives its admission slot back as the handler's last step (on a loaded machine, a scrape between)
        after = scrape(url)
        ended = _value(after, "aevae_grpc_requests_total", **stream) - _value(before, "aevae_grpc_requests_total", **stream)
        released = _value(after, "aevae_admission_calls") == 0 and _value(after, "aevae_admission_unsent_bytes") == 0
        if (ended >= 12 and released) or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    def delta(code: str) -> float:
        return (_value(after, "aevae_grpc_requests_total", **stream, code=code)
                - _value(before, "aevae_grpc_requests_total", **stream, code=code))

    assert delta("UNKNOWN") == 0
    # A stream that had answered all it had read when the client went ends as if the client had finished:
    # gRPC tells the servicer no more than that its requests ended, so that one counts as OK.
    assert delta("CANCELLED") + delta("DEADLINE_EXCEEDED") + delta("OK") == 12
    assert delta("CANCELLED") >= 1 and delta("DEADLINE_EXCEEDED") >= 1  # a deadline told apart from a cancel
    assert _value(after, "aevae_admission_calls") == 0 and _value(after, "aevae_admission_unsent_bytes") == 0


def _flood(stub: decoder_pb2_grpc.DecoderStub, channel: grpc.Channel, rounds: int) -> set[grpc.StatusCode]:
    """Calls that fail, of every kind a client can send; the statuses they got."""
    rng = np.random.default_rng(rounds)
    raw = [channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
           for path in ("/aevae.v1.Decoder/Decode", "/inference.GRPCInferenceService/ModelInfer")]
    codes: set[grpc.StatusCode] = set()
    for i in range(rounds):
        for call in raw:
            codes.add(_failure(lambda: call(rng.bytes(int(rng.integers(1, 40))) + GARBAGE, timeout=10)).code())
        if i % 10 == 0:
            codes.add(_failure(lambda: stub.Decode(_request(1, model=f"../x{i}"), timeout=10)).code())
            try:
                stub.Decode(_request(1), timeout=0.001)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        if i % 50 == 0:
            stream = stub.DecodeStream(iter([_request(2)] * 1000), timeout=30)
            next(stream)
            stream.cancel()
    return codes


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1])


def test_a_flood_of_bad_calls_leaks_no_descriptor_thread_memory_or_budget(
        services: dict[str, ServiceProcess]) -> None:
    """Thousands of calls that fail (bytes that are no request, unknown models, cancelled streams, deadlines
    of a millisecond) leave the server as they found it, and it goes on serving."""
    decoder = services["decoder"]
    assert decoder.process is not None
    pid = decoder.process.pid
    with grpc.insecure_channel(decoder.address) as channel:
        stub = decoder_pb2_grpc.DecoderStub(channel)
        _flood(stub, channel, 100)  # warm: the executor's threads and the allocator's arenas exist after it
        fds, threads, rss = _fds(pid), _threads(pid), _rss_kib(pid)
        codes = _flood(stub, channel, 1000)
        assert codes == {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
        assert stub.Decode(_request(3), timeout=10).version == 1
    deadline = time.monotonic() + 20
    while (_fds(pid) > fds or _threads(pid) > threads) and time.monotonic() < deadline:
        time.sleep(0.1)  # a closed connection's descriptor goes a moment after the client's close
    assert _fds(pid) <= fds and _threads(pid) <= threads
    assert _rss_kib(pid) - rss < 32 * 1024  # measured: well under 1 MiB; a leak per call would be ~MiBs
    samples = scrape(metrics_url(decoder.output))
    for gauge in ("calls", "request_bytes", "answer_bytes", "unsent_bytes"):
        assert _value(samples, f"aevae_admission_{gauge}") == 0, gauge
    assert "Traceback" not in "".join(decoder.output)


def test_connections_opened_and_abandoned_are_closed(repo: Path) -> None:
    """A connection its client opened and left (no calls, nothing read, never closed) held one of the server's
    file descriptors for good: keepalive pings went only to connections with calls, and enough such
    connections took the last descriptor, so that the server could accept nobody. Now the pings reach them,
    and unanswered they close; a live client's idle channel answers them and stays."""
    with ServiceProcess("decoder", repo, args=["--keepalive-seconds", "1"]) as service:
        service.wait_healthy()
        host, port = service.address.rsplit(":", 1)
        with grpc.insecure_channel(service.address) as channel:
            stub = decoder_pb2_grpc.DecoderStub(channel)
            assert stub.Decode(_request(1), timeout=10).version == 1
            states: list[grpc.ChannelConnectivity] = []
            channel.subscribe(states.append)
            abandoned = [socket.create_connection((host, int(port))) for _ in range(8)]
            try:
                for connection in abandoned:
                    connection.sendall(H2_PREFACE + h2_frame(SETTINGS, 0, 0, b""))
                open_ = still_open(abandoned, 30)
                assert not open_, f"{len(open_)} of {len(abandoned)} abandoned connections still open"
            finally:
                for connection in abandoned:
                    connection.close()
            assert stub.Decode(_request(2), timeout=10).version == 1
            channel.unsubscribe(states.append)
            assert set(states) == {grpc.ChannelConnectivity.READY}  # the live idle channel was never dropped


def test_calls_cut_at_the_end_of_the_grace_leave_no_traceback(repo: Path) -> None:
    """SIGTERM with streams that outlast --grace: they are cut (UNAVAILABLE, after the answers they were sent)
    and the process exits 0. grpc.aio printed a bare CancelledError traceback on stderr for each cut call,
    because the process ended before their tasks had unwound."""
    service = ServiceProcess("decoder", repo, args=["--grace", "0.5", "--shutdown-delay", "0"]).start()
    ended = threading.Event()
    z = np.zeros((64, 4), np.float32)
    oip = service_pb2.ModelInferRequest(model_name="vae", raw_input_contents=[z.tobytes()], inputs=[
        service_pb2.ModelInferRequest.InferInputTensor(name="latents", datatype="FP32", shape=[64, 4])])

    def requests(message: object) -> Iterator[object]:
        while not ended.is_set():  # a stream that goes on past the grace, busy until it is cut
            yield message
            time.sleep(0.02)

    answered: list[int] = []
    codes: list[grpc.StatusCode] = []

    def consume(stream: Iterator[object]) -> None:
        count = 0
        try:
            for _ in stream:
                count += 1
        except grpc.RpcError as error:
            codes.append(error.code())
        answered.append(count)

    def hammer() -> None:
        with grpc.insecure_channel(service.address) as own:
            stub = decoder_pb2_grpc.DecoderStub(own)
            while not ended.is_set():
                try:
                    stub.Decode(_request(64), timeout=10)
                except grpc.RpcError as error:  # refused once the server stops taking calls, or cut
                    assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                    return

    try:
        service.wait_healthy()
        with grpc.insecure_channel(service.address) as channel:
            serialize = lambda m: m.SerializeToString()  # noqa: E731
            aevae_v1 = channel.stream_stream("/aevae.v1.Decoder/DecodeStream", request_serializer=serialize)
            oip_v2 = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                           request_serializer=serialize)
            streams = [aevae_v1(requests(_request(64)), timeout=60) for _ in range(5)]
            streams += [oip_v2(requests(oip), timeout=60) for _ in range(3)]
            for stream in streams:
                next(stream)  # each is being served
            readers = [threading.Thread(target=consume, args=(stream,)) for stream in streams]
            readers += [threading.Thread(target=hammer) for _ in range(2)]  # unary calls meanwhile
            for reader in readers:
                reader.start()
            service.signal(signal.SIGTERM)
            assert service.process is not None
            assert service.process.wait(30) == 0
            for reader in readers:
                reader.join(30)
    finally:
        ended.set()
        service.stop()
    assert len(answered) == 8 and min(answered) > 0  # answered while draining, until the grace ended
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 8
    output = "".join(service.output)
    assert "stopping" in output  # the shutdown ran, past its grace
    assert "Traceback" not in output and "CancelledError" not in output, output


def test_a_drain_ends_with_its_last_call_though_a_connection_ignores_the_goaway(repo: Path) -> None:
    """gRPC's core sends each connection a GOAWAY at SIGTERM and waits for its client to close it: one idle
    HTTP/2 connection that never did held the drain for the whole --grace with nothing left to do. The drain
    now ends once no call is in flight, counting a call whose request is still arriving (not yet admitted)."""
    from aevae.services.server import CALL_TASK_NAMES

    assert CALL_TASK_NAMES  # what the drain counts calls by; a grpc whose names differ fails the wait below
    service = ServiceProcess("decoder", repo, args=["--grace", "60", "--shutdown-delay", "0"]).start()
    host, port = service.address.rsplit(":", 1)
    try:
        service.wait_healthy()
        idle = socket.create_connection((host, int(port)), timeout=30)
        idle.sendall(H2_PREFACE + h2_frame(SETTINGS, 0, 0, b""))  # and never a call, never closed
        call = socket.create_connection((host, int(port)), timeout=30)
        body = grpc_message(_request(3).SerializeToString())
        call.sendall(grpc_call_start("/aevae.v1.Decoder/Decode") + h2_frame(DATA, 0, 1, body[:7]))
        time.sleep(0.5)
        stopped = time.monotonic()
        service.signal(signal.SIGTERM)
        assert service.process is not None
        time.sleep(2)
        assert service.process.poll() is None, "the call half sent was cut: the drain did not wait for it"
        call.sendall(h2_frame(DATA, END_STREAM, 1, body[7:]))
        frames = read_call_frames(call)
        answer = b"".join(payload for kind, _, stream, payload in frames if kind == DATA and stream == 1)
        reply = decoder_pb2.DecodeResponse.FromString(answer[5:])
        assert from_tensor(reply.images, "images").shape == (3, 32, 32), frames
        assert service.process.wait(30) == 0
        # before: 20 s (when gRPC closed the idle connection itself), the grace if shorter; now 2.2 s
        assert time.monotonic() - stopped < 10, "the drain waited on the idle connection"
        idle.close()
        call.close()
    finally:
        service.stop()


def test_a_version_written_half_is_never_served_and_is_once_whole(tmp_path: Path) -> None:
    """A new version whose manifest lands first and its files later (a copy by hand, an rsync): the running
    server goes on answering with the one before, names what is wrong when the new one is asked for by
    number (missing, truncated, a folder or a dangling symlink in a file's place), and serves it once whole;
    never a status other than those documented, never a traceback."""
    repo = tmp_path / "models"
    write_tiny(repo, "vae")
    newer = write_tiny(tmp_path / "source", "vae", seed=1)  # its files, copied in by hand below
    target = repo / "vae" / "2"
    with ServiceProcess("decoder", repo, args=["--refresh-seconds", "0.1"]) as service:
        service.wait_healthy()
        with grpc.insecure_channel(service.address) as channel:
            stub = decoder_pb2_grpc.DecoderStub(channel)

            def settled(check) -> None:  # type: ignore[no-untyped-def]
                """Until the server has seen the change (it re-reads the repository every 0.1 s)."""
                deadline = time.monotonic() + 20
                while True:
                    try:
                        check()
                        return
                    except AssertionError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)

            def pinned_fails(reason: str) -> None:
                assert stub.Decode(_request(2), timeout=10).version == 1  # the newest one that loads
                error = _failure(lambda: stub.Decode(decoder_pb2.DecodeRequest(
                    model="vae", version=2, latents=to_tensor(np.zeros((1, 4), np.float32))), timeout=10))
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                assert reason in error.details() and str(repo) not in error.details(), error.details()

            target.mkdir()
            shutil.copy(newer.path / "manifest.json", target)
            settled(lambda: pinned_fails("no weights.pt"))
            listed = stub.ListModels(tensor_pb2.ListModelsRequest(), timeout=10).models[0]
            assert listed.version == 1 and [b.version for b in listed.broken] == [2]
            for name in newer.manifest.files:
                shutil.copy(newer.path / name, target)
            data = (newer.path / "decoder.onnx").read_bytes()
            (target / "decoder.onnx").write_bytes(data[: len(data) // 2])
            settled(lambda: pinned_fails("decoder.onnx does not match the checksum"))
            (target / "decoder.onnx").unlink()
            (target / "decoder.onnx").mkdir()
            settled(lambda: pinned_fails("no decoder.onnx"))
            (target / "decoder.onnx").rmdir()
            (target / "decoder.onnx").symlink_to(target / "gone.onnx")
            settled(lambda: pinned_fails("no decoder.onnx"))
            (target / "decoder.onnx").unlink()
            shutil.copy(newer.path / "decoder.onnx", target)

            def served() -> None:
                assert stub.Decode(_request(2), timeout=10).version == 2

            settled(served)
            assert not stub.ListModels(tensor_pb2.ListModelsRequest(), timeout=10).models[0].broken
    assert "Traceback" not in "".join(service.output)


def test_a_service_refuses_an_address_space_too_small_instead_of_aborting_later(tmp_path: Path) -> None:
    """Under `ulimit -v` 300-500 MiB gRPC's core aborted the serving process (SIGABRT) when it could not start a
    thread, every call in flight lost; at 600 MiB-1 GiB no model could load. A soft limit below the hard one
    is raised to it, as the open files' is."""
    import resource
    import subprocess
    import sys

    def limit(soft: int, hard: int) -> Any:
        return lambda: resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

    low = 600_000 * 1024
    refused = subprocess.run([sys.executable, "-m", "aevae.cli", "serve", "decoder", "--models-dir", str(tmp_path),
                              "--port", "0"], capture_output=True, text=True, timeout=60,
                             preexec_fn=limit(low, low))
    assert refused.returncode == 2, refused
    assert refused.stderr.startswith("aevae serve: error: this process's address space is limited to 585 MiB "
                                     "(ulimit -v 600000); the decoder service needs 1,536 MiB or more"), refused.stderr
    raised = subprocess.run([sys.executable, "-c", "import resource; from aevae.memory import address_space_refusal"
                             " as r; print(r(3 << 29, 'x'), resource.getrlimit(resource.RLIMIT_AS)[0] == "
                             "resource.RLIM_INFINITY)"], capture_output=True, text=True, timeout=60,
                            preexec_fn=limit(low, resource.RLIM_INFINITY))
    assert raised.stdout.split() == ["None", "True"], raised
