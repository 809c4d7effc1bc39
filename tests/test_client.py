"""aevae.client against real servers: round trips equal the in-process model, big batches stream whole and in
order, errors carry status codes, async twins agree, and importing the client never imports torch."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest

from aevae import allocation
from aevae.client import (AevaeError, AsyncDecoderClient, AsyncEncoderClient, DecodeResult, DecoderClient,
                          EncodeResult, EncoderClient, ModelInfo)
from aevae.client import decoder as decoder_module
from aevae.services.process import ServiceProcess
from aevae.store import ModelStore
from helpers import run_aevae, running, write_tiny

# Small messages, so that a few hundred images already need the streaming RPCs.
MAX_MESSAGE = 256 * 1024
LIMITS = ["--max-message-bytes", str(MAX_MESSAGE)]


@pytest.fixture(scope="module")
def servers(trained_repo: Path) -> Iterator[dict[str, str]]:
    started = [ServiceProcess(kind, trained_repo, args=LIMITS).start() for kind in ("encoder", "decoder")]
    try:
        for service in started:
            service.wait_healthy()
        yield {s.kind: s.address for s in started}
    finally:
        for service in started:
            service.stop()


@pytest.fixture(scope="module")
def enc(servers) -> Iterator[EncoderClient]:
    with EncoderClient(servers["encoder"]) as client:
        yield client


@pytest.fixture(scope="module")
def dec(servers) -> Iterator[DecoderClient]:
    with DecoderClient(servers["decoder"]) as client:
        yield client


@pytest.fixture(scope="module")
def models(trained_repo: Path):
    from aevae.store import ModelStore

    store = ModelStore(trained_repo)
    return {name: store.get(name) for name in ("ae", "vae")}


@pytest.fixture(scope="module")
def digits(mnist_root: Path) -> np.ndarray:
    from aevae import mnist

    return mnist.load(mnist_root).test.images[:600]  # uint8, 32 x 32


def test_round_trip_matches_the_in_process_model(enc, dec, models, digits) -> None:
    for name in ("ae", "vae"):
        result = enc.encode(digits, model=name)  # 600 x 1 KiB: streamed
        assert isinstance(result, EncodeResult) and (result.model, result.version) == (name, 1)
        mean, logvar = models[name].encode(digits.astype(np.float32) / 255)
        np.testing.assert_allclose(result.mean, mean, atol=1e-5)
        assert result.mean.dtype == np.float32 and result.mean.shape == (600, 4)
        if name == "vae":
            np.testing.assert_allclose(result.logvar, logvar, atol=1e-5)
        else:
            assert result.logvar is None
        assert result.sample is None
        images = dec.decode(result.mean, model=name)  # 600 x 4 KiB: streamed
        assert images.dtype == np.float32 and images.shape == (600, 32, 32)
        np.testing.assert_allclose(images, models[name].decode(result.mean), atol=1e-5)


def test_28x28_float_images_are_padded_like_training(enc, digits) -> None:
    cropped = digits[:50, 2:30, 2:30].astype(np.float32) / 255  # MNIST's own 28 x 28: the padding is zeros
    np.testing.assert_allclose(enc.encode(cropped).mean, enc.encode(digits[:50]).mean, atol=1e-5)


def test_a_batch_larger_than_one_message_comes_back_whole_and_in_order(dec, models) -> None:
    # 36 MiB of float32 images: over aevae.allocation's threshold, so the output is a mapping of its own
    z = np.random.default_rng(0).normal(size=(9000, 4)).astype(np.float32)
    images = dec.decode(z)
    assert images.shape == (9000, 32, 32) and images.nbytes >= allocation.MAPPED_FROM_BYTES
    np.testing.assert_allclose(images, models["vae"].decode(z), atol=1e-5)
    as_bytes = dec.decode(z, dtype="uint8")
    assert as_bytes.dtype == np.uint8 and as_bytes.shape == (9000, 32, 32)
    assert np.abs(as_bytes.astype(int) - np.rint(images * 255)).max() <= 1


def test_one_latent_and_one_image_are_a_batch_of_one(enc, dec) -> None:
    assert dec.decode(np.zeros(4, np.float32)).shape == (1, 32, 32)
    assert dec.decode([0.5, -1, 0, 2.0], model="ae").shape == (1, 32, 32)
    assert enc.encode(np.zeros((28, 28), np.uint8)).mean.shape == (1, 4)


def test_samples_are_seeded_and_do_not_depend_on_streaming(enc, digits) -> None:
    streamed = enc.encode(digits, sample=True, seed=3)  # streamed in several messages
    unary = enc.encode(digits[:100], sample=True, seed=3)
    np.testing.assert_array_equal(streamed.sample[:100], unary.sample)
    again = enc.encode(digits[:100], sample=True, seed=3)
    np.testing.assert_array_equal(again.sample, unary.sample)
    sigma = np.exp(0.5 * unary.logvar)
    eps = (unary.sample - unary.mean) / sigma
    assert abs(float(eps.mean())) < 0.3 and 0.7 < float(eps.std()) < 1.3
    assert not np.array_equal(enc.encode(digits[:100], sample=True, seed=4).sample, unary.sample)
    ae = enc.encode(digits[:10], model="ae", sample=True)
    np.testing.assert_array_equal(ae.sample, ae.mean)


def test_list_models(enc, dec) -> None:
    for client in (enc, dec):
        infos = {m.name: m for m in client.list_models()}
        assert sorted(infos) == ["ae", "vae"]
        vae = infos["vae"]
        assert isinstance(vae, ModelInfo)
        assert (vae.version, vae.versions, vae.kind, vae.latent_dim, vae.image_shape) == (1, [1], "vae", 4, (32, 32))
        assert set(vae.metrics) >= {"test_bce", "test_kl", "test_loss"}


def test_latent_stats_have_the_structure_of_latent_stats_json(enc, trained_repo: Path) -> None:
    stats = enc.latent_stats("vae")
    on_disk = json.loads((trained_repo / "vae" / "1" / "latent_stats.json").read_text())
    assert stats["model"] == "vae" and stats["version"] == 1
    assert set(stats) == set(on_disk) | {"model", "version"}
    assert (stats["count"], stats["latent_dim"], stats["source"]) == (on_disk["count"], 4, on_disk["source"])
    for served, stored in zip(stats["dims"], on_disk["dims"], strict=True):
        assert set(served) == set(stored) and list(served["quantiles"]) == list(stored["quantiles"])
        assert served["min"] == stored["min"] and served["density"] == stored["density"]
    assert set(stats["pca"]) == set(on_disk["pca"])
    assert stats["pca"]["labels"] == on_disk["pca"]["labels"]
    for key in ("components", "points", "latents"):
        np.testing.assert_allclose(stats["pca"][key], on_disk["pca"][key], rtol=1e-6, atol=1e-6)
    assert enc.latent_stats("ae", version=1)["model"] == "ae"


def test_errors_carry_the_status_code_and_the_details(enc, dec) -> None:
    with pytest.raises(AevaeError) as info:
        dec.decode(np.zeros((2, 4)), model="gan")
    assert isinstance(info.value, Exception)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "available: ae: 1; vae: 1" in info.value.details()
    with pytest.raises(AevaeError) as info:
        enc.encode(np.zeros((2, 30, 30), np.uint8))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "got [2, 30, 30]" in info.value.details()
    with pytest.raises(AevaeError) as info:
        dec.decode(np.zeros((2, 4)), dtype="float16")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(AevaeError) as info:
        dec.decode(np.zeros((5000, 4)), timeout=1e-4)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_an_unreachable_server_is_unavailable_after_the_retries() -> None:
    with DecoderClient(_closed_port(), timeout=5, retries=2, backoff=0.01) as client:
        with pytest.raises(AevaeError) as info:
            client.decode(np.zeros((1, 4)))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(AevaeError) as info:
            client.health()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_decode_whose_server_is_killed_and_restarted_midway_comes_back_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL mid-stream, a new server on the same port: the client resumes after its last answer (waiting
    for the server to be back, within its deadline) and returns every image, as the in-process model has them."""
    root = tmp_path / "models"
    write_tiny(root, "vae", hidden=(256, 256))
    z = np.random.default_rng(0).normal(size=(300_000, 4)).astype(np.float32)  # 74 messages of 4,096
    port = int(_closed_port().rsplit(":", 1)[1])
    answered, midway = [0], threading.Event()
    add = decoder_module._Plan.add

    def counted(plan: decoder_module._Plan, response: object) -> None:  # observes the client's progress
        add(plan, response)  # type: ignore[arg-type]
        answered[0] += 1
        if answered[0] == 10:
            midway.set()

    monkeypatch.setattr(decoder_module._Plan, "add", counted)
    got: dict[str, object] = {}

    def decode() -> None:
        try:
            with DecoderClient(f"127.0.0.1:{port}", timeout=120) as client:
                got["images"] = client.decode(z, dtype="uint8")
        except AevaeError as error:
            got["error"] = error

    with ServiceProcess("decoder", root, port=port) as first:
        first.wait_healthy()
        caller = threading.Thread(target=decode)
        caller.start()
        assert midway.wait(60)
        first.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        first.process.wait()  # type: ignore[union-attr]
    with ServiceProcess("decoder", root, port=port) as second:
        second.wait_healthy()
        caller.join(120)
    assert "error" not in got, got.get("error")
    np.testing.assert_array_equal(got["images"], ModelStore(root).get("vae").decode(z, "uint8"))
    assert answered[0] == 74  # the ten answered before the kill were not asked for again


def test_decode_result_names_the_version_that_decoded_the_images(tmp_path: Path) -> None:
    """Unpinned, the newest version decodes and the result says which; pinned, that one: unary, streamed and
    fanned out, sync and async, each result's images that version's own."""
    for seed in (1, 2):
        write_tiny(tmp_path, "vae", seed=seed)
    store = ModelStore(tmp_path)
    z = np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32)  # 300 x 4 KiB: streamed in chunks of 64
    with running(tmp_path, ["--max-message-bytes", str(MAX_MESSAGE)], kinds=("decoder",)) as up:
        address = up["decoder"].address
        with DecoderClient(address, stream_chunk=64) as one, \
                DecoderClient([address, f"localhost:{address.rsplit(':', 1)[1]}"], stream_chunk=64) as fan:
            for client in (one, fan):
                for rows, version, expected in ((3, None, 2), (300, None, 2), (3, 1, 1), (300, 1, 1)):
                    result = client.decode_result(z[:rows], version=version)
                    assert isinstance(result, DecodeResult) and (result.model, result.version) == ("vae", expected)
                    np.testing.assert_allclose(result.images, store.get("vae", expected).decode(z[:rows]), atol=1e-5)
                    np.testing.assert_array_equal(client.decode(z[:rows], version=version), result.images)
                for bad in (0, False, ""):  # a fan-out's big batch took these for "the newest"
                    with pytest.raises(AevaeError) as refused:
                        client.decode_result(z, version=bad)  # type: ignore[arg-type]
                    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (client, bad)

        async def unpinned_async() -> list[int]:
            async with AsyncDecoderClient(address, stream_chunk=64) as client:
                return [(await client.decode_result(z[:rows])).version for rows in (3, 300)]

        assert asyncio.run(unpinned_async()) == [2, 2]


def test_health(enc, dec) -> None:
    assert enc.health() == "SERVING" and dec.health() == "SERVING"


def test_async_twins_agree_with_the_sync_clients(servers, enc, dec, digits) -> None:
    z = np.random.default_rng(1).normal(size=(300, 4)).astype(np.float32)  # streamed

    async def main():
        async with AsyncEncoderClient(servers["encoder"]) as aenc, AsyncDecoderClient(servers["decoder"]) as adec:
            return (await aenc.encode(digits[:300], sample=True, seed=2), await adec.decode(z),
                    await aenc.list_models(), await adec.list_models(), await aenc.latent_stats("ae"),
                    await aenc.health(), await adec.health())

    encoded, decoded, enc_models, dec_models, stats, *health = asyncio.run(main())
    expected = enc.encode(digits[:300], sample=True, seed=2)
    np.testing.assert_array_equal(encoded.mean, expected.mean)
    np.testing.assert_array_equal(encoded.sample, expected.sample)
    np.testing.assert_array_equal(decoded, dec.decode(z))
    assert enc_models == enc.list_models() and dec_models == dec.list_models()
    assert stats == enc.latent_stats("ae") and health == ["SERVING", "SERVING"]


def test_async_errors_are_aevae_errors(servers) -> None:
    async def main():
        async with AsyncDecoderClient(servers["decoder"]) as adec:
            await adec.decode(np.zeros((1, 3)))

    with pytest.raises(AevaeError) as info:
        asyncio.run(main())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "N x 4" in info.value.details()


def test_closing_an_async_client_ends_its_calls_with_an_aevae_error_and_a_cancelled_task_stays_cancelled(
        servers) -> None:
    """Closing the channel cancels its calls; each raised CancelledError into a task nobody cancelled, which
    `except AevaeError` missed and a TaskGroup took for its own cancellation."""
    z = np.zeros((20_000, 4), np.float32)  # a stream of many messages, still running when the client closes

    async def closed_under() -> BaseException:
        client = AsyncDecoderClient(servers["decoder"], timeout=60)
        call = asyncio.create_task(client.decode(z))
        await asyncio.sleep(0.2)
        await client.close()
        return (await asyncio.gather(call, return_exceptions=True))[0]

    async def cancelled() -> bool:
        async with AsyncDecoderClient(servers["decoder"], timeout=60) as client:
            call = asyncio.create_task(client.decode(z))
            await asyncio.sleep(0.2)
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            return call.cancelled()

    error = asyncio.run(closed_under())
    assert isinstance(error, AevaeError) and error.code() == grpc.StatusCode.CANCELLED, repr(error)
    assert "closed" in error.details()
    assert asyncio.run(cancelled())


def test_a_stream_message_s_refusal_names_the_caller_s_rows_and_a_nan_its_index_in_the_caller_s_array(
        enc, dec) -> None:
    """The server counts a stream's messages and positions within one: "message 6: ... index [424, 1]"."""
    z = np.zeros((3_000, 4), np.float32)  # float32 images of 4 KiB: 62 a message under MAX_MESSAGE
    z[2_000, 1] = 2e4
    with pytest.raises(AevaeError) as info:
        dec.decode(z)
    said = re.match(r"latents (\d+) to (\d+) of the batch, sent as message (\d+) \(a position below counts from "
                    r"(\d+)\): latents: values must lie in \[-10000, 10000\]; row (\d+) holds", info.value.details())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and said, info.value.details()
    start, stop, message, counted_from, row = map(int, said.groups())
    assert start == counted_from == message * (stop - start + 1) and start + row == 2_000 <= stop
    z[2_000, 1], z[2_500, 3] = 0, np.nan
    with pytest.raises(AevaeError, match=r"latents: expected finite values, got nan at index \[2500, 3\]"):
        dec.decode(z)
    x = np.zeros((700, 32, 32), np.float32)
    x[650, 3, 3] = 1.5
    with pytest.raises(AevaeError, match=r"^INVALID_ARGUMENT: images \d+ to \d+ of the batch, sent as message \d+ "
                                         r".*float32 pixels must lie in \[0, 1\].*the first outside in image \d+$"):
        enc.encode(x)


def test_a_client_pickles_and_copies_as_its_target_and_settings(servers, dec) -> None:
    import copy
    import pickle

    copied = pickle.loads(pickle.dumps(dec))
    try:
        assert copied is not dec and copied.target == dec.target and copied.timeout == dec.timeout
        np.testing.assert_array_equal(copied.decode(np.ones((2, 4))), dec.decode(np.ones((2, 4))))
    finally:
        copied.close()
    with copy.deepcopy(DecoderClient([servers["decoder"], servers["decoder"] + ",127.0.0.1:1"], token="t",
                                     stream_chunk=7)) as fan:
        assert fan.targets == [servers["decoder"], "127.0.0.1:1"] and fan.stream_chunk == 7
        assert fan.security.current_token() == "t"


def test_importing_the_client_never_imports_torch() -> None:
    code = ("import sys, aevae.client, aevae.client.cli, aevae.services.process; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_cli_encode_prints_latents_and_decode_writes_a_png(servers, enc, dec, digits, tmp_path: Path) -> None:
    from PIL import Image

    paths = []
    for i in range(2):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(digits[i, 2:30, 2:30]).save(path)
        paths.append(str(path))
    done = run_aevae("encode", *paths, "--encoder", servers["encoder"], "--model", "vae")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(paths[0]) and "\tvae/1\t" in lines[0]
    printed = np.array([float(v) for v in lines[0].split("\t")[2].split()[0].split(",")])
    np.testing.assert_allclose(printed, enc.encode(digits[0]).mean[0], atol=1e-3)

    z = [-1.25, 0.5, 0.0, 2.0]
    out = tmp_path / "out.png"
    done = run_aevae("decode", ",".join(map(str, z)), "-o", str(out), "--decoder", servers["decoder"])
    assert done.returncode == 0, done.stderr
    assert f"wrote {out} (1 image of vae/1, 32x32)" in done.stdout  # the version that decoded it
    written = np.asarray(Image.open(out))
    assert written.shape == (32, 32)
    np.testing.assert_array_equal(written, dec.decode(z, dtype="uint8")[0])

    done = run_aevae("decode", "1,2", "-o", str(out), "--decoder", servers["decoder"])
    assert done.returncode == 2 and "INVALID_ARGUMENT" in done.stderr and "N x 4" in done.stderr
