"""TLS, mutual TLS and tokens against real service processes (certificates made here, at test time, with
cryptography): the round trip (sync, async, fan-out), clear errors for a plaintext client on a TLS port and
for a missing client certificate, UNAUTHENTICATED for a missing, wrong or rotated-out token while health and
reflection answer, and the binding policy. Two services for the module: a TLS decoder and a mutual-TLS
encoder, both with a token file."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import numpy as np
import pytest

from aevae.client import AevaeError, AsyncDecoderClient, DecoderClient, EncoderClient
from aevae.client.credentials import ChannelSecurity
from aevae.services.process import ServiceProcess
from aevae.services.security import make_certificates
from helpers import run_aevae, write_tiny

TOKEN = "first-token-0123456789"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("security")
    models = root / "models"
    write_tiny(models, "vae", "vae")
    certs = make_certificates(root / "tls")
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    token_args = ["--token-file", str(token_file)]
    tls_args = ["--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"])]
    # no token from the developer's environment or `aevae up`'s file: each client here says what it sends
    isolated = {"AEVAE_TOKEN": "", "AEVAE_TOKEN_FILE": "", "XDG_CONFIG_HOME": str(root / "config")}
    ok = ChannelSecurity.resolve(token=TOKEN, tls_ca=str(certs["ca"]))
    mtls_ok = ChannelSecurity.resolve(token=TOKEN, tls_ca=str(certs["ca"]), tls_cert=str(certs["client_cert"]),
                                      tls_key=str(certs["client_key"]))
    decoder = ServiceProcess("decoder", models, args=[*tls_args, *token_args], env=isolated, security=ok)
    encoder = ServiceProcess("encoder", models, args=[*tls_args, "--tls-client-ca", str(certs["ca"]), *token_args],
                             env=isolated, security=mtls_ok)
    try:
        decoder.start()
        encoder.start()
        decoder.wait_healthy()
        encoder.wait_healthy()
        yield {"models": models, "certs": certs, "token_file": token_file, "decoder": decoder, "encoder": encoder,
               "isolated": isolated}
    finally:
        decoder.stop()
        encoder.stop()


def test_tls_round_trip_sync_async_and_fan_out(env: dict[str, Any]) -> None:
    address, ca = env["decoder"].address, str(env["certs"]["ca"])
    assert "TLS, token from --token-file" in "".join(env["decoder"].output)
    z = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    with DecoderClient(address, tls_ca=ca, token=TOKEN) as dec:
        images = dec.decode(z)
        assert images.shape == (3, 32, 32) and dec.health() == "SERVING"

    async def run_async() -> np.ndarray:
        async with AsyncDecoderClient(address, tls_ca=ca, token=TOKEN) as adec:
            return await adec.decode(z)

    np.testing.assert_array_equal(asyncio.run(run_async()), images)
    # a fan-out client over two names of the same server: every replica's channel gets the TLS and the token
    port = address.rpartition(":")[2]
    with DecoderClient([f"127.0.0.1:{port}", f"localhost:{port}"], tls_ca=ca, token=TOKEN, stream_chunk=64) as fan:
        many = fan.decode(np.repeat(z, 400, axis=0), dtype="uint8")
        assert many.shape == (1200, 32, 32) and fan.health() == "SERVING"


def test_plaintext_client_against_a_tls_port_fails_clearly(env: dict[str, Any]) -> None:
    with DecoderClient(env["decoder"].address, tls=False, token=TOKEN, retries=0, timeout=10) as dec:
        with pytest.raises(AevaeError) as info:
            dec.decode(np.zeros((1, 4), np.float32))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "if it serves TLS, pass tls_ca=" in info.value.details()


def test_mutual_tls_refuses_a_client_without_a_certificate(env: dict[str, Any]) -> None:
    address, certs = env["encoder"].address, env["certs"]
    with EncoderClient(address, tls_ca=str(certs["ca"]), token=TOKEN, retries=0, timeout=10) as enc:
        with pytest.raises(AevaeError) as info:
            enc.list_models()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "mutual TLS" in info.value.details() or "not signed" in info.value.details()
    with EncoderClient(address, tls_ca=str(certs["ca"]), tls_cert=str(certs["client_cert"]),
                       tls_key=str(certs["client_key"]), token=TOKEN) as enc:
        assert [m.name for m in enc.list_models()] == ["vae"]
        assert enc.encode(np.zeros((2, 28, 28), np.uint8)).mean.shape == (2, 4)


def test_tokens_missing_wrong_and_rotated_while_health_and_reflection_answer(env: dict[str, Any]) -> None:
    address, ca = env["decoder"].address, str(env["certs"]["ca"])
    z = np.zeros((1, 4), np.float32)
    with DecoderClient(address, tls_ca=ca, token="", retries=0) as anonymous:
        assert anonymous.health() == "SERVING"  # probes need no token
        with pytest.raises(AevaeError) as missing:
            anonymous.decode(z)
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing token" in missing.value.details() and "authorization: Bearer" in missing.value.details()
    wrong = "not-the-token-" + "x" * 20
    with DecoderClient(address, tls_ca=ca, token=wrong, retries=0) as dec:
        with pytest.raises(AevaeError) as refused:
            dec.decode(z)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and wrong not in refused.value.details()
    assert TOKEN not in refused.value.details()
    # two authorization headers, the right one among them: ambiguous, refused whatever their order
    from aevae.v1 import decoder_pb2, decoder_pb2_grpc
    from aevae.v1.tensors import to_tensor

    request = decoder_pb2.DecodeRequest(model="vae", latents=to_tensor(z))
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(ca).read_bytes())) as channel:
        stub = decoder_pb2_grpc.DecoderStub(channel)
        assert stub.Decode(request, metadata=[("authorization", f"Bearer {TOKEN}")]).version >= 1
        for pair in ([f"Bearer {TOKEN}", f"Bearer {wrong}"], [f"Bearer {wrong}", f"Bearer {TOKEN}"]):
            with pytest.raises(grpc.RpcError) as doubled:
                stub.Decode(request, metadata=[("authorization", value) for value in pair])
            assert doubled.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "2 authorization headers sent, one accepted" in doubled.value.details()
    # reflection (the public schema) answers without a token
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(ca).read_bytes())) as channel:
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for answer in answers for s in answer.list_services_response.service}
    assert "aevae.v1.Decoder" in names
    # the Open Inference Protocol is behind the same check (tritonclient sends the token as a header)
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    oip = triton.InferenceServerClient(address, ssl=True, root_certificates=ca)
    with pytest.raises(InferenceServerException) as oip_refused:
        oip.get_model_metadata("vae")
    assert "UNAUTHENTICATED" in str(oip_refused.value.status()) + str(oip_refused.value)
    assert oip.get_model_metadata("vae", headers={"authorization": f"Bearer {TOKEN}"}).name == "vae"
    oip.close()
    # rotation without a restart: the file is re-read when it changes
    env["token_file"].write_text("second-token-9876543210\n")
    deadline = time.monotonic() + 20
    with DecoderClient(address, tls_ca=ca, token="second-token-9876543210", retries=0) as new, \
            DecoderClient(address, tls_ca=ca, token=TOKEN, retries=0) as old:
        while True:
            try:
                new.decode(z)
                break
            except AevaeError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() < deadline
                time.sleep(0.3)
        with pytest.raises(AevaeError) as rotated_out:
            old.decode(z)
    assert rotated_out.value.code() == grpc.StatusCode.UNAUTHENTICATED
    env["token_file"].write_text(TOKEN + "\n")


def test_certificates_rotated_in_place_are_served_to_new_connections_without_a_restart(
        env: dict[str, Any], tmp_path: Path) -> None:
    """As cert-manager renews a Secret: the files change under a running server. New connections get the new
    certificate (here from another CA, so the old CA no longer verifies it); files that do not read as PEM
    leave the one in use serving."""
    import shutil

    first, second = make_certificates(tmp_path / "first"), make_certificates(tmp_path / "second")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("cert", "key"):
        shutil.copy(first[name], live / name)
    z = np.zeros((1, 4), np.float32)
    args = ["--tls-cert", str(live / "cert"), "--tls-key", str(live / "key"), "--token-file", str(env["token_file"])]
    with ServiceProcess("decoder", env["models"], args=args, env=env["isolated"],
                        security=ChannelSecurity.resolve(token=TOKEN, tls_ca=str(first["ca"]))) as service:
        service.wait_healthy()

        def decodes(ca: Path) -> bool:
            with DecoderClient(service.address, tls_ca=str(ca), token=TOKEN, retries=0, timeout=10) as client:
                try:
                    return client.decode(z).shape == (1, 32, 32)
                except AevaeError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                    return False

        assert decodes(first["ca"]) and not decodes(second["ca"])
        (live / "cert").write_text("not a certificate\n")  # a botched rotation: the one in use stays
        assert decodes(first["ca"])
        for name in ("key", "cert"):  # the renewal
            shutil.copy(second[name], live / name)
        deadline = time.monotonic() + 10
        while not decodes(second["ca"]):
            assert time.monotonic() < deadline, "the rotated certificate was not served"
            time.sleep(0.2)
        assert not decodes(first["ca"])
    assert "the TLS files changed but do not load" in "".join(service.output)


def test_a_public_host_without_tls_or_token_is_refused_unless_insecure(env: dict[str, Any], tmp_path: Path) -> None:
    models = str(env["models"])
    plain = run_aevae("serve", "decoder", "--host", "0.0.0.0", "--port", "0", "--models-dir", models,
                      env=env["isolated"], timeout=120)
    assert plain.returncode != 0 and "refusing to serve the decoder on 0.0.0.0" in plain.stderr
    assert "TLS" in plain.stderr and "a token" in plain.stderr and "--insecure" in plain.stderr
    token_only = run_aevae("serve", "decoder", "--host", "0.0.0.0", "--port", "0", "--models-dir", models,
                           env={**env["isolated"], "AEVAE_TOKEN": TOKEN}, timeout=120)
    assert token_only.returncode != 0 and "without TLS (--tls-cert, --tls-key)" in token_only.stderr
    assert TOKEN not in token_only.stderr + token_only.stdout
    with ServiceProcess("decoder", models, host="0.0.0.0", args=["--insecure", "--health-port", "0"],
                        env=env["isolated"]) as loud:
        loud.wait_healthy()
        output = "".join(loud.output)
        assert "WARNING: --insecure: listening on 0.0.0.0 without TLS" in output
        assert "health (grpc.health.v1 only, plaintext)" in output


def test_the_ui_server_reaches_tls_and_token_services(env: dict[str, Any]) -> None:
    """The UI's links carry the TLS and the token: a WebSocket decode through the TLS decoder works; with no
    token configured the decoder's UNAUTHENTICATED reaches the page as an error, not a "down" service."""
    import aiohttp
    from aiohttp.test_utils import TestServer

    from aevae.ui.server import LINKS, create_app

    async def decode_once(security: ChannelSecurity) -> tuple[dict[str, Any], str]:
        app = create_app("127.0.0.1:1", env["decoder"].address, classifier=None, security=security)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as session, \
                    session.ws_connect(f"http://127.0.0.1:{server.port}/ws") as ws:
                await ws.send_json({"op": "decode", "id": 1, "channel": "main", "model": "vae",
                                    "latents": [[0.0, 0.0, 0.0, 0.0]]})
                while (reply := await ws.receive_json(timeout=30))["op"] == "status":
                    pass
                return reply, app[LINKS].decoder.status.state
        finally:
            await server.close()

    ca = str(env["certs"]["ca"])
    reply, _ = asyncio.run(decode_once(ChannelSecurity.resolve(token=TOKEN, tls_ca=ca)))
    assert reply["op"] == "decoded" and reply["shape"] == [32, 32]
    refused, state = asyncio.run(decode_once(ChannelSecurity.resolve(token="", tls_ca=ca)))
    assert refused["op"] == "error" and refused["code"] == "UNAUTHENTICATED" and state != "down"


def test_tls_files_that_are_not_a_certificate_and_its_key_are_named_at_start(env: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    """gRPC takes any PEM and fails only when binding, as "cannot listen on ... (in use?)" after lines of its
    own log: a key of another certificate, the two files swapped, an encrypted key or a key given as the
    client CA each looked like a port in use."""
    from cryptography.hazmat.primitives import serialization

    other = make_certificates(tmp_path / "other")
    certs = env["certs"]
    key = serialization.load_pem_private_key(Path(certs["key"]).read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"passphrase")))
    cases = {
        "is not the private key of the certificate": ["--tls-cert", certs["cert"], "--tls-key", other["key"]],
        "--tls-cert: ": ["--tls-cert", certs["key"], "--tls-key", certs["cert"]],
        "is encrypted": ["--tls-cert", certs["cert"], "--tls-key", encrypted],
        "--tls-client-ca: ": ["--tls-cert", certs["cert"], "--tls-key", certs["key"], "--tls-client-ca", certs["key"]],
    }
    for expected, args in cases.items():
        done = run_aevae("serve", "decoder", "--port", "0", "--models-dir", str(env["models"]),
                         *map(str, args), env=env["isolated"], timeout=120)
        assert done.returncode != 0 and expected in done.stderr, (expected, done.stderr)
        assert "in use" not in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_an_empty_bearer_token_is_named_as_such(env: dict[str, Any]) -> None:
    from aevae.v1 import decoder_pb2, decoder_pb2_grpc
    from aevae.v1.tensors import to_tensor

    request = decoder_pb2.DecodeRequest(model="vae", latents=to_tensor(np.zeros((1, 4), np.float32)))
    ca = Path(env["certs"]["ca"]).read_bytes()
    with grpc.secure_channel(env["decoder"].address, grpc.ssl_channel_credentials(ca)) as channel:
        stub = decoder_pb2_grpc.DecoderStub(channel)
        for value in ("Bearer", "Bearer "):
            with pytest.raises(grpc.RpcError) as empty:
                stub.Decode(request, metadata=[("authorization", value)], timeout=10)
            assert empty.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "an empty token after Bearer" in empty.value.details(), empty.value.details()


def test_a_token_file_rotated_to_bytes_that_are_not_utf8_keeps_its_tokens(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A service's token file rewritten with bytes that are not UTF-8 failed every call as UNKNOWN (a
    UnicodeDecodeError in the interceptor, a traceback each) until fixed: now it keeps the tokens last read,
    as for a file that cannot be read. A client's token file whose token cannot travel in a header is
    refused at once, as token= is, not as INTERNAL "Invalid metadata" on every call."""
    from aevae.client import credentials
    from aevae.client.credentials import TokenFile
    from aevae.services.security import Tokens

    monkeypatch.setattr(credentials, "RECHECK_SECONDS", 0.0)
    path = tmp_path / "tokens"
    path.write_text(TOKEN + "\n")
    tokens = Tokens(file=TokenFile(path))
    assert tokens.accepts(f"Bearer {TOKEN}")
    path.write_bytes(b"\xff\xfe rotated badly\n")
    assert tokens.accepts(f"Bearer {TOKEN}") and not tokens.accepts("Bearer \ufffd\ufffd rotated badly")
    with pytest.raises(ValueError, match="not UTF-8"):
        TokenFile(path)
    path.write_text("t\u00f6ken\n")
    with pytest.raises(AevaeError) as refused:
        ChannelSecurity.resolve(token_file=str(path))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "printable ASCII" in refused.value.details()
