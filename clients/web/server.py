"""The UI's web server: serves the page and its assets, and relays the page's requests to the services.

HTTP for what the page asks once (models, latent statistics, encoding inputs, judged samples); one WebSocket
for what it asks all the time (decoding while a handle is dragged) and for service status pushed as it
changes. The page keeps at most one or two decodes per channel in flight and sends only the newest latents
when one returns (latest wins), so a fast drag never queues up stale work here.

Layout: `Links` (the two services), the request parsers, the handlers, and `create_app`, which takes extra
aiohttp middlewares for whatever wraps every request (checks, logging).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import math
import socket
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from aiohttp import WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from aevae.client import AsyncDecoderClient, AsyncEncoderClient, ModelInfo
from aevae.finite import past_float32
from aevae.ui.guard import MAX_DECODES, MAX_SOCKETS, TRANSPORT_MAX_BYTES, BadMessage, Guard, parse_json
from aevae.ui.services import CLOSE_TIMEOUT, PROBE_TIMEOUT, RequestRejected, ServiceDown, ServiceLink, bounded
from aevae.ui.validity import DEFAULT_PATH as CLASSIFIER_PATH, Judge

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
POLL_INTERVAL = 1.0
MAX_IMAGES = 256
MAX_IMAGE_SIDE = 256  # the encoder decides which shapes its model takes; this only bounds the request
MAX_LATENTS = 1024
MAX_SAMPLES = 64
MAX_LATENT_DIM = 1024  # /api/samples' latent_dim: far above any model here, and 64 x 1024 floats stay small
MAX_BODY = 8 * 1024 * 1024  # an HTTP request body
MAX_MODEL_NAME = 256
# A WebSocket message not taken by its client within this (a client that stopped reading: the buffers are
# full) cuts the connection off; see Socket.send.
SEND_TIMEOUT = 10.0


@dataclass
class Links:
    """The UI server's two services."""

    encoder: ServiceLink[AsyncEncoderClient]
    decoder: ServiceLink[AsyncDecoderClient]

    def __iter__(self) -> Iterator[ServiceLink[Any]]:
        return iter((self.encoder, self.decoder))


LINKS = web.AppKey("links", Links)
JUDGE = web.AppKey("judge", Judge)
SOCKETS: web.AppKey[weakref.WeakSet["Socket"]] = web.AppKey("sockets")
TASKS: web.AppKey[list[asyncio.Task[None]]] = web.AppKey("tasks")
# With --metrics-port: called with each WebSocket decode's round trip in seconds and its outcome, and with
# True when a WebSocket session is upgraded, False when it ends.
ROUND_TRIP: web.AppKey[Callable[[float, str], None]] = web.AppKey("round_trip")
SESSION: web.AppKey[Callable[[bool], None]] = web.AppKey("session")


class BadRequest(ValueError):
    """The page (or anyone calling the API) sent something malformed; the message says what is accepted."""


# -- conversions ------------------------------------------------------------------------------------------
def model_info(info: ModelInfo) -> dict[str, Any]:
    out = dataclasses.asdict(info)
    out["image_shape"] = list(info.image_shape)
    return out


def slim_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """What the page draws: per-dimension ranges and violins, and the PCA scatter (not the raw latents)."""
    pca = stats.get("pca") or {}
    return {
        "model": stats.get("model"), "version": stats.get("version"), "count": stats.get("count"),
        "latent_dim": stats.get("latent_dim"),
        "dims": [{k: d.get(k) for k in ("min", "max", "mean", "std", "quantiles", "grid", "density")}
                 for d in stats.get("dims", [])],
        "pca": {"points": np.asarray(pca.get("points", []), dtype=float).round(3).tolist(),
                "labels": list(pca.get("labels", [])),
                "explained_variance_ratio": list(pca.get("explained_variance_ratio", [])),
                "mean": list(pca.get("mean", [])), "components": [list(c) for c in pca.get("components", [])]},
    }


def decode_images(payload: dict[str, Any]) -> np.ndarray:
    """N x H x W uint8 from base64 rows; which shapes a model takes is the encoder's to say."""
    images = payload.get("images")
    shape = payload.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(type(s) is int and 1 <= s <= MAX_IMAGE_SIDE for s in shape)):  # not bool: true is no side
        raise BadRequest(f"'shape' must be [height, width] with sides 1..{MAX_IMAGE_SIDE}, got {shape!r}")
    if not isinstance(images, list) or not 1 <= len(images) <= MAX_IMAGES:
        raise BadRequest(f"'images' must be a list of 1..{MAX_IMAGES} base64 strings of uint8 pixels")
    size = shape[0] * shape[1]
    arrays = []
    for i, item in enumerate(images):
        try:
            raw = base64.b64decode(item, validate=True)
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"images[{i}] is not valid base64") from exc
        if len(raw) != size:
            raise BadRequest(f"images[{i}] has {len(raw)} bytes, expected {size} for shape {list(shape)}")
        arrays.append(np.frombuffer(raw, dtype=np.uint8).reshape(shape))
    return np.stack(arrays)


def parse_latents(value: Any) -> np.ndarray:
    """N x d numbers, JSON numbers only: numpy would also take "1.5" or true, and an integer of 400 digits
    overflows float32's conversion (OverflowError) rather than failing as a value."""
    wanted = "'latents' must be a list of equal-length lists of numbers"
    if not isinstance(value, list) or not all(
            isinstance(row, list) and all(type(v) in (int, float) for v in row) for row in value):
        raise BadRequest(wanted)
    if len({len(row) for row in value}) > 1:
        raise BadRequest(f"{wanted}: got rows of {sorted({len(row) for row in value})[:8]} numbers")
    try:
        wide = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"{wanted}, each finite and of float32's range") from exc
    if wide.ndim != 2 or not 1 <= wide.shape[0] <= MAX_LATENTS or wide.shape[1] < 1:
        raise BadRequest(f"'latents' must be N x d with 1 <= N <= {MAX_LATENTS}, got shape {list(wide.shape)}")
    if not np.isfinite(wide).all():
        raise BadRequest("'latents' must be finite numbers (no NaN or Infinity)")
    beyond = past_float32(wide)  # 1e39: cast, it became infinity, with numpy's warning in the log
    if beyond:
        row, col = beyond
        raise BadRequest(f"'latents' must lie within float32's range (about +-3.4e38); latents[{row}][{col}] is "
                         f"{wide[row, col]:g}")
    return wide.astype(np.float32)


def model_name(payload: dict[str, Any]) -> str:
    """The model a message names; bounded, since errors quote it (an 8 MB name came back in full)."""
    name = payload.get("model")
    # not printable: control characters, and a lone surrogate (JSON "\udc80"), which no UTF-8 can carry
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_MODEL_NAME or not name.isprintable():
        raise BadRequest(f"'model' must name a served model (1..{MAX_MODEL_NAME} printable characters), e.g. "
                         "\"vae\" or \"ae\"")
    return name


def whole(value: Any) -> Any:
    """A JSON number that is a whole number as that int (`1.0`, which some encoders write for 1, and which was
    refused as "not a whole number"), anything else as given, for the checks that follow to name."""
    if type(value) is float and value.is_integer() and abs(value) < 2 ** 63:
        return int(value)
    return value


def model_version(payload: dict[str, Any]) -> int | None:
    """The version a message pins (the one the page shows), or None (absent, null or 0) for the newest."""
    value = whole(payload.get("version"))
    if value is None or type(value) is int and value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2 ** 63 - 1:
        raise BadRequest(f"'version' must be a model version (a whole number from 1), or null for the newest, "
                         f"got {value!r}")
    return value


def _query_int(text: str | None) -> Any:
    """A query parameter as the integer it spells, else as given (for model_version's message)."""
    return int(text) if text is not None and text.isascii() and text.isdigit() and len(text) <= 19 else text


def bounded_int(payload: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = whole(payload.get(key, default))
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"'{key}' must be an integer in {lo}..{hi}, got {value!r}")
    return value


def rows(array: Any) -> list[list[float | None]] | None:
    if array is None:
        return None
    return [[float(v) if math.isfinite(float(v)) else None for v in row] for row in np.asarray(array)]


def to_base64(images: Iterable[np.ndarray]) -> list[str]:
    return [base64.b64encode(np.ascontiguousarray(im).tobytes()).decode("ascii") for im in images]


# A service's refusal as an HTTP status: the request's fault (4xx, as gRPC's own HTTP mapping has it), a
# limit to retry after (429); anything else (UNAUTHENTICATED: the UI's token; INTERNAL) failed the UI, not the
# page's request: 502.
REJECTED_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "NOT_FOUND": 404,
                   "RESOURCE_EXHAUSTED": 429}


def error_body(exc: Exception) -> tuple[int, dict[str, Any]]:
    if isinstance(exc, BadRequest):
        return 400, {"error": str(exc)}
    if isinstance(exc, ServiceDown):
        return 503, {"error": str(exc), "service": exc.service}
    if isinstance(exc, RequestRejected):
        status = REJECTED_STATUS.get(exc.code.name, 502)
        return status, {"error": exc.message, "service": exc.service, "code": exc.code.name}
    raise exc


async def json_body(request: web.Request, expected: str) -> dict[str, Any]:
    try:
        payload = parse_json(await request.read(), max_bytes=MAX_BODY)
    except BadMessage as exc:
        raise BadRequest(f"body: {exc}: {expected}") from exc
    except (RequestPayloadError, HttpProcessingError) as exc:  # e.g. a Content-Encoding the body does not have
        raise BadRequest(f"body: unreadable ({exc}): {expected}") from None
    except ConnectionError:  # the client went away mid-body: raised on, aiohttp logged a traceback per request
        raise BadRequest(f"body: the connection closed before the whole body came: {expected}") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"body must be a JSON object: {expected}")
    return payload


# -- HTTP handlers --------------------------------------------------------------------------------------
# What the API takes, for the messages of aiohttp's own refusals (api_errors).
ENDPOINTS = ("GET /api/status", "GET /api/models", "GET /api/stats/<model>?version=N", "POST /api/encode",
             "POST /api/samples", "GET /ws (the WebSocket)")
MAX_QUOTED_PATH = 200  # of a path quoted in an error (a URL may be 8 KB)


@web.middleware
async def api_errors(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """aiohttp's own refusals under /api/ and /ws as JSON `error`s that say what is accepted: its plain-text
    "404: Not Found", "405: Method Not Allowed", "Maximum request body size 8388608 exceeded." and "No
    WebSocket UPGRADE hdr: None" named neither the endpoints, the methods a path takes, nor what /ws is. The
    page and its static files keep aiohttp's answers."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or not request.path.startswith(("/api/", "/ws")):
            raise
        path = request.path if len(request.path) <= MAX_QUOTED_PATH else request.path[:MAX_QUOTED_PATH] + "..."
        headers = {}
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = sorted(exc.allowed_methods)
            headers["Allow"] = ", ".join(allowed)
            message = f"{path} does not take {request.method}; it takes {' or '.join(allowed)}"
        elif isinstance(exc, web.HTTPNotFound):
            message = f"no endpoint {path!r}; the API is: {', '.join(ENDPOINTS)}"
        elif isinstance(exc, web.HTTPRequestEntityTooLarge):
            message = f"the body is over the limit of {MAX_BODY:,} bytes"
        elif request.path == "/ws":
            why = " ".join((exc.text or exc.reason).split())  # aiohttp's reason, on one line (it holds a newline)
            message = (f"/ws is the page's WebSocket ({why}): open it with a WebSocket client (Upgrade: "
                       "websocket, Sec-WebSocket-Version: 13, a Sec-WebSocket-Key of 16 bytes in base64)")
        else:
            message = exc.text or exc.reason
        response = web.json_response({"error": message}, status=exc.status, headers=headers)
        if exc.status == 413:  # the rest of the body was not read: the connection cannot carry another request
            response.force_close()
        return response


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def status_message(app: web.Application) -> dict[str, Any]:
    """The services' state, and the decodes a socket may have in flight (the page keeps under it)."""
    return {"op": "status", "services": {link.service: {"target": link.target, **link.status.as_dict()}
                                         for link in app[LINKS]}, "max_decodes": MAX_DECODES}


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(status_message(request.app))


async def get_models(request: web.Request) -> web.Response:
    """Each service's models, and the sample judge; a service that is down gives an error entry."""
    out: dict[str, Any] = {}
    for link in request.app[LINKS]:
        try:
            infos = await link.call(lambda client: client.list_models())
            out[link.service] = {"models": [model_info(m) for m in infos]}
        except (ServiceDown, RequestRejected) as exc:
            out[link.service] = {"models": [], "error": str(exc)}
    out["classifier"] = request.app[JUDGE].describe()
    return web.json_response(out)


async def get_stats(request: web.Request) -> web.Response:
    """`?version=N` pins the version (the page's); without it, the newest."""
    try:
        name = model_name({"model": request.match_info["model"]})  # bounded as in the POSTs: errors quote it
        given = request.query.getall("version", [])
        if len(given) > 1:  # which one was meant? (the first was taken silently)
            raise BadRequest(f"'version' given {len(given)} times; give it once, or leave it out for the newest")
        version = model_version({"version": _query_int(request.query.get("version"))})
        stats = await request.app[LINKS].encoder.call(lambda client: client.latent_stats(model=name, version=version))
    except (BadRequest, ServiceDown, RequestRejected) as exc:
        status, body = error_body(exc)
        return web.json_response(body, status=status)
    return web.json_response(slim_stats(stats))


async def post_encode(request: web.Request) -> web.Response:
    try:
        payload = await json_body(request, "{model, version?, shape: [height, width], images: [base64 uint8 pixels]}")
        images, name, version = decode_images(payload), model_name(payload), model_version(payload)
        result = await request.app[LINKS].encoder.call(lambda client: client.encode(images, model=name,
                                                                                      version=version))
    except (BadRequest, ServiceDown, RequestRejected) as exc:
        status, body = error_body(exc)
        return web.json_response(body, status=status)
    return web.json_response({"model": result.model, "version": result.version, "mean": rows(result.mean),
                              "logvar": rows(result.logvar)})


async def post_samples(request: web.Request) -> web.Response:
    """`count` latents drawn from N(0, I) with `seed`, decoded by `model`, each judged by the digit classifier.

    The latent dimension is `latent_dim` when given (the page sends that of the version it shows), else the
    served model's newest version's: ListModels describes only that one, and a page pinned to an older version
    of another width, asking just after a new version came, would get samples of the wrong width. The same seed
    gives the same samples.
    """
    try:
        payload = await json_body(request, "{model, version?, latent_dim?: 1..1024, count: 1..64, seed: integer}")
        name, version = model_name(payload), model_version(payload)
        count = bounded_int(payload, "count", 16, 1, MAX_SAMPLES)
        seed = bounded_int(payload, "seed", 0, 0, 2 ** 32 - 1)
        decoder = request.app[LINKS].decoder
        infos = await decoder.call(lambda client: client.list_models())
        info = next((m for m in infos if m.name == name), None)
        if info is None:
            # the decoder's own answer for a model it does not have (as /api/encode and /api/stats give): 404
            raise RequestRejected("decoder", grpc.StatusCode.NOT_FOUND,
                                  f"the decoder serves no model {name!r}; it serves {sorted(m.name for m in infos)}")
        if not info.version:  # listed for its broken versions alone (latent_dim 0): their reasons, rather
            # than a complaint about a latent_dim the page never sent
            reasons = "; ".join(f"version {v}: {why}" for v, why in sorted(info.broken.items())) or "none loads"
            raise RequestRejected("decoder", grpc.StatusCode.FAILED_PRECONDITION,
                                  f"no loadable version of model {name!r}: {reasons}")
        width = bounded_int(payload, "latent_dim", info.latent_dim, 1, MAX_LATENT_DIM)
        latents = np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32)
        decoded = await decoder.call(lambda client: client.decode_result(latents, model=name, version=version,
                                                                         dtype="float32"))
    except (BadRequest, ServiceDown, RequestRejected) as exc:
        status, body = error_body(exc)
        return web.json_response(body, status=status)
    images = decoded.images
    judge = request.app[JUDGE]
    why_not = judge.unavailable_for(images.shape[1:])
    pixels = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)  # for display; judged as floats
    return web.json_response({
        "model": name, "version": decoded.version, "seed": seed, "shape": list(images.shape[1:]),
        "latents": rows(latents), "images": to_base64(pixels),
        "verdicts": None if why_not else judge.judge(images).as_dict(), "unjudged": why_not,
    })


# -- WebSocket: decoding and status ---------------------------------------------------------------------
async def decode_reply(app: web.Application, message: dict[str, Any]) -> dict[str, Any]:
    base = {"id": message.get("id"), "channel": message.get("channel")}
    started = time.perf_counter()
    try:
        latents, name, version = parse_latents(message.get("latents")), model_name(message), model_version(message)
        decoded = await app[LINKS].decoder.call(
            lambda client: client.decode_result(latents, model=name, version=version, dtype="uint8"))
        reply = {"op": "decoded", **base, "model": name, "version": decoded.version,
                 "shape": list(decoded.images.shape[1:]), "images": to_base64(decoded.images)}
    except (BadRequest, ServiceDown, RequestRejected) as exc:
        reply = {"op": "error", **base, **error_body(exc)[1]}
    if ROUND_TRIP in app:
        app[ROUND_TRIP](time.perf_counter() - started, str(reply["op"]))
    return reply


class Socket(web.WebSocketResponse):
    """The page's WebSocket, whose every send is bounded in time. A client that stops reading (and keeps
    sending, or lets status pushes pile up) fills the socket's buffers; aiohttp then waits for room for ever,
    and neither its heartbeat nor close() end that wait: both close the transport, which asyncio keeps open
    until its buffered bytes have gone. Past SEND_TIMEOUT the transport is aborted: its buffer is dropped and
    every send waiting on it ends."""

    transport: asyncio.Transport | None = None

    async def prepare(self, request: web.BaseRequest) -> Any:
        writer = await super().prepare(request)
        self.transport = request.transport
        return writer

    async def send(self, message: dict[str, Any]) -> bool:
        """Sends `message`; False when the socket is closed, its client gone, or cut off now."""
        if self.closed:
            return False
        try:
            await bounded(self.send_json(message), SEND_TIMEOUT)
            return True
        except asyncio.TimeoutError:
            log.info("a WebSocket client took no message for %.0f s: cut off", SEND_TIMEOUT)
            if self.transport is not None:
                self.transport.abort()
        except (ConnectionError, RuntimeError):  # the client went away: routine, not a traceback
            pass
        return False

    async def shut(self) -> None:
        """Closes the socket, within SEND_TIMEOUT: the close frame of a client that stopped reading would
        wait for room for ever (the UI's shutdown hung on it); then the transport is aborted."""
        try:
            await bounded(self.close(), SEND_TIMEOUT)
        except asyncio.TimeoutError:
            if self.transport is not None:
                self.transport.abort()
        except (ConnectionError, RuntimeError):
            pass


async def websocket(request: web.Request) -> web.StreamResponse:
    sockets = request.app[SOCKETS]
    if len(sockets) >= MAX_SOCKETS:  # answered before the upgrade: the refused client holds nothing
        return web.json_response({"error": f"the UI has {MAX_SOCKETS} WebSocket connections open, its limit; close "
                                           "a page or retry later", "code": "UNAVAILABLE"},
                                 status=503, headers={"Retry-After": "5"})
    # aiohttp closes the socket (1009) only past TRANSPORT_MAX_BYTES; below it, parse_json answers an error
    ws = Socket(heartbeat=20, max_msg_size=TRANSPORT_MAX_BYTES)
    await ws.prepare(request)
    sockets.add(ws)
    observe = request.app.get(SESSION)
    if observe is not None:
        observe(True)
    try:
        return await _converse(request.app, ws)
    finally:
        sockets.discard(ws)  # now, not when collected: the count is the limit's
        if observe is not None:
            observe(False)


async def _converse(app: web.Application, ws: Socket) -> Socket:
    """Answers the socket's messages until it closes: decodes run beside each other, at most MAX_DECODES."""
    if not await ws.send(status_message(app)):
        return ws

    async def handle(message: dict[str, Any]) -> None:
        try:
            reply = await decode_reply(app, message)
        except Exception as exc:  # noqa: BLE001 - a bug answers this message; the socket and the others go on
            log.exception("decode message failed")
            reply = {"op": "error", "id": message.get("id"), "channel": message.get("channel"),
                     "error": f"internal error: {type(exc).__name__}"}
        await ws.send(reply)

    pending: set[asyncio.Task[None]] = set()
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            reply: dict[str, Any] | None = {"op": "error", "error": "messages must be JSON text frames, not binary"}
        elif msg.type != WSMsgType.TEXT:
            continue
        else:
            reply = None
            try:
                message = parse_json(msg.data)
            except BadMessage as exc:
                reply = {"op": "error", "error": str(exc)}
            if reply is None and (not isinstance(message, dict) or message.get("op") != "decode"):
                reply = {"op": "error", "error": "accepted messages: {op: \"decode\", id, channel, model, "
                                                 "latents: [[...]]}"}
            if reply is None and len(pending) >= MAX_DECODES:  # answered at once, never queued: a flood costs
                # nothing downstream
                reply = {"op": "error", "id": message.get("id"), "channel": message.get("channel"),
                         "code": "RESOURCE_EXHAUSTED", "error": f"at most {MAX_DECODES} decodes in flight per "
                         "connection; wait for a reply before sending more"}
        if reply is not None:
            if not await ws.send(reply):
                break
            continue
        task = asyncio.create_task(handle(message))
        pending.add(task)
        task.add_done_callback(pending.discard)
    for task in pending:
        task.cancel()
    return ws


async def broadcast_status(app: web.Application) -> None:
    """The services' state to every open socket, all at once: one that takes nothing holds up none of the
    others (it is cut off after SEND_TIMEOUT)."""
    message = status_message(app)
    sockets: weakref.WeakSet[Socket] = app[SOCKETS]
    await asyncio.gather(*(ws.send(message) for ws in list(sockets) if not ws.closed))


# -- the app --------------------------------------------------------------------------------------------
def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/api/status", get_status)
    app.router.add_get("/api/models", get_models)
    app.router.add_get("/api/stats/{model}", get_stats)
    app.router.add_post("/api/encode", post_encode)
    app.router.add_post("/api/samples", post_samples)
    app.router.add_get("/ws", websocket)
    app.router.add_static("/static", STATIC, append_version=False)


class _UnreadableBodies(logging.Filter):
    """aiohttp drains a request body the handler did not read once the answer has gone, and logs an ERROR
    with three chained tracebacks when the body cannot be read (a Content-Encoding it does not have, a
    truncated chunk); it logs one too for every request it cannot parse (a header over 8 KB, too many
    headers, no Host, a byte not allowed in the URL). Both are the client's fault, already answered (4xx),
    and a log flood open to any client: each becomes one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (RequestPayloadError, HttpProcessingError)):
            what = "body could not be read" if isinstance(error, RequestPayloadError) else "could not be parsed"
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            record.msg, record.args = f"a request {what} (the client's): %s", (" ".join(lines)[:200],)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


def quiet_unreadable_bodies() -> None:
    """Installs _UnreadableBodies on aiohttp's server logger, once."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _UnreadableBodies) for f in logger.filters):
        logger.addFilter(_UnreadableBodies())


def create_app(encoder: str, decoder: str, poll_interval: float = POLL_INTERVAL,
               classifier: Path | None = CLASSIFIER_PATH, middlewares: Iterable[Any] = (),
               guard: Guard | None = None, security: Any = None) -> web.Application:
    """`guard`: the Host, Origin and login checks (guard.py; default: those of a server bound to loopback);
    `security`: the aevae.client ChannelSecurity for the services (default: from the environment)."""
    guard = guard or Guard.create("127.0.0.1")
    quiet_unreadable_bodies()
    # `middlewares` (the metrics) first: they see the guard's refusals too
    app = web.Application(client_max_size=MAX_BODY, middlewares=[*middlewares, guard.middleware(), api_errors])

    broadcasts: set[asyncio.Task[None]] = set()

    async def changed() -> None:
        # not awaited: the call whose outcome changed a service's state answers at once, whatever the sockets
        task = asyncio.create_task(broadcast_status(app))
        broadcasts.add(task)
        task.add_done_callback(broadcasts.discard)

    app[LINKS] = Links(encoder=ServiceLink("encoder", encoder, AsyncEncoderClient, changed, security),
                       decoder=ServiceLink("decoder", decoder, AsyncDecoderClient, changed, security))
    app[JUDGE] = Judge(classifier)
    if app[JUDGE].classifier is None:
        log.warning("sample validity is off: %s", app[JUDGE].reason)
    app[SOCKETS] = weakref.WeakSet()
    app[TASKS] = []

    async def start_watchers(app: web.Application) -> None:
        app[TASKS].extend(asyncio.create_task(link.watch(poll_interval)) for link in app[LINKS])

    async def stop(app: web.Application) -> None:
        for link in app[LINKS]:
            link.stop_watching()
        for task in app[TASKS]:
            task.cancel()
        watchers: list[asyncio.Task[None]] = app[TASKS]
        if watchers:
            # Bounded: a watcher whose cancellation was lost ends on its flag within a probe and an interval.
            _, pending = await asyncio.wait(watchers, timeout=PROBE_TIMEOUT + CLOSE_TIMEOUT + poll_interval + 2)
            if pending:
                log.warning("%d service watcher(s) did not stop; shutting down without them", len(pending))
        for task in list(broadcasts):
            task.cancel()
        sockets: weakref.WeakSet[Socket] = app[SOCKETS]
        await asyncio.gather(*(ws.shut() for ws in list(sockets)))
        for link in app[LINKS]:
            await link.aclose()

    app.on_startup.append(start_watchers)
    app.on_shutdown.append(stop)
    add_routes(app)
    guard.add_routes(app)
    return app


def serve(encoder: str, decoder: str, host: str = "127.0.0.1", port: int = 8080,
          classifier: Path | None = CLASSIFIER_PATH, metrics_port: int | None = None, guard: Guard | None = None,
          security: Any = None, ssl_context: Any = None, metrics_host: str | None = None) -> None:
    """Runs the UI server until interrupted (what `aevae ui` calls); Prometheus metrics on `metrics_port`, on
    `metrics_host` (default: `host`); `guard`, `security`: see create_app; `ssl_context`: serve HTTPS."""
    middlewares: list[Any] = []
    if metrics_port is not None:
        from aevae.services import metrics

        metrics.serve_metrics(metrics_port, host if metrics_host is None else metrics_host, "ui")
        middlewares.append(metrics.ui_middleware())
    app = create_app(encoder, decoder, classifier=classifier, middlewares=middlewares,
                     guard=guard or Guard.create(host), security=security)
    if metrics_port is not None:
        app[ROUND_TRIP] = metrics.observe_ui_decode
        app[SESSION] = metrics.observe_ui_session
    where: dict[str, Any] = {"host": host, "port": port}
    if port == 0:
        # The system picks the port: bind it here to know which, so the line below names the port listened on
        # (aiohttp would be given, and some of its versions print, the 0 that was asked for). An IPv6 literal
        # such as ::1 needs an IPv6 socket; a name binds its first address.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, 0), family=family)
        port = sock.getsockname()[1]
        where = {"sock": sock}
    shown = f"[{host}]" if ":" in host else host
    listening = (f"aevae ui: {'https' if ssl_context else 'http'}://{shown}:{port}/  (encoder {encoder}, "
                 f"decoder {decoder})")
    # aiohttp calls `print` once the socket is bound, so the line never announces a port that failed
    web.run_app(app, **where, print=lambda _: print(listening, flush=True), handle_signals=True,
                ssl_context=ssl_context)
