"""The UI server's guard and bounds, against a real decoder: foreign Origins, wrong Hosts and cross-site POSTs
refused, the login when one is set, and a WebSocket that survives a flood, an oversized message and deeply
nested JSON (issue 9). The UI runs in-process (aiohttp's test server), the decoder as a real process."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from aevae.services.process import ServiceProcess
from aevae.ui.guard import MAX_DECODES, MAX_MESSAGE_BYTES, Guard
from aevae.ui.server import LINKS, create_app
from helpers import run_aevae, write_tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ui-hardening") / "models"
    write_tiny(root, "vae", "vae")
    return root


@pytest.fixture(scope="module")
def decoder(models: Path) -> Iterator[ServiceProcess]:
    isolated = {"AEVAE_TOKEN": "", "AEVAE_TOKEN_FILE": "", "XDG_CONFIG_HOME": str(models.parent / "config")}
    with ServiceProcess("decoder", models, env=isolated) as service:
        service.wait_healthy()
        yield service


def run(decoder: ServiceProcess, scenario: Any, guard: Guard | None = None) -> Any:
    """Runs `scenario(session, base_url, app)` against a fresh UI app over the real decoder."""
    async def main() -> Any:
        app = create_app("127.0.0.1:1", decoder.address, poll_interval=0.2, classifier=None, guard=guard,
                         security=None)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:  # IP hosts
                return await scenario(session, f"http://127.0.0.1:{server.port}", app)
        finally:
            await server.close()
    return asyncio.run(main())


def test_foreign_origin_websocket_wrong_host_and_cross_site_posts_are_refused(decoder: ServiceProcess) -> None:
    async def scenario(session: aiohttp.ClientSession, base: str, app: Any) -> None:
        host = base.removeprefix("http://")
        with pytest.raises(aiohttp.WSServerHandshakeError) as foreign:
            await session.ws_connect(f"{base}/ws", headers={"Origin": "https://evil.example"})
        assert foreign.value.status == 403
        async with session.ws_connect(f"{base}/ws", headers={"Origin": base}) as ws:  # same origin works
            assert (await ws.receive_json(timeout=10))["op"] == "status"
        async with session.get(f"{base}/api/status", headers={"Host": "rebound.example:8080"}) as wrong_host:
            assert wrong_host.status == 421 and "--allow-host" in (await wrong_host.json())["error"]
        async with session.get(f"{base}/api/status", headers={"Host": f"localhost:{host.rpartition(':')[2]}"}) as ok:
            assert ok.status == 200
        body = json.dumps({"model": "vae", "shape": [28, 28], "images": []})
        async with session.post(f"{base}/api/encode", data=body, headers={"Content-Type": "text/plain"}) as form:
            assert form.status == 415  # what a cross-site form can send, refused before parsing
        async with session.post(f"{base}/api/encode", data=body, headers={
                "Content-Type": "application/json", "Origin": "https://evil.example"}) as cross:
            assert cross.status == 403 and "cross-origin" in (await cross.json())["error"]
        async with session.post(f"{base}/api/encode", data=body, headers={
                "Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}) as fetch_meta:
            assert fetch_meta.status == 403
        async with session.post(f"{base}/api/encode", data=body, headers={
                "Content-Type": "application/json", "Origin": base}) as same:
            assert same.status == 400 and "images" in (await same.json())["error"]  # reached the handler

    run(decoder, scenario)
    allowed = Guard.create("127.0.0.1", allow_hosts=["aevae.internal"], allow_origins=["https://portal.example"])

    async def allowed_scenario(session: aiohttp.ClientSession, base: str, app: Any) -> None:
        port = base.rpartition(":")[2]
        async with session.get(f"{base}/api/status", headers={"Host": f"aevae.internal:{port}"}) as named:
            assert named.status == 200
        async with session.ws_connect(f"{base}/ws", headers={"Origin": "https://portal.example"}) as ws:
            assert (await ws.receive_json(timeout=10))["op"] == "status"

    run(decoder, allowed_scenario, allowed)


def test_login_is_required_when_a_login_token_is_set(decoder: ServiceProcess) -> None:
    guard = Guard.create("0.0.0.0", login=("ui-secret-token",))

    async def scenario(session: aiohttp.ClientSession, base: str, app: Any) -> None:
        async with session.get(f"{base}/", allow_redirects=False) as page:
            assert page.status == 302 and page.headers["Location"] == "/login"
        async with session.get(f"{base}/api/models") as api:
            assert api.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as ws_refused:
            await session.ws_connect(f"{base}/ws")
        assert ws_refused.value.status == 401
        async with session.get(f"{base}/api/status") as status:  # the container health check stays open
            assert status.status == 200
        async with session.get(f"{base}/?token=wrong", allow_redirects=False) as wrong:
            assert wrong.status == 401
        async with session.get(f"{base}/?token=ui-secret-token", allow_redirects=False) as login:
            assert login.status == 302 and "aevae_session" in login.cookies
            assert "httponly" in login.headers["Set-Cookie"].lower()
        # a path of two slashes would send the browser to another host after the login
        async with session.get(f"{base}//evil.example/?token=ui-secret-token&x=1", allow_redirects=False) as away:
            assert away.status == 302 and away.headers["Location"] == "/evil.example/?x=1"
        async with session.get(f"{base}/api/models") as api:  # the cookie now
            assert api.status == 200
        async with session.ws_connect(f"{base}/ws") as ws:
            assert (await ws.receive_json(timeout=10))["op"] == "status"

    run(decoder, scenario, guard)

    async def bearer(session: aiohttp.ClientSession, base: str, app: Any) -> None:
        async with session.get(f"{base}/api/models", headers={"Authorization": "Bearer ui-secret-token"}) as api:
            assert api.status == 200

    run(decoder, bearer, guard)


def test_websocket_bounds_a_flood_an_oversized_message_and_deep_json(decoder: ServiceProcess) -> None:
    async def scenario(session: aiohttp.ClientSession, base: str, app: Any) -> None:
        link = app[LINKS].decoder
        real_call, state = link.call, {"now": 0, "peak": 0}

        async def counted(request: Any) -> Any:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            try:
                return await real_call(request)
            finally:
                state["now"] -= 1

        link.call = counted
        async with session.ws_connect(f"{base}/ws") as ws:
            assert (await ws.receive_json(timeout=10))["op"] == "status"
            sent = 2000
            for i in range(sent):
                await ws.send_str(json.dumps({"op": "decode", "id": i, "channel": "main", "model": "vae",
                                              "latents": [[0.1, 0.2, 0.3, 0.4]]}))
            replies: dict[str, int] = {}
            statuses = []
            while sum(replies.values()) < sent:
                message = await ws.receive_json(timeout=60)
                if message["op"] == "status":
                    statuses.append(message)
                    continue
                key = message["op"] if message["op"] == "decoded" else message.get("code", message["error"])
                replies[key] = replies.get(key, 0) + 1
            assert set(replies) <= {"decoded", "RESOURCE_EXHAUSTED"}, replies
            assert replies.get("decoded", 0) >= 1 and replies.get("RESOURCE_EXHAUSTED", 0) >= 1, replies
            assert state["peak"] <= MAX_DECODES, state
            assert all(s["services"]["decoder"]["state"] != "down" for s in statuses)
            assert app[LINKS].decoder.status.state == "up"

            await ws.send_str(json.dumps({"op": "decode", "pad": "x" * (5 * 1024 * 1024)}))  # 5 MB
            big = await ws.receive_json(timeout=30)
            assert big["op"] == "error" and f"over the limit of {MAX_MESSAGE_BYTES} bytes" in big["error"]
            await ws.send_str("[" * 100_000 + "]" * 100_000)
            deep = await ws.receive_json(timeout=30)
            assert deep["op"] == "error" and "nested deeper than" in deep["error"]
            await ws.send_str('{"op": "decode", "x": ' + "[" * 20 + "1" + "]" * 20 + "}")  # no RecursionError
            assert "nested deeper than" in (await ws.receive_json(timeout=30))["error"]
            # the socket is still open and still decodes
            await ws.send_str(json.dumps({"op": "decode", "id": 1, "channel": "main", "model": "vae",
                                          "latents": [[0.0, 0.0, 0.0, 0.0]]}))
            while (last := await ws.receive_json(timeout=30))["op"] == "status":
                pass
            assert last["op"] == "decoded" and last["id"] == 1
        async with session.post(f"{base}/api/samples", data="[" * 100_000,
                                headers={"Content-Type": "application/json"}) as deep_post:
            assert deep_post.status == 400 and "nested deeper" in (await deep_post.json())["error"]

    run(decoder, scenario)


def test_numbers_encodings_and_frames_a_fuzzer_sends_get_clear_errors(decoder: ServiceProcess,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Integers past Python's 4,300 digits (a ValueError, not a JSONDecodeError), a 400-digit latent (an
    OverflowError in float32's conversion), latents as strings or booleans, a body that claims a
    Content-Encoding it does not have, and binary frames: each gets a 4xx or an error message, never a 500,
    a silent socket or a traceback."""
    async def scenario(session: aiohttp.ClientSession, base: str, app: Any) -> None:
        json_headers = {"Origin": base, "Content-Type": "application/json"}
        for body in ("1" * 5000, '{"model": "vae", "count": 2, "seed": ' + "9" * 5000 + "}"):
            async with session.post(f"{base}/api/samples", data=body, headers=json_headers) as answer:
                assert answer.status == 400 and "JSON" in (await answer.json())["error"]
        async with session.post(f"{base}/api/samples", data=b"not gzip",
                                headers={**json_headers, "Content-Encoding": "gzip"}) as compressed:
            assert compressed.status == 415 and "Content-Encoding" in (await compressed.json())["error"]
        async with session.ws_connect(f"{base}/ws", headers={"Origin": base}) as ws:
            async def answer() -> dict[str, Any]:
                """The next reply that is not a status broadcast (those come whenever a service changes)."""
                while (message := await ws.receive_json(timeout=10))["op"] == "status":
                    pass
                return message

            for i, latents in enumerate(["[[" + "1" * 400 + ", 0, 0, 0]]", '[["1.5", 0, 0, 0]]', "[[true, 0, 0, 0]]"]):
                await ws.send_str('{"op": "decode", "id": %d, "model": "vae", "latents": %s}' % (i, latents))
                reply = await answer()
                assert reply["op"] == "error" and reply["id"] == i and "latents" in reply["error"], reply
            await ws.send_str('{"op": "decode", "id": 9, "model": "vae", "latents": [' + "1" * 5000 + "]}")
            assert "4,300 digits" in (await answer())["error"]
            await ws.send_bytes(b"\x00\x01")
            assert "text" in (await answer())["error"]
            # NaN and 1e400 as an id came back as NaN and Infinity, which no JSON.parse reads; a model name of a
            # lone surrogate (JSON "\udc80", no UTF-8) was an internal error with 24 lines of log each
            for raw, words in (('{"op": "decode", "id": NaN, "model": "vae", "latents": [[0, 0, 0, 0]]}', "NaN is not"),
                               ('{"op": "decode", "id": 1e400, "model": "vae", "latents": [[0, 0, 0, 0]]}',
                                "1e400 is past the largest"),
                               ('{"op": "decode", "id": 11, "model": "\\udc80", "latents": [[0, 0, 0, 0]]}',
                                "'model' must name a served model")):
                await ws.send_str(raw)
                text = await ws.receive_str(timeout=10)
                while json.loads(text)["op"] == "status":
                    text = await ws.receive_str(timeout=10)
                assert words in json.loads(text)["error"] and "NaN" not in text.replace("NaN is not", ""), text
            await ws.send_str('{"op": "decode", "id": 10, "model": "vae", "latents": [[0, 0, 0, 0]]}')
            assert (await answer())["op"] == "decoded"  # the socket goes on

    with caplog.at_level("INFO"):
        run(decoder, scenario)
    assert "Traceback" not in caplog.text and "Unhandled exception" not in caplog.text


def test_ui_on_a_public_address_needs_a_login_unless_insecure(tmp_path: Path) -> None:
    isolated = {"AEVAE_TOKEN": "", "AEVAE_TOKEN_FILE": "", "XDG_CONFIG_HOME": str(tmp_path)}
    refused = run_aevae("ui", "--host", "0.0.0.0", "--port", "0", env=isolated, timeout=60)
    assert refused.returncode != 0 and "without a login" in refused.stderr and "--insecure" in refused.stderr


def test_a_decode_pins_the_version_the_page_shows(decoder: ServiceProcess, models: Path) -> None:
    """The page shows one version (labels, statistics, encodings); its decodes name it, so that a newer
    version written meanwhile does not paint images of other weights under the old labels. (Last in this
    module: it writes version 2.)"""
    from aevae.store import ModelStore

    write_tiny(models, "vae", "vae", seed=11)  # version 2, other weights: the decoder's newest within 0.1-2 s
    z = [[0.5, -1.0, 0.25, 2.0]]
    old = ModelStore(models).get("vae", 1).decode(np.asarray(z, np.float32), dtype="uint8")

    async def scenario(session: aiohttp.ClientSession, base: str, app: Any) -> list[dict[str, Any]]:
        async with session.ws_connect(f"{base}/ws") as ws:
            replies = []
            for message in ({"op": "decode", "id": 1, "model": "vae", "version": 1, "latents": z},
                            {"op": "decode", "id": 2, "model": "vae", "version": True, "latents": z},
                            {"op": "decode", "id": 3, "model": "vae", "version": 99, "latents": z},
                            {"op": "decode", "id": 4, "model": "vae", "latents": z},
                            {"op": "decode", "id": 5, "model": "vae", "version": 1.0, "latents": z}):
                await ws.send_json(message)
                reply = await ws.receive_json(timeout=20)
                while reply["op"] == "status":  # broadcasts when a service's state changes
                    reply = await ws.receive_json(timeout=20)
                replies.append(reply)
            return replies

    pinned, boolean, unknown, newest, written_as_float = run(decoder, scenario)
    assert pinned["op"] == "decoded" and pinned["version"] == 1
    images = np.frombuffer(base64.b64decode(pinned["images"][0]), np.uint8).reshape(1, *pinned["shape"])
    np.testing.assert_array_equal(images, old)  # version 1's weights, whatever the newest is
    assert boolean["op"] == "error" and "'version' must be a model version" in boolean["error"]
    assert unknown["op"] == "error" and "version 99" in unknown["error"]
    # without a version: the newest (1 or 2, as the decoder has seen version 2 yet or not), and the reply
    # says which (it said null), its images that version's
    assert newest["op"] == "decoded" and newest["version"] in (1, 2)
    images = np.frombuffer(base64.b64decode(newest["images"][0]), np.uint8).reshape(1, *newest["shape"])
    expected = ModelStore(models).get("vae", newest["version"]).decode(np.asarray(z, np.float32), dtype="uint8")
    np.testing.assert_array_equal(images, expected)
    # `1.0`, as some JSON encoders write 1, pins version 1 too (it was refused as not a version)
    assert written_as_float["op"] == "decoded" and written_as_float["version"] == 1, written_as_float


async def _raw_http(base: str, head: bytes) -> tuple[int, bytes]:
    """Sends `head` (a request line and headers, as bytes: what aiohttp's client would not send) and returns
    the status and the body of the answer."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_bytes_that_are_not_utf8_odd_origins_and_malformed_requests_get_4xx_without_tracebacks(
        decoder: ServiceProcess, caplog: pytest.LogCaptureFixture) -> None:
    """A token or a session cookie with a byte such as 0xff, an Origin with an unclosed IPv6 bracket, a shape of
    booleans and a model name of megabytes each got a 500 and a traceback, or the name back in full; a request
    aiohttp cannot parse (a header over 8 KB) logged an ERROR with a traceback, for any client to flood."""
    guard = Guard.create("127.0.0.1", login=("ui-secret-token",))

    async def scenario(session: aiohttp.ClientSession, base: str, app: Any) -> None:
        host = base.removeprefix("http://").encode()
        for header in (b"Authorization: Bearer \xff\xfe", b"Cookie: aevae_session=\xff\xfe"):
            status, body = await _raw_http(base, b"GET /api/models HTTP/1.1\r\nHost: " + host + b"\r\n" + header
                                           + b"\r\nConnection: close\r\n\r\n")
            assert status == 401 and b"log in first" in body, (header, status, body)
        login = {"Authorization": "Bearer ui-secret-token", "Content-Type": "application/json"}
        async with session.post(f"{base}/api/samples", json={}, headers={**login, "Origin": "http://[::1"}) as odd:
            assert odd.status == 403 and "cross-origin" in (await odd.json())["error"]
        async with session.post(f"{base}/api/encode", headers=login,
                                json={"model": "vae", "shape": [True, True], "images": ["AA=="]}) as booleans:
            assert booleans.status == 400 and "'shape'" in (await booleans.json())["error"]
        async with session.post(f"{base}/api/encode", headers=login, data='{"model": "\\udc80", "shape": [32, 32], '
                                '"images": ["' + base64.b64encode(bytes(1024)).decode() + '"]}') as surrogate:
            assert surrogate.status == 400 and "'model'" in (await surrogate.json())["error"]
        origin = {"Origin": base}
        for charset, body in (("bogus", b"token=abc"), ("utf-16", b"token=abc"), ("utf-8", b"token=\xff\xfe")):
            async with session.post(f"{base}/login", data=body, headers={
                    **origin, "Content-Type": f"application/x-www-form-urlencoded; charset={charset}"}) as form:
                assert form.status in (400, 401) and "<form" in await form.text(), (charset, form.status)
        async with session.post(f"{base}/login", data=b"--zz\r\nxxxx", headers={  # a multipart that breaks off
                **origin, "Content-Type": "multipart/form-data; boundary=zz"}) as cut:
            assert cut.status == 400 and "could not be read" in await cut.text(), cut.status  # was a 500
        async with session.post(f"{base}/api/samples", headers=login,
                                json={"model": "v" * 1_000_000, "count": 1, "seed": 0}) as long_name:
            text = await long_name.text()
            assert long_name.status == 400 and len(text) < 1000 and "'model'" in text, text[:200]
        status, _ = await _raw_http(base, b"GET /api/status HTTP/1.1\r\nHost: " + host + b"\r\nX-Big: "
                                    + b"a" * 10_000 + b"\r\nConnection: close\r\n\r\n")
        assert status == 400

    with caplog.at_level("INFO"):
        run(decoder, scenario, guard)
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= 40], caplog.text


def test_a_websocket_client_that_stops_reading_is_cut_off_and_holds_up_nothing(
        decoder: ServiceProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends and never reads fills the socket's buffers; aiohttp then waits for room for ever
    (its heartbeat and close() wait for the buffered bytes too), so the connection, its descriptor and the
    handler stayed for good, and a status broadcast, awaited by the call that changed a service's state,
    would hang on it. Past SEND_TIMEOUT it is cut off; state changes go on meanwhile."""
    import socket
    import time

    from aevae.ui import server

    monkeypatch.setattr(server, "SEND_TIMEOUT", 1.0)

    def open_on_server(server_port: int, client_port: int) -> bool:
        """Whether the server's end of the connection is still open (in the kernel's table: aiohttp's own
        flags say closed while asyncio keeps the socket open for the bytes it has buffered)."""
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
        ends = {(int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16)) for f in (line.split() for line in lines)}
        return (server_port, client_port) in ends

    def frame(payload: bytes) -> bytes:  # a masked text frame (mask 0: the payload as is)
        n = len(payload)
        length = bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 127]) + n.to_bytes(8, "big"))
        return b"\x81" + length + b"\0\0\0\0" + payload

    async def scenario(session: aiohttp.ClientSession, base: str, app: Any) -> None:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect((host, int(port)))
        raw.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        raw.setblocking(False)
        # each message gets an error reply quoting its 200 KB id: the replies pile up on the server's side
        message = frame(json.dumps({"op": "decode", "id": "x" * 200_000}).encode())
        blocked_since, pending = None, b""
        try:
            while True:
                try:
                    pending = pending or message
                    pending = pending[raw.send(pending):]
                    blocked_since = None
                except BlockingIOError:
                    blocked_since = blocked_since or time.monotonic()
                    if time.monotonic() - blocked_since > 2:
                        break  # the server stopped reading: its replies have nowhere to go
                    await asyncio.sleep(0.05)
                except (ConnectionResetError, BrokenPipeError):
                    break  # cut off already
            # state changes (each broadcast to every socket) do not wait on it
            for i in range(100):
                await asyncio.wait_for(app[LINKS].decoder._set("down", f"change {i}"), 2)
            await app[LINKS].decoder._set("up", "")
            deadline = time.monotonic() + 15
            while open_on_server(int(port), raw.getsockname()[1]):
                assert time.monotonic() < deadline, "a WebSocket that does not read was never cut off"
                await asyncio.sleep(0.2)
        finally:
            raw.close()
        async with session.get(f"{base}/api/status") as status:
            assert status.status == 200
        async with session.ws_connect(f"{base}/ws") as ws:  # the others go on
            assert (await ws.receive_json(timeout=10))["op"] == "status"

    run(decoder, scenario)


def test_ui_start_up_errors_are_one_clear_line(tmp_path: Path) -> None:
    """An --allow-origin that does not parse (a traceback), an encrypted --https-key (OpenSSL asked for its
    passphrase on the terminal), a --tls-ca that cannot be read (the UI started, then answered 500 to every
    page request) and a --metrics-port in use ("cannot listen on HOST:PORT" naming the UI's port)."""
    import socket

    from cryptography.hazmat.primitives import serialization

    from aevae.services.security import make_certificates

    certs = make_certificates(tmp_path / "tls")
    key = serialization.load_pem_private_key(certs["key"].read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"passphrase")))
    isolated = {"AEVAE_TOKEN": "", "AEVAE_TOKEN_FILE": "", "XDG_CONFIG_HOME": str(tmp_path)}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = {
            "--allow-origin 'http://[::1' is not an origin": ["--allow-origin", "http://[::1"],
            "is encrypted": ["--https-cert", str(certs["cert"]), "--https-key", str(encrypted)],
            f"tls_ca: cannot read {tmp_path / 'nope.pem'}": ["--tls-ca", str(tmp_path / "nope.pem")],
            f"cannot serve metrics on 127.0.0.1:{taken.getsockname()[1]} (--metrics-port)":
                ["--metrics-port", str(taken.getsockname()[1])],
        }
        for expected, args in cases.items():
            done = run_aevae("ui", "--port", "0", *args, env=isolated, timeout=30)
            assert done.returncode == 2 and expected in done.stderr, (expected, done.stderr)
            assert done.stderr.count("\n") == 1 and "pass phrase" not in done.stderr, done.stderr


def test_websockets_past_the_limit_are_refused_with_503_and_a_closed_one_frees_its_place(
        decoder: ServiceProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each WebSocket holds a descriptor, buffers and a handler: a flood of them ran the UI out of descriptors.
    Past MAX_SOCKETS the handshake is 503 with Retry-After and says why; a socket that closes frees its place at
    once (not when it is collected), and the open ones go on decoding."""
    from aevae.ui import server

    monkeypatch.setattr(server, "MAX_SOCKETS", 2)

    async def scenario(session: aiohttp.ClientSession, base: str, app: Any) -> None:
        first = await session.ws_connect(f"{base}/ws")
        second = await session.ws_connect(f"{base}/ws")
        for ws in (first, second):
            assert (await ws.receive_json(timeout=10))["op"] == "status"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{base}/ws")
        assert refused.value.status == 503 and refused.value.headers is not None
        assert refused.value.headers.get("Retry-After") == "5"
        async with session.get(f"{base}/ws", headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                                      "Sec-WebSocket-Version": "13",
                                                      "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as raw:
            assert raw.status == 503 and "2 WebSocket connections open" in (await raw.json())["error"]
        await second.send_json({"op": "decode", "id": 1, "channel": "a", "model": "vae", "latents": [[0, 0, 0, 0]]})
        reply = await second.receive_json(timeout=10)
        while reply["op"] == "status":  # the services' state, pushed whenever it changes
            reply = await second.receive_json(timeout=10)
        assert reply["op"] == "decoded" and reply["id"] == 1
        await first.close()
        for _ in range(100):  # the server's handler ends a moment after the close handshake
            if len(app[server.SOCKETS]) < 2:
                break
            await asyncio.sleep(0.02)
        third = await session.ws_connect(f"{base}/ws")
        assert (await third.receive_json(timeout=10))["op"] == "status"
        await asyncio.gather(second.close(), third.close())

    run(decoder, scenario)


def test_a_service_restarted_after_an_outage_is_seen_at_the_first_probe(models: Path) -> None:
    """While a service is down, the UI probes it every second with a fresh client. In gRPC's process-wide
    subchannel pool those fresh clients shared one connection to the address, and with it the reconnect
    backoff the outage had grown (1 s, 1.6x per attempt): the service back and serving, the probe still failed
    for seconds (4 s after 10 s down). Each client now has its own connection: the first probe sees it."""
    import socket

    from aevae.client import AsyncEncoderClient
    from aevae.ui.services import ServiceLink

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def scenario() -> None:
        link = ServiceLink("encoder", f"127.0.0.1:{port}", AsyncEncoderClient)
        try:
            with ServiceProcess("encoder", models, port=port) as service:
                service.wait_healthy()
                await link.probe()
                assert link.status.state == "up"
            for _ in range(8):  # the outage, probed as the UI does
                await link.probe()
                assert link.status.state == "down"
                await asyncio.sleep(1.0)
            with ServiceProcess("encoder", models, port=port) as service:
                service.wait_healthy()
                await link.probe()
                assert link.status.state == "up", link.status.message
        finally:
            await link.aclose()

    asyncio.run(scenario())


def test_calls_to_a_service_that_hangs_fail_at_once_until_it_answers_again(models: Path) -> None:
    """A service stopped (SIGSTOP: connections open, nothing answered): the page said "down" after a probe, yet
    each call still waited out its timeout (6 s a decode). Calls now fail at once with the probe's words while
    the probes get no answer, and go through again once one is answered."""
    import os
    import signal

    from aevae.client import AsyncDecoderClient
    from aevae.ui.services import ServiceDown, ServiceLink

    z = np.zeros((1, 4), np.float32)

    async def scenario(service: ServiceProcess) -> None:
        link = ServiceLink("decoder", service.address, AsyncDecoderClient)
        try:
            await link.probe()
            assert link.status.state == "up"
            assert (await link.call(lambda c: c.decode(z))).shape == (1, 32, 32)
            assert service.process is not None
            os.kill(service.process.pid, signal.SIGSTOP)
            try:
                await link.probe()
                assert link.status.state == "down"
                with pytest.raises(ServiceDown, match="does not answer its health checks"):
                    await link.call(lambda c: c.decode(z))
            finally:
                os.kill(service.process.pid, signal.SIGCONT)
            await link.probe()
            assert link.status.state == "up", link.status.message
            assert (await link.call(lambda c: c.decode(z))).shape == (1, 32, 32)
        finally:
            await link.aclose()

    with ServiceProcess("decoder", models) as service:
        service.wait_healthy()
        asyncio.run(scenario(service))


def test_a_busy_ui_does_not_call_a_healthy_service_down(models: Path) -> None:
    """Pages flooding the UI with decodes kept its event loop busy: the health probe, run on that loop, found
    no answer within its second from a service that answered in milliseconds, and every page was told both
    services were down and had its calls refused until a probe got through. The probes run on a thread."""
    import time

    from aevae.client import AsyncEncoderClient
    from aevae.ui.services import ServiceLink

    async def busy(until: float) -> None:  # work that holds the loop 30 ms at a time, as parsing a flood does
        while time.monotonic() < until:
            time.sleep(0.03)
            await asyncio.sleep(0)

    async def scenario(address: str) -> list[str]:
        link = ServiceLink("encoder", address, AsyncEncoderClient)
        try:
            await link.probe()
            assert link.status.state == "up"
            until = time.monotonic() + 6.0
            hogs = [asyncio.create_task(busy(until)) for _ in range(40)]  # a turn of the loop takes about 1.2 s
            states = []
            while time.monotonic() < until - 1.5:
                await link.probe()
                states.append(f"{link.status.state} {link.status.message}".strip())
            await asyncio.gather(*hogs)
            return states
        finally:
            await link.aclose()

    with ServiceProcess("encoder", models) as service:
        service.wait_healthy()
        states = asyncio.run(scenario(service.address))
    assert states and set(states) == {"up"}, states
