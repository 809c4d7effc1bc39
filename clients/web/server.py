"""The UI's web server: serves the page and its assets, and relays the page's requests to the services.

HTTP for what the page asks once (models, latent statistics, encoding inputs); one WebSocket for what it asks
all the time (decoding while a handle is dragged) and for service status pushed as it changes. The page keeps
at most one decode per channel in flight and sends only the newest latents when it returns (latest wins), so
a fast drag never queues up stale work here.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from aevae.ui.services import RequestRejected, ServiceDown, ServiceLink

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
POLL_INTERVAL = 1.0
MAX_IMAGES = 256
MAX_LATENTS = 1024
IMAGE_SHAPES = ((28, 28), (32, 32))

LINKS = web.AppKey("links", dict)
SOCKETS = web.AppKey("sockets", weakref.WeakSet)
TASKS = web.AppKey("tasks", list)


class BadRequest(ValueError):
    """The page (or anyone calling the API) sent something malformed; the message says what is accepted."""


# -- conversions ------------------------------------------------------------------------------------------
def model_info(info: Any) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (np.generic,)):
            return value.item()
        return value

    return {key: plain(getattr(info, key, None))
            for key in ("name", "version", "versions", "kind", "latent_dim", "image_shape", "metrics")}


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
    images = payload.get("images")
    shape = tuple(payload.get("shape") or ())
    if shape not in IMAGE_SHAPES:
        raise BadRequest(f"'shape' must be one of {[list(s) for s in IMAGE_SHAPES]}, got {list(shape)}")
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
    try:
        latents = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise BadRequest("'latents' must be a list of equal-length lists of numbers") from exc
    if latents.ndim != 2 or not 1 <= latents.shape[0] <= MAX_LATENTS or latents.shape[1] < 1:
        raise BadRequest(f"'latents' must be N x d with 1 <= N <= {MAX_LATENTS}, got shape {list(latents.shape)}")
    if not np.isfinite(latents).all():
        raise BadRequest("'latents' must be finite numbers (no NaN or Infinity)")
    return latents


def model_name(payload: dict[str, Any]) -> str:
    name = payload.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest("'model' must name a served model, e.g. \"vae\" or \"ae\"")
    return name


def rows(array: Any) -> list[list[float]] | None:
    if array is None:
        return None
    return [[float(v) if math.isfinite(float(v)) else None for v in row] for row in np.asarray(array)]


def error_body(exc: Exception) -> tuple[int, dict[str, Any]]:
    if isinstance(exc, BadRequest):
        return 400, {"error": str(exc)}
    if isinstance(exc, ServiceDown):
        return 503, {"error": str(exc), "service": exc.service}
    if isinstance(exc, RequestRejected):
        status = 404 if exc.code == "NOT_FOUND" else 400
        return status, {"error": exc.message, "service": exc.service, "code": exc.code}
    raise exc


# -- HTTP handlers --------------------------------------------------------------------------------------
async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def status_message(app: web.Application) -> dict[str, Any]:
    links: dict[str, ServiceLink] = app[LINKS]
    return {"op": "status", "services": {name: {"target": link.target, **link.status.as_dict()}
                                         for name, link in links.items()}}


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(status_message(request.app))


async def get_models(request: web.Request) -> web.Response:
    """Each service's models; a service that is down gives an error entry instead of failing the request."""
    out: dict[str, Any] = {}
    for name, link in request.app[LINKS].items():
        try:
            out[name] = {"models": [model_info(m) for m in await link.call("list_models")]}
        except (ServiceDown, RequestRejected) as exc:
            out[name] = {"models": [], "error": str(exc)}
    return web.json_response(out)


async def get_stats(request: web.Request) -> web.Response:
    try:
        stats = await request.app[LINKS]["encoder"].call("latent_stats", model=request.match_info["model"])
    except (ServiceDown, RequestRejected) as exc:
        status, body = error_body(exc)
        return web.json_response(body, status=status)
    return web.json_response(slim_stats(stats))


async def post_encode(request: web.Request) -> web.Response:
    try:
        try:
            payload = await request.json()
        except json.JSONDecodeError as exc:
            raise BadRequest("body must be JSON: {model, shape: [28, 28] | [32, 32], images: [base64]}") from exc
        if not isinstance(payload, dict):
            raise BadRequest("body must be a JSON object")
        images = decode_images(payload)
        result = await request.app[LINKS]["encoder"].call("encode", images, model=model_name(payload))
    except (BadRequest, ServiceDown, RequestRejected) as exc:
        status, body = error_body(exc)
        return web.json_response(body, status=status)
    return web.json_response({"model": getattr(result, "model", None), "version": getattr(result, "version", None),
                              "mean": rows(result.mean), "logvar": rows(getattr(result, "logvar", None))})


# -- WebSocket: decoding and status ---------------------------------------------------------------------
async def decode_reply(app: web.Application, message: dict[str, Any]) -> dict[str, Any]:
    base = {"id": message.get("id"), "channel": message.get("channel")}
    try:
        latents = parse_latents(message.get("latents"))
        images = await app[LINKS]["decoder"].call("decode", latents, model=model_name(message), dtype="uint8")
    except (BadRequest, ServiceDown, RequestRejected) as exc:
        return {"op": "error", **base, **error_body(exc)[1]}
    images = np.asarray(images)
    if images.dtype != np.uint8:  # a client that ignores dtype="uint8" still gives [0, 1] floats
        images = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
    return {"op": "decoded", **base, "model": message.get("model"), "shape": list(images.shape[1:]),
            "images": [base64.b64encode(np.ascontiguousarray(im).tobytes()).decode("ascii") for im in images]}


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=20)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    await ws.send_json(status_message(request.app))

    async def handle(message: dict[str, Any]) -> None:
        reply = await decode_reply(request.app, message)
        if not ws.closed:
            await ws.send_json(reply)

    pending: set[asyncio.Task] = set()
    async for msg in ws:
        if msg.type != WSMsgType.TEXT:
            continue
        try:
            message = json.loads(msg.data)
        except json.JSONDecodeError:
            await ws.send_json({"op": "error", "error": "messages must be JSON"})
            continue
        if not isinstance(message, dict) or message.get("op") != "decode":
            await ws.send_json({"op": "error", "error": "accepted messages: {op: \"decode\", id, channel, model, "
                                                        "latents: [[...]]}"})
            continue
        task = asyncio.create_task(handle(message))
        pending.add(task)
        task.add_done_callback(pending.discard)
    for task in pending:
        task.cancel()
    return ws


async def broadcast_status(app: web.Application) -> None:
    message = status_message(app)
    for ws in list(app[SOCKETS]):
        if not ws.closed:
            try:
                await ws.send_json(message)
            except (ConnectionError, RuntimeError):
                pass


# -- the app --------------------------------------------------------------------------------------------
def create_app(encoder: str, decoder: str, poll_interval: float = POLL_INTERVAL) -> web.Application:
    app = web.Application(client_max_size=8 * 1024 * 1024)

    async def changed() -> None:
        await broadcast_status(app)

    app[LINKS] = {"encoder": ServiceLink("encoder", encoder, changed),
                  "decoder": ServiceLink("decoder", decoder, changed)}
    app[SOCKETS] = weakref.WeakSet()
    app[TASKS] = []

    async def start_watchers(app: web.Application) -> None:
        app[TASKS].extend(asyncio.create_task(link.watch(poll_interval)) for link in app[LINKS].values())

    async def stop(app: web.Application) -> None:
        for task in app[TASKS]:
            task.cancel()
        await asyncio.gather(*app[TASKS], return_exceptions=True)
        for ws in list(app[SOCKETS]):
            await ws.close()
        for link in app[LINKS].values():
            await link.aclose()

    app.on_startup.append(start_watchers)
    app.on_shutdown.append(stop)
    app.router.add_get("/", index)
    app.router.add_get("/api/status", get_status)
    app.router.add_get("/api/models", get_models)
    app.router.add_get("/api/stats/{model}", get_stats)
    app.router.add_post("/api/encode", post_encode)
    app.router.add_get("/ws", websocket)
    app.router.add_static("/static", STATIC, append_version=False)
    return app


def serve(encoder: str, decoder: str, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Runs the UI server until interrupted (also what `aevae up` calls)."""
    app = create_app(encoder, decoder)
    listening = f"aevae ui: http://{host}:{port}/  (encoder {encoder}, decoder {decoder})"
    # aiohttp calls `print` once the socket is bound, so the line never announces a port that failed
    web.run_app(app, host=host, port=port, print=lambda _: print(listening, flush=True), handle_signals=True)
