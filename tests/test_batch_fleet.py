"""The client's fan-out over several replicas, and decode-batch on a running decoder fleet.

Two decoder processes (on 127.0.0.1 and 127.0.0.2, the same port, so that one DNS name can stand for both) and
two encoders, over one small repository. Small message limits make a few thousand rows several streams."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest

from aevae.client import AevaeError, AsyncDecoderClient, AsyncEncoderClient, DecoderClient, EncoderClient
from aevae.client.fanout import parse_targets
from aevae.services.process import ServiceProcess
from helpers import AEVAE, ROOT, write_tiny

LIMITS = ["--max-message-bytes", str(256 * 1024)]
CHUNK = 256  # rows per stream message: 4,000 rows make 16 messages, in spans over the replicas


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet") / "models"
    write_tiny(root, "vae", "vae")
    write_tiny(root, "vae8", "vae", latent_dim=8, image_shape=(24, 20))
    return root


def _free_port() -> int:
    for _ in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.2", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")


_fleet_processes: list[ServiceProcess] = []  # the fleet's, for the tests that stop one


@pytest.fixture(scope="module")
def fleet(repo: Path) -> Iterator[dict[str, list[str]]]:
    port = _free_port()
    started = [ServiceProcess("decoder", repo, host=host, port=port, args=LIMITS).start()
               for host in ("127.0.0.1", "127.0.0.2")]
    started += [ServiceProcess("encoder", repo, args=LIMITS).start() for _ in range(2)]
    _fleet_processes[:] = started
    try:
        for service in started:
            service.wait_healthy()
        yield {"decoder": [s.address for s in started[:2]], "encoder": [s.address for s in started[2:]],
               "port": [str(port)]}
    finally:
        for service in started:
            service.stop()


def _dead_target() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_fan_out_over_two_decoders_returns_what_one_returns(fleet) -> None:
    z = np.random.default_rng(0).normal(size=(4000, 8)).astype(np.float32)
    with DecoderClient(fleet["decoder"][0], stream_chunk=CHUNK) as one, \
            DecoderClient(fleet["decoder"], stream_chunk=CHUNK) as two:
        assert two.targets == fleet["decoder"] and two.health() == "SERVING"
        expected = one.decode(z, model="vae8", dtype="uint8")
        assert expected.shape == (4000, 24, 20)
        np.testing.assert_array_equal(two.decode(z, model="vae8", dtype="uint8"), expected)
        assert all(r._limits is not None for r in two._fanout.replicas)  # both replicas served spans
        np.testing.assert_allclose(two.decode(z[:100], model="vae8"), one.decode(z[:100], model="vae8"), atol=1e-6)
        assert [m.name for m in two.list_models()] == ["vae", "vae8"]

    async def main() -> np.ndarray:
        async with AsyncDecoderClient(",".join(fleet["decoder"]), stream_chunk=CHUNK) as client:
            assert await client.health() == "SERVING"
            return await client.decode(z, model="vae8", dtype="uint8")

    np.testing.assert_array_equal(asyncio.run(main()), expected)


def test_fan_out_over_two_encoders_returns_what_one_returns(fleet, mnist_root: Path) -> None:
    from aevae import mnist

    images = mnist.load(mnist_root).test.images[:3000]
    with EncoderClient(fleet["encoder"][0], stream_chunk=CHUNK) as one, \
            EncoderClient(fleet["encoder"], stream_chunk=CHUNK) as two:
        expected = one.encode(images)
        got = two.encode(images)
        np.testing.assert_allclose(got.mean, expected.mean, atol=1e-5)  # another process: last bits may differ
        np.testing.assert_allclose(got.logvar, expected.logvar, atol=1e-5)
        assert all(r._limits is not None for r in two._fanout.replicas)
        assert (got.model, got.version) == ("vae", 1)
        seeded = two.encode(images, sample=True, seed=5)  # one stream: the same samples as one replica's
        np.testing.assert_allclose(seeded.sample, one.encode(images, sample=True, seed=5).sample, atol=1e-5)
        assert two.latent_stats("vae")["latent_dim"] == 4

    async def main():
        async with AsyncEncoderClient(fleet["encoder"], stream_chunk=CHUNK) as client:
            return await client.encode(images)

    np.testing.assert_allclose(asyncio.run(main()).mean, expected.mean, atol=1e-5)


def test_a_failed_replica_s_spans_go_to_the_others(fleet) -> None:
    z = np.random.default_rng(1).normal(size=(4000, 4)).astype(np.float32)
    dead = _dead_target()
    with DecoderClient(fleet["decoder"][0], stream_chunk=CHUNK) as one, \
            DecoderClient([dead, *fleet["decoder"]], stream_chunk=CHUNK, retries=1, backoff=0.01) as three:
        expected = one.decode(z, dtype="uint8")
        np.testing.assert_array_equal(three.decode(z, dtype="uint8"), expected)  # the dead one's spans re-sent
        for _ in range(3):  # small batches rotate over the replicas, the dead one included
            # float32 from another process may differ in the last bit (the server batches rows its own way)
            np.testing.assert_allclose(three.decode(z[:10]), expected[:10] / 255, atol=0.5 / 255 + 1e-6)
    with DecoderClient([dead, _dead_target()], retries=1, backoff=0.01, timeout=5) as none:
        with pytest.raises(AevaeError) as info:
            none.decode(z)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with DecoderClient(fleet["decoder"], stream_chunk=CHUNK) as two:
        with pytest.raises(AevaeError) as info:  # the same answer from any replica: raised at once
            two.decode(z, model="gan")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.fixture
def overloaded() -> Iterator[str]:
    """A decoder at its limit: every call is RESOURCE_EXHAUSTED, as aevae's admission words it."""
    from concurrent import futures

    def busy(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the server has 1 call in flight, its limit "
                      "(--max-concurrent-rpcs); retry with backoff")

    server = grpc.server(futures.ThreadPoolExecutor(8))
    handlers = {name: grpc.unary_unary_rpc_method_handler(busy) for name in ("ListModels", "Decode")}
    handlers["DecodeStream"] = grpc.stream_stream_rpc_method_handler(busy)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("aevae.v1.Decoder", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_an_overloaded_replica_s_work_goes_to_the_others(fleet, overloaded: str) -> None:
    """RESOURCE_EXHAUSTED (a replica at its limit of calls in flight) failed the whole fan-out call, although
    the other replicas were idle; when every replica is at its limit, the call says so in the servers' words."""
    z = np.random.default_rng(4).normal(size=(4000, 4)).astype(np.float32)
    with DecoderClient(fleet["decoder"][0], stream_chunk=CHUNK) as one, \
            DecoderClient([overloaded, fleet["decoder"][0]], stream_chunk=CHUNK, retries=1, backoff=0.01) as two:
        expected = one.decode(z, dtype="uint8")
        np.testing.assert_array_equal(two.decode(z, dtype="uint8"), expected)
        for _ in range(2):  # small calls rotate over both, the overloaded one first every other time
            np.testing.assert_array_equal(two.decode(z[:10], dtype="uint8"), expected[:10])
    with DecoderClient([overloaded], retries=1, backoff=0.01) as alone, \
            DecoderClient([overloaded, overloaded.replace("127.0.0.1", "localhost")], stream_chunk=CHUNK, retries=1,
                          backoff=0.01) as both:
        for client in (alone, both):
            with pytest.raises(AevaeError) as info:
                client.decode(z, model="vae", version=1)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry with backoff" in info.value.details()


def test_a_fleet_half_way_through_an_upgrade_serves_one_version_from_those_that_have_it(
        fleet, repo: Path, tmp_path: Path) -> None:
    """A replica whose repository has a newer version answered list_models first, the call was pinned to that
    version, and the replicas without it failed the whole call with NOT_FOUND, every time. Now a replica
    without the version is left out of that call; every row comes from the one version."""
    import shutil

    newer = Path(shutil.copytree(repo, tmp_path / "newer"))
    write_tiny(newer, "vae", "vae", seed=9)  # vae/2, other weights
    z = np.random.default_rng(5).normal(size=(4000, 4)).astype(np.float32)
    with ServiceProcess("decoder", newer, args=LIMITS) as upgraded:
        upgraded.wait_healthy()
        with DecoderClient(upgraded.address, stream_chunk=CHUNK) as one:
            v2, v1 = one.decode(z, dtype="uint8", version=2), one.decode(z, dtype="uint8", version=1)
        assert not np.array_equal(v1, v2)
        with DecoderClient([upgraded.address, fleet["decoder"][0]], stream_chunk=CHUNK) as mixed:
            for _ in range(2):  # either replica answers list_models first: each time one version throughout
                got = mixed.decode(z, dtype="uint8")
                assert np.array_equal(got, v2) or np.array_equal(got, v1)
            np.testing.assert_array_equal(mixed.decode(z, dtype="uint8", version=2), v2)
            with pytest.raises(AevaeError) as info:  # no replica has it: the servers' own answer, at once
                mixed.decode(z, version=3)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND and "has no version 3" in info.value.details()


def test_a_replica_that_stops_answering_is_found_by_its_pings_and_its_span_served_elsewhere(fleet) -> None:
    """A replica stopped (SIGSTOP: its connection open, nothing answered) held its span, and the call, until
    the deadline, or for ever without one. The client pings a call's connection (client.core.KEEPALIVE_MS): the
    stopped replica is found within half a minute and its span goes to the other."""
    z = np.random.default_rng(6).normal(size=(4000, 4)).astype(np.float32)
    with DecoderClient(fleet["decoder"][1], stream_chunk=CHUNK) as one:
        expected = one.decode(z, dtype="uint8")
    stopped = next(s for s in _fleet_processes if s.address == fleet["decoder"][0])
    assert stopped.process is not None
    os.kill(stopped.process.pid, signal.SIGSTOP)
    try:
        with DecoderClient(fleet["decoder"], stream_chunk=CHUNK, timeout=120, retries=1) as two:
            np.testing.assert_array_equal(two.decode(z, dtype="uint8", version=1), expected)
    finally:
        os.kill(stopped.process.pid, signal.SIGCONT)


def test_a_dns_name_with_several_addresses_is_several_replicas(fleet, monkeypatch) -> None:
    port = int(fleet["port"][0])
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if host == "decoders.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ("127.0.0.1", "127.0.0.2")]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    assert parse_targets(f"dns:///decoders.test:{port}") == [f"127.0.0.1:{port}", f"127.0.0.2:{port}"]
    assert parse_targets("a:1, b:2") == ["a:1", "b:2"] and parse_targets(["a:1", "a:1"]) == ["a:1"]
    z = np.random.default_rng(2).normal(size=(3000, 4)).astype(np.float32)
    with DecoderClient(f"dns:///decoders.test:{port}", stream_chunk=CHUNK) as both, \
            DecoderClient(fleet["decoder"][1], stream_chunk=CHUNK) as one:
        assert len(both.targets) == 2
        np.testing.assert_array_equal(both.decode(z, dtype="uint8"), one.decode(z, dtype="uint8"))


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_decode_batch_on_the_fleet_resumes_after_ctrl_c(fleet, repo: Path, tmp_path: Path, stop: int) -> None:
    """Ctrl-C, or SIGTERM (a container stop, `kill`; it used to end the process at once, without the count of
    the shards on disk): the shards in flight are ended, the count is printed, and the next run resumes."""
    out = tmp_path / "out"
    command = [*AEVAE, "decode-batch", "--prior", "40000", "--seed", "1", "--model", "vae8", "--output", str(out),
               "--shard-size", "1000", "--decoder", ",".join(fleet["decoder"]), "--concurrency", "3"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(stop)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + stop and "Run the same command again to resume" in err, err
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 1 <= len(done) < 40
    # the count is taken once the shards in flight were cancelled or had ended: what is on disk, and stays
    assert f"interrupted; {len(done)} of 40 shards are on disk." in err, (err, sorted(done))
    time.sleep(0.5)
    assert {p.name for p in out.glob("part-*.parquet")} == set(done)
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done)} shards done before" in rerun.stderr
    assert {n: (out / n).stat().st_mtime_ns for n in done} == done
    table = pq.read_table(out)
    np.testing.assert_array_equal(table.column("id").to_numpy(), np.arange(40000))
    from aevae.batch.sources import Prior

    z = np.stack(table.column("latent").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(z, Prior(40000, 1, 8).read(0, 40000)["latent"])
    with DecoderClient(fleet["decoder"][0]) as one:
        expected = one.decode(z[-2000:], model="vae8", dtype="uint8")
    raw = table.column("image").combine_chunks().slice(38000)
    got = np.frombuffer(raw.buffers()[1], np.uint8, count=2000 * 480, offset=raw.offset * 480).reshape(-1, 24, 20)
    np.testing.assert_array_equal(got, expected)
    assert os.path.exists(out / "_aevae_batch.json")


def test_decode_batch_on_the_fleet_resumes_after_the_input_file_is_fixed(fleet, tmp_path: Path) -> None:
    """One latent beyond the services' bound fails its shard (exit 2, the rows named, the shards before kept);
    the same command after the file is fixed in place resumes: the kept shards are not written again."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(5000, 8)).astype(np.float32)
    z[3500, 1] = 1e5  # shard 3
    np.save(tmp_path / "z.npy", z)
    out = tmp_path / "out"
    command = [*AEVAE, "decode-batch", "--input", str(tmp_path / "z.npy"), "--model", "vae8", "--output", str(out),
               "--shard-size", "1000", "--decoder", ",".join(fleet["decoder"]), "--concurrency", "1"]
    failed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2, failed.stderr
    assert "shard 3 (rows 3,000 to 3,999)" in failed.stderr and "3 of 5 shards are on disk and kept" in failed.stderr
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert len(kept) == 3
    z[3500, 1] = 0.0
    np.save(tmp_path / "z.npy", z)
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "checking the 3 shards on disk" in rerun.stderr and "3 shards done before;" in rerun.stderr
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept
    table = pq.read_table(out)
    np.testing.assert_array_equal(table.column("id").to_numpy(), np.arange(5000))
    np.testing.assert_array_equal(np.stack(table.column("latent").to_numpy(zero_copy_only=False)), z)
    # a byte of a finished shard's images flipped in place: --verify finds it and makes that shard again
    damaged = out / "part-000001.parquet"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x40
    damaged.write_bytes(bytes(data))
    verified = subprocess.run([*command, "--verify"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert verified.returncode == 0, verified.stderr
    assert "--verify: reading the 5 shards on disk whole" in verified.stderr, verified.stderr
    assert "4 shards done before (1 made again: damaged);" in verified.stderr, verified.stderr
    assert pq.read_table(out, page_checksum_verification=True).equals(table)


def test_an_encoder_among_the_decoders_is_refused_before_any_work(fleet, tmp_path: Path) -> None:
    """The encoder answers ListModels as the decoder does: the job started, then failed every run with
    UNIMPLEMENTED, the other replica healthy."""
    mixed = f"{fleet['decoder'][0]},{fleet['encoder'][0]}"
    done = subprocess.run([*AEVAE, "decode-batch", "--prior", "2000", "--model", "vae", "--output",
                           str(tmp_path / "out"), "--decoder", mixed], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert (f"--decoder: {fleet['encoder'][0]} does not serve aevae.v1.Decoder (perhaps it is the encoder?); "
            "name only decoder services") in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_a_rerun_resumes_on_the_version_the_job_started_with(fleet, repo: Path, tmp_path: Path) -> None:
    """Without --version a job is pinned to the newest version at its start; a newer version written before a
    rerun does not make the same command another job: it resumes on the version it started with."""
    write_tiny(repo, "pinned", "vae")
    out = tmp_path / "out"
    command = [*AEVAE, "decode-batch", "--prior", "3000", "--seed", "1", "--model", "pinned", "--output", str(out),
               "--shard-size", "1000", "--decoder", fleet["decoder"][0]]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    write_tiny(repo, "pinned", "vae", seed=5)
    deadline = time.monotonic() + 30
    with DecoderClient(fleet["decoder"][0]) as client:  # the service sees version 2 as the newest
        while {m.name: m.version for m in client.list_models()}.get("pinned") != 2:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming on pinned/1, the version this job started with" in rerun.stderr
    assert "3,000 rows of pinned/1" in rerun.stderr and "3 shards done before;" in rerun.stderr


def test_decode_batch_reaches_a_token_protected_fleet_with_its_token_file(repo: Path, tmp_path: Path) -> None:
    """decode-batch and encode-batch take the client's --token-file and --tls-* flags (they had none: a fleet
    behind a token was reached only through the environment); without the token the job is refused, saying
    which flag gives it, and the Ray engine refuses the flags, which it has no use for."""
    token = tmp_path / "token"
    token.write_text("s3cret-token-for-the-fleet\n")
    service = ServiceProcess("decoder", repo, args=["--token-file", str(token)]).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEVAE_TOKEN")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "no-config")  # no token of `aevae up` found by itself
    command = [*AEVAE, "decode-batch", "--prior", "300", "--model", "vae", "--decoder", service.address,
               "--quiet"]
    try:
        refused = subprocess.run([*command, "--output", str(tmp_path / "refused")], cwd=ROOT, capture_output=True,
                                 text=True, timeout=120, env=env)
        assert refused.returncode != 0 and "--token-file to the aevae commands" in refused.stderr, refused.stderr
        done = subprocess.run([*command, "--output", str(tmp_path / "out"), "--token-file", str(token)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        assert pq.read_table(tmp_path / "out").num_rows == 300
    finally:
        service.stop()
    ray = subprocess.run([*AEVAE, "decode-batch", "--prior", "3", "--models-dir", str(repo), "--token-file",
                          str(token), "--output", str(tmp_path / "ray")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env)
    assert ray.returncode == 2 and "--token-file: how to reach running services, which --decoder names" in ray.stderr
