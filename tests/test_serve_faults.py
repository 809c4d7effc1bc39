"""Ray Serve (services/serve_app.py) under faults, for real: one local Ray with Serve's gRPC proxy and the
encoder and decoder applications over a tiny repository, called as a client would, through the proxy.

- bad requests answer the statuses and messages of `aevae serve` (a request over max_message_bytes included,
  which Serve's proxy, taking up to 2 GiB, lets through to the replica);
- a method of the other service sent to an application (Encode with ("application", "decoder")) is
  UNIMPLEMENTED naming where it is served, not INTERNAL with Ray's traceback in the details;
- streams cancelled mid-way give their admission slot back;
- the repository changing under the running applications: versions appear, disappear and break;
- a bad message in a stream is answered INVALID_ARGUMENT without a traceback in Serve's logs;
- a replica killed (SIGKILL) mid-traffic: calls after Serve has replaced it succeed;
- a replica killed (ray.kill) while a call is in flight on it: the call is UNAVAILABLE, saying it may be
  retried, and the client's retry succeeds on the replacement.

One app per module (Serve starts slowly), and a one-replica app of its own for the in-flight kill; the replica
kills come last.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest

from aevae.v1 import decoder_pb2, decoder_pb2_grpc, encoder_pb2, encoder_pb2_grpc, tensor_pb2
from aevae.v1.tensors import from_tensor, to_tensor
from helpers import write_tiny, write_tiny_set

DECODER = (("application", "decoder"),)
ENCODER = (("application", "encoder"),)
MAX_MESSAGE_BYTES = 65536  # the least allowed: small requests pass it
MAX_CALLS = 2  # the decoder's max_concurrent_rpcs: a leaked stream slot shows at once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_set(tmp_path_factory.mktemp("serve-faults") / "models")


@pytest.fixture(scope="module")
def target(repo: Path) -> Iterator[str]:
    """Both applications in this process's own local Ray (never a shared cluster), as bench_serve.py starts
    them, with the config's servicer functions; the repository re-read every 0.2 s."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from aevae.services import serve_app

    port = free_port()
    for attempt in range(2):  # Ray's head once failed to start its GCS within its wait (no log, a CI run)
        try:
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
            break
        except RuntimeError as exc:
            if attempt or "Timed out waiting for file" not in str(exc):
                raise
            ray.shutdown()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()},
                    grpc_options=gRPCOptions(port=port, grpc_servicer_functions=serve_app.SERVICER_FUNCTIONS))
        args = {"models_dir": str(repo), "refresh_seconds": 0.2, "max_message_bytes": MAX_MESSAGE_BYTES}
        serve.run(serve_app.decoder({**args, "max_concurrent_rpcs": MAX_CALLS}), name="decoder",
                  route_prefix="/decoder")
        serve.run(serve_app.encoder(args), name="encoder", route_prefix="/encoder")
        yield f"127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def channel(target: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(target) as ch:
        yield ch


def z(n: int, dim: int = 4) -> np.ndarray:
    return np.random.default_rng(n).normal(size=(n, dim)).astype(np.float32)


def decode(latents: np.ndarray, model: str = "vae", **kw) -> decoder_pb2.DecodeRequest:
    return decoder_pb2.DecodeRequest(model=model, latents=to_tensor(latents), **kw)


def encode(images: np.ndarray, model: str = "vae") -> encoder_pb2.EncodeRequest:
    return encoder_pb2.EncodeRequest(model=model, images=to_tensor(images))


def failure(call, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failed:
        result = call(*args, timeout=60, **kw)
        if not hasattr(result, "SerializeToString"):
            list(result)  # a stream: its status comes at the end
    return failed.value


def assert_clean(error: grpc.RpcError, code: grpc.StatusCode, text: str) -> None:
    assert error.code() == code, (error.code(), error.details())
    assert text in error.details(), error.details()
    assert "Traceback" not in error.details() and "ray::" not in error.details()


@pytest.mark.parametrize("request_, code, text", [
    (decode(z(2)[:, :3].copy()), grpc.StatusCode.INVALID_ARGUMENT, "expects N x 4 latents, got [2, 3]"),
    (decode(z(2).astype(np.float64)), grpc.StatusCode.INVALID_ARGUMENT, "latents.dtype: expected float32"),
    (decode(np.full((1, 4), np.nan, np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "expected finite values"),
    (decoder_pb2.DecodeRequest(model="vae"), grpc.StatusCode.INVALID_ARGUMENT, "latents.dtype"),
    (decode(z(2), model=""), grpc.StatusCode.INVALID_ARGUMENT, "got an empty string"),
    (decode(z(2), model="gan"), grpc.StatusCode.NOT_FOUND, "unknown model 'gan'; available: ae: 1"),
    (decode(z(2), version=9), grpc.StatusCode.NOT_FOUND, "model 'vae' has no version 9"),
    (decode(z(2), dtype="int16"), grpc.StatusCode.INVALID_ARGUMENT, "dtype: expected float32 or uint8"),
    (decode(z(100)), grpc.StatusCode.RESOURCE_EXHAUSTED, "the response would be 409600 bytes"),
    # over max_message_bytes: refused on its size as `aevae serve` does, before the model is asked
    (decode(z(5000)), grpc.StatusCode.RESOURCE_EXHAUSTED,
     f"bytes is over the max message size of {MAX_MESSAGE_BYTES} bytes"),
])
def test_bad_decode_requests_answer_the_standalone_statuses(channel: grpc.Channel, request_, code, text) -> None:
    assert_clean(failure(decoder_pb2_grpc.DecoderStub(channel).Decode, request_, metadata=DECODER), code, text)


def test_a_request_over_max_message_bytes_is_refused_on_every_method(channel: grpc.Channel) -> None:
    """Serve's proxy takes messages up to 2 GiB, so the limit a ListModels advertises is the replica's to keep:
    an Encode that fits the batch and the response (102,400 pixels, 100 latents back) was served."""
    enc = encoder_pb2_grpc.EncoderStub(channel)
    big = np.zeros((100, 32, 32), np.uint8)
    assert_clean(failure(enc.Encode, encode(big), metadata=ENCODER), grpc.StatusCode.RESOURCE_EXHAUSTED,
                 "a request message of 102")
    assert_clean(failure(enc.EncodeStream, iter([encode(big[:2]), encode(big)]), metadata=ENCODER),
                 grpc.StatusCode.RESOURCE_EXHAUSTED, "message 1: a request message of 102")
    dec = decoder_pb2_grpc.DecoderStub(channel)
    assert_clean(failure(dec.DecodeStream, iter([decode(z(2)), decode(z(5000))]), metadata=DECODER),
                 grpc.StatusCode.RESOURCE_EXHAUSTED, "message 1: a request message of 80")
    listed = dec.ListModels(tensor_pb2.ListModelsRequest(), metadata=DECODER, timeout=60)
    assert listed.limits.max_message_bytes == MAX_MESSAGE_BYTES
    assert len(enc.Encode(encode(big[:2]), metadata=ENCODER, timeout=60).mean.data) == 2 * 4 * 4


def test_a_method_sent_to_the_other_application_is_unimplemented_naming_it(channel: grpc.Channel) -> None:
    enc, dec = encoder_pb2_grpc.EncoderStub(channel), decoder_pb2_grpc.DecoderStub(channel)
    images = np.zeros((1, 28, 28), np.uint8)
    calls = [
        (enc.Encode, encode(images), DECODER, "aevae.v1.Encoder/Encode"),
        (enc.GetLatentStats, encoder_pb2.GetLatentStatsRequest(model="vae"), DECODER,
         "aevae.v1.Encoder/GetLatentStats"),
        (enc.EncodeStream, iter([encode(images)]), DECODER, "aevae.v1.Encoder/EncodeStream"),
        (dec.Decode, decode(z(1)), ENCODER, "aevae.v1.Decoder/Decode"),
        (dec.DecodeStream, iter([decode(z(1))]), ENCODER, "aevae.v1.Decoder/DecodeStream"),
        # two applications named: Serve's proxy takes the last one
        (dec.Decode, decode(z(1)), DECODER + ENCODER, "aevae.v1.Decoder/Decode"),
    ]
    for call, request_, metadata, method in calls:
        error = failure(call, request_, metadata=metadata)
        assert_clean(error, grpc.StatusCode.UNIMPLEMENTED, method)
        assert f"application {metadata[-1][1]!r}" in error.details()
    # ListModels is both services' and answers on either application
    assert enc.ListModels(tensor_pb2.ListModelsRequest(), metadata=DECODER, timeout=60).models
    assert_clean(failure(dec.Decode, decode(z(1))), grpc.StatusCode.NOT_FOUND, "Application metadata not set")
    assert_clean(failure(dec.Decode, decode(z(1)), metadata=(("application", "nope"),)),
                 grpc.StatusCode.NOT_FOUND, "Application 'nope' not found")


def test_streams_cancelled_mid_way_give_their_slot_back(channel: grpc.Channel) -> None:
    dec = decoder_pb2_grpc.DecoderStub(channel)
    for _ in range(MAX_CALLS + 1):
        more = threading.Event()

        def requests() -> Iterator[decoder_pb2.DecodeRequest]:
            while not more.is_set():
                yield decode(z(2))
                time.sleep(0.02)

        call = dec.DecodeStream(requests(), metadata=DECODER, timeout=60)
        assert len(from_tensor(next(call).images, "images")) == 2
        call.cancel()
        more.set()
    for _ in range(MAX_CALLS + 1):  # each cancelled stream's slot was given back (or Decode would be refused)
        assert len(dec.Decode(decode(z(3)), metadata=DECODER, timeout=60).images.data) == 3 * 32 * 32 * 4


def until(check, what: str, timeout: float = 60):
    """check() once it is truthy; polls the running app (the repository is re-read every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            assert result, what
            return result
        time.sleep(0.2)


def test_the_repository_changing_under_the_app_is_served_as_it_is(channel: grpc.Channel, repo: Path) -> None:
    dec = decoder_pb2_grpc.DecoderStub(channel)

    def newest(model: str = "ae") -> int:
        return dec.Decode(decode(z(1), model=model), metadata=DECODER, timeout=60).version

    write_tiny(repo, "ae", "ae", seed=3)
    until(lambda: newest() == 2, "ae/2 served after it was written")
    shutil.rmtree(repo / "ae" / "2")
    until(lambda: newest() == 1, "ae/1 served again after ae/2 was deleted")
    assert_clean(failure(dec.Decode, decode(z(1), model="ae", version=2), metadata=DECODER),
                 grpc.StatusCode.NOT_FOUND, "model 'ae' has no version 2")
    weights = repo / "vae8" / "1" / "decoder.onnx"
    weights.write_bytes(weights.read_bytes()[:-7])

    def broken() -> bool:
        listed = dec.ListModels(tensor_pb2.ListModelsRequest(), metadata=DECODER, timeout=60)
        return any(m.name == "vae8" and m.broken for m in listed.models)

    until(broken, "vae8/1 listed as broken once its decoder.onnx was truncated")
    assert_clean(failure(dec.Decode, decode(z(1, 8), model="vae8"), metadata=DECODER),
                 grpc.StatusCode.FAILED_PRECONDITION, "decoder.onnx does not match the checksum")
    assert newest("vae") == 1  # the others keep serving


def logs_dir() -> Path:
    """The logs of this module's own Ray (its session, not /tmp/ray/session_latest: another Ray may run)."""
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path())


class LogTail:
    """What Serve's logs (logs/serve/, and the workers' stdout and stderr, where Serve also writes) gain
    from now on."""

    def __init__(self) -> None:
        self.start = {path: path.stat().st_size for path in self.files()}

    @staticmethod
    def files() -> list[Path]:
        root = logs_dir()
        return [*root.glob("serve/*.log"), *root.glob("worker-*.err"), *root.glob("worker-*.out")]

    def text(self) -> str:
        added = []
        for path in self.files():
            with path.open("rb") as file:
                file.seek(self.start.get(path, 0))
                added.append(file.read().decode(errors="replace"))
        return "\n".join(added)


def test_a_bad_message_in_a_stream_is_invalid_argument_with_no_traceback_logged(channel: grpc.Channel) -> None:
    """A bad message in a stream is the client's error: answered INVALID_ARGUMENT naming it, after the earlier
    messages' answers, and no traceback in the replica's or the proxy's log (there was one per bad message,
    from the replica and again from the proxy); the proxy's access log line is all that is left."""
    tail = LogTail()
    dec, enc = decoder_pb2_grpc.DecoderStub(channel), encoder_pb2_grpc.EncoderStub(channel)
    answers: list[decoder_pb2.DecodeResponse] = []
    with pytest.raises(grpc.RpcError) as failed:
        for answer in dec.DecodeStream(iter([decode(z(2)), decode(z(2)[:, :3].copy())]), metadata=DECODER,
                                       timeout=60):
            answers.append(answer)
    assert_clean(failed.value, grpc.StatusCode.INVALID_ARGUMENT, "message 1: ")
    assert "expects N x 4 latents, got [2, 3]" in failed.value.details()
    assert len(answers) == 1
    images = np.zeros((1, 32, 32), np.uint8)
    assert_clean(failure(enc.EncodeStream, iter([encode(images), encode(images.astype(np.int16))]),
                         metadata=ENCODER), grpc.StatusCode.INVALID_ARGUMENT, "message 1: images.dtype")
    # the access log lines of both calls (Serve flushes each record): everything about them is written
    until(lambda: "DecodeStream" in tail.text() and "EncodeStream" in tail.text(), "the calls' access log lines")
    time.sleep(0.5)
    text = tail.text()
    assert "Traceback" not in text, text[-4000:]
    assert "_Aborted" not in text and "gRPCStatusError" not in text, text[-4000:]
    for details in ("expects N x 4 latents, got [2, 3]", "images.dtype"):
        assert len([line for line in text.splitlines() if details in line]) <= 1, text[-4000:]


def test_the_actor_errors_made_unavailable_are_rays_for_a_replica_that_died() -> None:
    """serve_proxy recognises Ray's messages without importing Ray (it runs in Serve's proxy): they must be
    Ray's own, or a Ray upgrade would silently bring INTERNAL back."""
    from ray._raylet import ActorID
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    from aevae.services.serve_proxy import replica_died

    assert replica_died(str(ActorDiedError()))
    assert replica_died(str(RayActorError()))
    assert replica_died(str(ActorUnavailableError("Actor is unavailable.", ActorID.from_random().binary())))
    for other in ("internal error: ValueError: boom", "The actor died because of an error raised in its creation "
                  "task, ray::ServeReplica...", "message 0: latents.dtype: expected float32"):
        assert not replica_died(other)


def test_a_stream_ends_with_its_status_for_a_client_error_and_raises_a_server_error() -> None:
    """serve_app._answers: a client's error (any status but INTERNAL, UNKNOWN, DATA_LOSS) ends the stream with
    the STATUS_ONLY message, after the earlier answers, and nothing raised (so nothing logged); a server's error
    still raises, for Serve to log its traceback."""
    import asyncio

    from aevae.services import serve_app
    from aevae.services.serve_proxy import STATUS_ONLY

    async def answers(code: grpc.StatusCode) -> list:
        async def responses():
            yield "first"
            raise serve_app._Aborted(code, "what went wrong")
        return [answer async for answer in serve_app._answers(responses())]

    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
        first, last = asyncio.run(answers(code))
        assert first == "first" and last.SerializeToString() == STATUS_ONLY
    for code in serve_app.SERVER_ERRORS:
        with pytest.raises(serve_app._Aborted):
            asyncio.run(answers(code))


def replica_pids(application: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"ServeReplica:{application}:"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def test_calls_succeed_after_a_replica_is_killed_mid_traffic(target: str) -> None:
    """SIGKILL of the decoder's replica while a client calls: Serve starts another, and calls succeed again
    (a call in flight on the dead replica is UNAVAILABLE and retried, but the retries may run out before the
    replacement serves: see test_a_call_in_flight_on_a_killed_replica_is_unavailable_and_retried)."""
    from aevae.client import AevaeError, DecoderClient

    with DecoderClient(target, metadata=DECODER, timeout=60) as client:
        stop, answered = threading.Event(), []

        def traffic() -> None:
            while not stop.is_set():
                try:
                    answered.append(client.decode(z(2), model="vae").shape)
                except AevaeError:
                    pass

        caller = threading.Thread(target=traffic)
        caller.start()
        try:
            until(lambda: len(answered) > 3, "calls before the kill")
            pids = replica_pids("decoder")
            assert pids, "no decoder replica process found"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            until(lambda: set(replica_pids("decoder")) - set(pids), "a new decoder replica", timeout=120)
        finally:
            stop.set()
            caller.join()

        def recovered() -> bool:
            try:
                return client.decode(z(5), model="vae").shape == (5, 32, 32)
            except AevaeError:
                return False

        until(recovered, "a decode served after the replica was replaced", timeout=120)
        for _ in range(5):
            assert client.decode(z(5), model="vae").shape == (5, 32, 32)


SLOW = (("application", "slow"),)


def replica_actor(application: str):
    """The one replica actor of `application` (in this module's own Ray)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{application}#")]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace="serve")


def test_a_call_in_flight_on_a_killed_replica_is_unavailable_and_retried(target: str, channel: grpc.Channel,
                                                                          repo: Path) -> None:
    """ray.kill of the replica while calls are in flight on it: the call cut is UNAVAILABLE saying the
    replica died and that it may be retried (it was INTERNAL "The actor died unexpectedly", which the client
    does not retry), and a client decoding in a loop gets every answer, right, its cut call retried by gRPC on
    the replacement. An app of its own, one replica, where a lone Decode waits batch_wait_s (1 s) for company
    on the replica: a call is on it when it is killed."""
    import ray
    from ray import serve

    from aevae.client import DecoderClient
    from aevae.services import serve_app

    args = {"models_dir": str(repo), "batch_wait_s": 1.0}
    app = serve_app.DecoderDeployment.options(  # type: ignore[attr-defined]
        autoscaling_config={"min_replicas": 1, "max_replicas": 1}, ray_actor_options={"num_cpus": 0}).bind(args)
    serve.run(app, name="slow", route_prefix="/slow")
    try:
        replica = replica_actor("slow")
        with DecoderClient(target, metadata=SLOW, timeout=120) as client:
            stop, answers, errors = threading.Event(), [], []

            def traffic() -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    try:
                        answers.append((n, client.decode(z(n % 5 + 1), model="vae")))
                    except Exception as exc:  # noqa: BLE001 - any error reaching the caller fails the test
                        errors.append(exc)

            caller = threading.Thread(target=traffic)
            caller.start()
            try:
                until(lambda: len(answers) >= 2 or errors, "answers before the kill", timeout=120)
                # A call of another model: it opens a batch of its own, and waits 1 s on the replica.
                cut = decoder_pb2_grpc.DecoderStub(channel).Decode.future(decode(z(1), model="ae"), metadata=SLOW,
                                                                         timeout=120)
                until(lambda: ray.get(replica.get_num_ongoing_requests.remote()) >= 2 or cut.done(),
                      "the call and the client's on the replica", timeout=30)
                assert not cut.done(), "the call was answered before the replica could be killed"
                ray.kill(replica, no_restart=True)
                with pytest.raises(grpc.RpcError) as failed:
                    cut.result()
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, (failed.value.code(),
                                                                            failed.value.details())
                assert "replica" in failed.value.details() and "retr" in failed.value.details(), \
                    failed.value.details()
                killed = len(answers)
                until(lambda: len(answers) >= killed + 3 or errors, "answers after the kill", timeout=120)
            finally:
                stop.set()
                caller.join()
        assert not errors, errors
        # every answer right: the images of its latents, as the undisturbed decoder application decodes them
        assert [n for n, _ in answers] == list(range(1, len(answers) + 1))
        with DecoderClient(target, metadata=DECODER, timeout=60) as check:
            for n, images in answers:
                np.testing.assert_allclose(images, check.decode(z(n % 5 + 1), model="vae"), rtol=1e-5, atol=1e-6)
    finally:
        serve.delete("slow")


def test_request_bytes_that_are_no_message_are_invalid_argument_naming_it(channel: grpc.Channel) -> None:
    """Bytes that do not parse as the method's request failed in the proxy's own deserializer (the generated
    add_*Servicer_to_server's): UNKNOWN "Unexpected DecodeError". With serve_proxy's registration they reach
    the replica and get `aevae serve`'s INVALID_ARGUMENT, unary and in a stream (after the good message's answer)."""
    garbage = b"\xff\xff\xff\xff"
    raw = channel.unary_unary("/aevae.v1.Decoder/Decode")
    assert_clean(failure(raw, garbage, metadata=DECODER), grpc.StatusCode.INVALID_ARGUMENT,
                 "the request bytes are not a valid aevae.v1.DecodeRequest message")
    stream = channel.stream_stream("/aevae.v1.Encoder/EncodeStream")
    answers: list[bytes] = []
    with pytest.raises(grpc.RpcError) as failed:
        for answer in stream(iter([encode(np.zeros((1, 32, 32), np.uint8)).SerializeToString(), garbage]),
                             metadata=ENCODER, timeout=60):
            answers.append(answer)
    assert_clean(failed.value, grpc.StatusCode.INVALID_ARGUMENT, "not a valid aevae.v1.EncodeRequest message")
    assert len(answers) == 1  # the good message was answered first
