"""Prometheus metrics: a real decoder with --metrics-port and a real UI with --metrics-port; the counters,
histograms and gauges move with traffic (aevae.v1, the OIP, errors, WebSocket decodes)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from aevae.client import AevaeError, AsyncDecoderClient, DecoderClient
from aevae.services.process import ServiceProcess
from aevae.v1 import decoder_pb2, decoder_pb2_grpc
from aevae.v1.tensors import to_tensor
from helpers import Samples, metrics_url, scrape, write_tiny


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the samples of `name` whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("metrics") / "models"
    write_tiny(root, "vae", "vae")
    service = ServiceProcess("decoder", root, args=["--metrics-port", "0", "--shutdown-delay", "0"]).start()
    try:
        service.wait_healthy()
        yield service
    finally:
        service.stop()


def test_service_counters_move_with_traffic(decoder: ServiceProcess) -> None:
    url = metrics_url(decoder.output)
    before = scrape(url)
    decode = dict(service="aevae.v1.Decoder", method="Decode")
    with DecoderClient(decoder.address) as client:
        for _ in range(3):
            client.decode(np.zeros((5, 4), np.float32), model="vae")
        with pytest.raises(AevaeError):  # refused by the server (the client checks the width and NaN, not this)
            client.decode(np.full((2, 4), 2e4, np.float32), model="vae")
        with pytest.raises(AevaeError):
            client.decode(np.zeros((2, 4), np.float32), model=f"nope-{time.time()}")
    with triton.InferenceServerClient(decoder.address) as oip:
        z = triton.InferInput("latents", [7, 4], "FP32")
        z.set_data_from_numpy(np.zeros((7, 4), np.float32))
        oip.infer("vae", [z])
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("aevae_grpc_requests_total", **decode, model="vae", code="OK") == 3
    assert delta("aevae_grpc_requests_total", **decode, model="vae", code="INVALID_ARGUMENT") == 1
    assert delta("aevae_grpc_requests_total", **decode, model="other", code="NOT_FOUND") == 1  # bounded labels
    assert delta("aevae_grpc_requests_total", service="inference.GRPCInferenceService", method="ModelInfer",
                 model="vae", code="OK") == 1
    assert delta("aevae_grpc_request_duration_seconds_count", **decode, model="vae") == 4
    assert delta("aevae_grpc_request_rows_count", **decode) == 5
    assert delta("aevae_grpc_request_rows_sum", **decode) == 3 * 5 + 2 + 2
    assert delta("aevae_grpc_request_rows_sum", method="ModelInfer") == 7
    assert delta("aevae_grpc_received_bytes_total", **decode) > 5 * 16 * 3
    assert delta("aevae_grpc_sent_bytes_total", **decode) > 3 * 5 * 32 * 32 * 4
    assert value(after, "aevae_grpc_requests_in_flight", **decode) == 0
    assert value(after, "aevae_model_versions_loaded", model="vae", version="1") == 1
    assert delta("aevae_batch_forward_passes_total") >= 4
    assert ("process_cpu_seconds_total", frozenset()) in after  # the default collectors
    for name in ("aevae_admission_calls", "aevae_admission_request_bytes", "aevae_admission_answer_bytes"):
        assert after[(name, frozenset())] == 0, name  # there, and all given back once the calls are over


def test_concurrent_one_latent_calls_share_forward_passes_and_each_gets_its_own_image(
        decoder: ServiceProcess) -> None:
    """16 unary one-latent calls in flight: on grpc.aio they reach the handler one at a time, and without
    gathering each ran alone (merged requests stayed near 0, docs/measurements.md)."""
    url = metrics_url(decoder.output)
    z = np.random.default_rng(3).normal(size=(400, 4)).astype(np.float32)
    with DecoderClient(decoder.address) as client:
        alone = client.decode(z, model="vae")  # one call: the images each latent decodes to
    before = scrape(url)
    got: list[np.ndarray | None] = [None] * len(z)

    async def main() -> None:
        async with AsyncDecoderClient(decoder.address) as client:
            async def worker(first: int) -> None:
                for i in range(first, len(z), 16):
                    got[i] = await client.decode(z[i:i + 1], model="vae")
            await asyncio.gather(*(worker(k) for k in range(16)))

    asyncio.run(main())
    after = scrape(url)
    merged = value(after, "aevae_batch_merged_requests_total") - value(before, "aevae_batch_merged_requests_total")
    passes = value(after, "aevae_batch_forward_passes_total") - value(before, "aevae_batch_forward_passes_total")
    assert merged >= 32 and passes < len(z), (merged, passes)
    on_target = value(after, "aevae_batch_gather_windows_total", ended="target") - \
        value(before, "aevae_batch_gather_windows_total", ended="target")
    assert on_target >= 1 and value(after, "aevae_batch_gather_target") >= 2
    for i, image in enumerate(got):
        assert image is not None and image.shape == (1, 32, 32)
        np.testing.assert_allclose(image[0], alone[i], atol=1e-5, err_msg=f"call {i}")


def test_admission_gauges_show_what_a_held_stream_holds(decoder: ServiceProcess) -> None:
    url = metrics_url(decoder.output)
    release = threading.Event()
    request = decoder_pb2.DecodeRequest(model="vae", latents=to_tensor(np.zeros((3, 4), np.float32)))

    def requests() -> Iterator[decoder_pb2.DecodeRequest]:
        yield request
        release.wait(30)  # the stream stays open: its call slot is held

    with grpc.insecure_channel(decoder.address) as channel:
        stream = decoder_pb2_grpc.DecoderStub(channel).DecodeStream(requests())
        next(stream)
        held = scrape(url)
        release.set()
        assert list(stream) == []
    assert value(held, "aevae_admission_calls") == 1
    assert value(scrape(url), "aevae_admission_calls") == 0


def test_only_models_the_repository_holds_become_labels(decoder: ServiceProcess) -> None:
    """ModelReady answers OK ("not ready") for any name; those names must not become label values, or any
    caller could fill the series (and the label cap) with names of its own."""
    url = metrics_url(decoder.output)
    with grpc.insecure_channel(decoder.address) as channel:
        ready = channel.unary_unary("/inference.GRPCInferenceService/ModelReady")
        from tritonclient.grpc import service_pb2

        for i in range(20):
            answer = service_pb2.ModelReadyResponse.FromString(
                ready(service_pb2.ModelReadyRequest(name=f"made-up-{i}").SerializeToString(), timeout=10))
            assert not answer.ready
        assert service_pb2.ModelReadyResponse.FromString(
            ready(service_pb2.ModelReadyRequest(name="vae").SerializeToString(), timeout=10)).ready
    samples = scrape(url)
    models = {dict(labels).get("model") for (name, labels) in samples if name == "aevae_grpc_requests_total"}
    assert not any(m and m.startswith("made-up") for m in models), models
    assert value(samples, "aevae_grpc_requests_total", method="ModelReady", model="other") >= 20
    assert value(samples, "aevae_grpc_requests_total", method="ModelReady", model="vae") >= 1


def test_idle_scrape_connections_are_bounded_and_time_out(decoder: ServiceProcess) -> None:
    """Connections to /metrics that never finish their request are capped (one past the cap takes the slot of
    the oldest, which is closed) and closed after the handler's timeout, so they cannot take the process's
    file descriptors; a scrape and gRPC calls go on meanwhile."""
    from aevae.services.metrics import _Handler, _Server

    host, port = metrics_url(decoder.output).split("//")[1].split("/")[0].rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=30) for _ in range(_Server.MAX_CONNECTIONS)]
    try:
        for conn in idle:
            conn.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        time.sleep(0.5)
        # a scrape past the cap is answered: it takes the slot of the oldest idle connection, which is closed
        assert "aevae_grpc_requests_total" in urllib.request.urlopen(metrics_url(decoder.output),
                                                                     timeout=5).read().decode()
        assert idle[0].recv(100) == b""
        with DecoderClient(decoder.address) as client:
            assert client.decode(np.zeros((1, 4), np.float32), model="vae").shape == (1, 32, 32)
        started = time.monotonic()
        assert idle[1].recv(100) == b""  # closed by the server when the timeout passed
        assert time.monotonic() - started < _Handler.timeout + 5
    finally:
        for conn in idle:
            conn.close()
    deadline = time.monotonic() + 10
    while True:  # the slots come back
        try:
            assert "aevae_grpc_requests_total" in urllib.request.urlopen(metrics_url(decoder.output),
                                                                         timeout=5).read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert "Traceback" not in "".join(decoder.output)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ui_sessions_and_decode_round_trips(decoder: ServiceProcess) -> None:
    aiohttp = pytest.importorskip("aiohttp")
    port, metrics_port = _free_port(), _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "aevae.cli", "ui", "--encoder", f"127.0.0.1:{_free_port()}",
                           "--decoder", decoder.address, "--port", str(port), "--metrics-port", str(metrics_port),
                           "--metrics-host", "127.0.0.2"],  # another loopback address: the metrics move alone
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.2:{metrics_port}/metrics"
    try:
        for _ in range(300):  # bounded: until the UI listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert ui.poll() is None, ui.stdout.read() if ui.stdout else ""
                time.sleep(0.1)

        async def session() -> list[str]:
            async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
                assert value(scrape(url), "aevae_ui_websocket_sessions") == 1
                ops = []
                for i, latents in enumerate(([[0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0]])):
                    await ws.send_json({"op": "decode", "id": i, "channel": "a", "model": "vae", "latents": latents})
                    while True:
                        reply = await ws.receive_json(timeout=30)
                        if reply.get("op") in ("decoded", "error"):
                            ops.append(reply["op"])
                            break
                return ops

        assert asyncio.run(session()) == ["decoded", "error"]
        with pytest.raises(ConnectionRefusedError):  # only on --metrics-host
            socket.create_connection(("127.0.0.1", metrics_port), timeout=5).close()
        samples = scrape(url)
        assert value(samples, "aevae_ui_websocket_sessions_opened_total") == 1
        assert value(samples, "aevae_ui_decode_round_trip_seconds_count", outcome="decoded") == 1
        assert value(samples, "aevae_ui_decode_round_trip_seconds_count", outcome="error") == 1
        for _ in range(100):  # bounded: the server notices the closed socket
            if value(scrape(url), "aevae_ui_websocket_sessions") == 0:
                break
            time.sleep(0.05)
        assert value(scrape(url), "aevae_ui_websocket_sessions") == 0
        assert value(scrape(url), "aevae_ui_http_requests_total", route="/ws") == 1  # counted when it ended
        # a /ws request that is no upgrade is no session, and the guard's refusals are counted (they were not)
        for request, code in ((f"http://127.0.0.1:{port}/ws", 400), (urllib.request.Request(
                f"http://127.0.0.1:{port}/api/status", headers={"Host": "rebound.example"}), 421)):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == code
        samples = scrape(url)
        assert value(samples, "aevae_ui_websocket_sessions_opened_total") == 1
        assert value(samples, "aevae_ui_http_requests_total", route="/ws", status="400") == 1
        assert value(samples, "aevae_ui_http_requests_total", route="/api/status", status="421") == 1
    finally:
        ui.terminate()
        ui.wait(20)


def test_metrics_host_moves_only_the_metrics_port(tmp_path: Path) -> None:
    """--metrics-host: a service on one address keeps its metrics on another (on a public --host, 127.0.0.1
    keeps them on the machine: the endpoint has neither TLS nor a token)."""
    write_tiny(tmp_path, "vae", "vae")
    args = ["--metrics-port", "0", "--metrics-host", "127.0.0.2", "--shutdown-delay", "0"]
    with ServiceProcess("decoder", tmp_path, args=args) as service:
        service.wait_healthy()  # gRPC on --host 127.0.0.1
        url = metrics_url(service.output)
        assert url.startswith("http://127.0.0.2:"), url
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with DecoderClient(service.address) as client:
            client.decode(np.zeros((1, 4), np.float32), model="vae")
        assert value(scrape(url), "aevae_grpc_requests_total", method="Decode", code="OK") == 1
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_slowloris_cannot_keep_the_scrape_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections that send their request a byte every few seconds, never finishing it, reset the per-read
    timeout for ever: MAX_CONNECTIONS of them kept every scrape out. The whole request must arrive within the
    timeout."""
    from aevae.services.metrics import _Handler, _Server, serve_metrics

    monkeypatch.setattr(_Handler, "timeout", 1.0)
    port = serve_metrics(0, "127.0.0.1", "test")
    slow = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(_Server.MAX_CONNECTIONS)]
    try:
        for conn in slow:
            conn.sendall(b"GET /metrics HTTP/1.1\r\n")
        closed: set[int] = set()
        deadline = time.monotonic() + 6 * _Handler.timeout
        while len(closed) < len(slow):
            assert time.monotonic() < deadline, f"{len(slow) - len(closed)} dripping connections kept their slots"
            for i, conn in enumerate(slow):
                if i not in closed:
                    try:
                        conn.sendall(b"X")  # a byte of a header, well within the per-read timeout
                    except OSError:
                        closed.add(i)
            time.sleep(_Handler.timeout / 4)
        time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as scrape_:
            assert scrape_.status == 200
    finally:
        for conn in slow:
            conn.close()
