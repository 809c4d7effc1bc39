"""What the sync and async clients share: input preparation, splitting into messages, and the retry policy.

Splitting follows the server's limits (from its ListModels response, fetched once per client), so a batch of
any size travels as messages that each fit, in order.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import grpc
import numpy as np

from aevae.client.errors import AevaeError, bad_answer, invalid
from aevae.finite import nonfinite, past_float32
from aevae.v1 import tensor_pb2
from aevae.v1.tensors import WireError, version_to_wire

T = TypeVar("T")

# The server enforces its own limits; the client accepts whatever the server sends. Each client keeps its own
# connection (a local subchannel pool): in gRPC's process-wide pool every channel to one address shares one,
# and with it the reconnect backoff of a server that went away (1 s growing 1.6x per attempt), so a new
# client, such as the UI's health probe, waited out the old one's backoff: measured, the UI saw an encoder
# restarted after 10 s of downtime 4.0 s after it was serving (2.0 s after 3 s), 0.01-0.04 s with this.
#
# A server gone for a while is reconnected to at least every 2 s (gRPC's backoff grows 1.6x per attempt up to
# 120 s by default): measured, a client that had called through a 20 s outage kept failing for 5.2 s after the
# server was back (7 calls), one through 60 s for 6.4 s. And a call pings its connection every 20 s (no
# pings without calls): a server that stopped answering without closing it (SIGSTOP, a host gone) is found
# 10 s later and the call fails over or resumes, where it waited for its deadline, or for ever without one.
# aevae's servers accept pings that often (services.security.connection_options).
KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS = 20_000, 10_000
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                   ("grpc.use_local_subchannel_pool", 1), ("grpc.max_reconnect_backoff_ms", 2000),
                   ("grpc.keepalive_time_ms", KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                   ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 0)]
HEADROOM = 4096  # bytes per message kept for the fields around the tensor
# Timeouts longer than this (about 31.7 years) are no deadline at all. gRPC holds a deadline as int64
# nanoseconds since the epoch: a timeout of about 9e9 s or more overflows it and the call failed at once with
# DEADLINE_EXCEEDED, so `timeout=1e300` ("wait as long as it takes") did the opposite of what it says.
MAX_TIMEOUT = 1e9


@dataclass(frozen=True)
class ServerLimits:
    """What the server accepts per message, and the image shape of each model it serves (from ListModels):
    the client splits batches by them and assumes no shape of its own."""

    max_message_bytes: int
    max_batch: int
    image_shapes: dict[str, tuple[int, ...]]
    latent_dims: dict[str, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)  # the version whose shapes are listed: the default

    @classmethod
    def from_response(cls, response: tensor_pb2.ListModelsResponse) -> "ServerLimits":
        limits = response.limits
        return cls(int(limits.max_message_bytes) or 4 * 1024 * 1024, int(limits.max_batch) or 1 << 30,
                   {m.name: tuple(int(s) for s in m.image_shape) for m in response.models},
                   {m.name: int(m.latent_dim) for m in response.models},
                   {m.name: int(m.version) for m in response.models})

    def listed(self, model: str, version: int | None) -> tuple[int, tuple[int, ...]] | None:
        """(latent_dim, image_shape) when ListModels lists them for this version of `model` (the newest, or
        the number it names); None for another version, whose shapes may differ."""
        listed = self.versions.get(model)
        if not listed or (version and version != listed) or not self.latent_dims.get(model):
            return None
        return self.latent_dims[model], self.image_shapes.get(model, ())

    def latent_dim(self, model: str) -> int:
        """Latent dimensions of `model`; for a model the server does not list, the most it serves."""
        return self.latent_dims.get(model) or max(self.latent_dims.values(), default=1)

    def pixels(self, model: str) -> int:
        """Pixels per image of `model`; for a model the server does not list, the largest it serves (the
        call will get NOT_FOUND anyway)."""
        shape = self.image_shapes.get(model)
        if shape is None:
            return max((math.prod(s) for s in self.image_shapes.values()), default=1)
        return math.prod(shape)

    def rows(self, bytes_per_row: int, cap: int | None = None) -> int:
        """How many rows one message can hold, given the bigger of a request's and a response's row."""
        fit = max(1, min(self.max_batch, (self.max_message_bytes - HEADROOM) // max(1, bytes_per_row)))
        return fit if cap is None else max(1, min(fit, cap))


def _array(values: object, name: str, shape: str) -> np.ndarray:
    """An array of the caller's values; a ragged list or an object that is not numbers is INVALID_ARGUMENT.
    A masked array with masked values is refused (np.asarray would send the values under the mask)."""
    if np.ma.is_masked(values):
        raise invalid(f"{name}: got a masked array with masked values; fill them (values.filled(...)) or drop "
                      "those rows first: the values under a mask would be sent as they are")
    try:
        return np.asarray(values)
    except (ValueError, TypeError, RuntimeError) as exc:  # RuntimeError: torch's tensor that requires grad
        raise invalid(f"{name}: expected {shape} numbers (float32; other float and integer types are converted), "
                      f"got what numpy cannot make an array of ({exc})") from None


def _no_object(array: np.ndarray, name: str, wanted: str) -> None:
    """Strings, booleans, complex and objects carry no pixels or latents; objects are most often a frame's
    nullable columns (pandas' Float32 with missing values) or mixed types, said so."""
    if array.dtype.kind == "O":
        raise invalid(f"{name}: expected {wanted}, got Python objects (a pandas frame with nullable columns or "
                      "missing values, or mixed types): pass a float array, e.g. frame.to_numpy('float32')")
    if array.dtype.kind not in "fiu":
        raise invalid(f"{name}: expected {wanted}, got {array.dtype.name}")


def _as_float32(array: np.ndarray, name: str) -> np.ndarray:
    """Native float32 from any float or integer array; a value beyond float32's range (float64's 1e39) is
    refused naming its place, where the cast would have made it inf (and numpy warned of the overflow)."""
    if array.dtype == np.float32:
        return array
    where = past_float32(array)
    if where is not None:
        raise invalid(f"{name}: {array[tuple(where)].item()!r} at index {where} is beyond float32's range "
                      f"(+-{np.finfo(np.float32).max:.4g}): values travel as float32")
    return array.astype(np.float32)


def _finite(array: np.ndarray, name: str) -> np.ndarray:
    """Checked here, as the server would, so that the index named is the caller's: a batch split into messages
    was refused by the server with the position within one message ("message 6: ... index [424, 1]")."""
    refusal = nonfinite(array, name) if array.dtype.kind == "f" else None
    if refusal is not None:
        raise invalid(refusal)
    return array


def prepare_images(images: object) -> np.ndarray:
    """N x H x W (or one H x W image), uint8 or float32; other floats (float64, float16, big-endian) become
    native float32, and whole numbers within 0..255 (a list of Python ints is int64) uint8, which they fit
    exactly. The server checks the rest."""
    array = _array(images, "images", "an N x H x W array of")
    if array.ndim == 0:  # a number or a string: the server's "shape []" would not say what was passed
        raise invalid(f"images: expected an N x H x W array (or one H x W image) of uint8 0..255 or float32 in "
                      f"[0, 1], got a single {array.dtype.name} value")
    _no_object(array, "images", "pixels as uint8 0..255 or float32 in [0, 1]")
    if array.ndim == 1 or array.ndim > 3:  # as for latents: the server refuses them, whatever the size
        raise invalid(f"images: expected an N x H x W array (or one H x W image), got shape {list(array.shape)}")
    if array.ndim == 2:
        array = array[None]
    if array.dtype.kind == "f":
        array = _finite(_as_float32(array, "images"), "images")
    elif array.dtype.kind in "iu" and array.dtype != np.uint8:
        if array.size and not (array.min() >= 0 and array.max() <= 255):
            raise invalid(f"images: whole-number pixels must lie in 0..255 (uint8), got {array.dtype.name} values "
                          f"in [{array.min()}, {array.max()}]; float pixels go in [0, 1]")
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array)


def prepare_latents(latents: object) -> np.ndarray:
    """N x d float32 (or one d-vector); other real numbers are converted. The server checks the rest."""
    array = _array(latents, "latents", "an N x d array of")
    if array.ndim == 0:  # a number or a string: the server would read it as one row of one value
        raise invalid(f"latents: expected an N x d array (or one d-vector) of numbers, got a single "
                      f"{array.dtype.name} value")
    if array.ndim == 1 and array.size == 0:  # [] would be one row of no values: say so rather than "rows of 0"
        raise invalid("latents: got an empty vector; expected N x d numbers (no rows: an array of shape (0, d))")
    _no_object(array, "latents", "real numbers (float32; other float and integer types are converted)")
    if array.ndim > 2:  # the server refuses them too, but one too big for a message heard "split the batch"
        raise invalid(f"latents: expected an N x d array (or one d-vector), got shape {list(array.shape)}")
    if array.ndim == 1:
        array = array[None]
    return np.ascontiguousarray(_finite(_as_float32(array, "latents"), "latents"))


def model_name(model: object) -> str:
    """The model argument, checked: a name (a string), as ListModels lists them."""
    if not isinstance(model, str):
        raise invalid(f"model: expected a model name (a string such as 'vae'), got {model!r}")
    try:
        model.encode()
    except UnicodeEncodeError:  # a lone surrogate: protobuf raised it from deep inside the request's making
        raise invalid(f"model: a model name is text that UTF-8 can encode, got {model[:64]!r}") from None
    return model


def check_settings(retries: object, backoff: object, stream_chunk: object, metadata: object) -> None:
    """A client's settings, checked when it is made: a negative or string `retries` failed later in the
    service config's arithmetic (TypeError), `stream_chunk=0` sent one row per message (a big batch then ran
    past its deadline), and metadata that is not (key, value) pairs of strings failed every call as INTERNAL
    "Invalid metadata" (or as ValueError) with gRPC's log line."""
    if isinstance(retries, bool) or not isinstance(retries, (int, np.integer)) or retries < 0:
        raise invalid(f"retries: expected a whole number from 0 up, got {retries!r}")
    if (isinstance(backoff, bool) or not isinstance(backoff, (int, float, np.number))
            or not 0 <= backoff < math.inf):
        raise invalid(f"backoff: expected seconds (a finite number from 0 up), got {backoff!r}")
    if isinstance(stream_chunk, bool) or not isinstance(stream_chunk, (int, np.integer)) or stream_chunk < 1:
        raise invalid(f"stream_chunk: expected rows per streamed message (a whole number from 1 up), got "
                      f"{stream_chunk!r}")
    wanted = "metadata: expected (key, value) pairs of strings, e.g. [(\"application\", \"decoder\")]"
    if isinstance(metadata, (str, bytes)):
        raise invalid(f"{wanted}, got {metadata!r}")
    try:
        pairs = list(metadata)  # type: ignore[call-overload]
    except TypeError:
        raise invalid(f"{wanted}, got {metadata!r}") from None
    for pair in pairs:
        if not (isinstance(pair, tuple | list) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], str | bytes)):
            raise invalid(f"{wanted}, got {pair!r}")
        key, value = pair
        if not key or any(ch not in _METADATA_KEY for ch in key):
            raise invalid(f"metadata: key {key!r} is not a valid gRPC metadata key: lowercase letters, digits, "
                          "'-', '_' and '.' only")
        binary = key.endswith("-bin")  # gRPC's binary values: bytes, sent base64-encoded
        if not binary and (isinstance(value, bytes) or any(not " " <= ch <= "~" for ch in value)):
            raise invalid(f"metadata: the value of {key!r} must be printable ASCII text (bytes go under a key "
                          "ending in '-bin')")


_METADATA_KEY = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def check_timeout(timeout: object) -> None:
    """A timeout argument: seconds (a number from 0 up) or None."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.number))
                                or not timeout >= 0):
        raise invalid(f"timeout: expected seconds (a number from 0 up) or None, got {timeout!r}")


def output_dtype(dtype: object) -> np.dtype:
    """float32 or uint8, however numpy spells them ('float32', 'f4', '<f4', np.uint8, np.dtype('u1'), ...)."""
    try:
        parsed = np.dtype(dtype) if isinstance(dtype, (str, type, np.dtype)) and dtype != "" else None
    except TypeError:
        parsed = None
    if parsed is None or parsed.name not in ("float32", "uint8") or not parsed.isnative:
        raise invalid(f"dtype: expected 'float32' or 'uint8', got {dtype!r}")
    return np.dtype(parsed.name)


def grpc_timeout(timeout: float | None) -> float | None:
    """A call's timeout as gRPC can take it: None (no deadline) for None and for anything over MAX_TIMEOUT."""
    # float() first: numpy's float16 overflows comparing with MAX_TIMEOUT (a RuntimeWarning)
    return None if timeout is None or float(timeout) > MAX_TIMEOUT else float(timeout)


def unimplemented_hint(service: str, target: str) -> Callable[[AevaeError], AevaeError]:
    """Explains UNIMPLEMENTED in the user's terms: gRPC's own "Method not found!" does not say that the address
    serves something else, most often the other aevae service (the encoder on the decoder's port, or the other
    way round)."""
    other = {"Encoder": "decoder", "Decoder": "encoder"}.get(service)

    def explain(error: AevaeError) -> AevaeError:
        if error.code() != grpc.StatusCode.UNIMPLEMENTED or not service:
            return error
        guess = f" (perhaps it is the {other}?)" if other else ""
        return AevaeError(error.code(), f"the server at {target} does not serve aevae.v1.{service}{guess}: "
                                        f"{error.details()}")
    return explain


def deadline_hint(target: str) -> Callable[[AevaeError], AevaeError]:
    """Explains DEADLINE_EXCEEDED: gRPC's "Deadline Exceeded" names neither the server nor the setting."""
    def explain(error: AevaeError) -> AevaeError:
        # only gRPC's own: a server's DEADLINE_EXCEEDED (a stream it ended as idle) says what it means
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED or error.details() != "Deadline Exceeded":
            return error
        return AevaeError(error.code(), f"{error.details()}: {target} did not answer within the call's timeout "
                                        "(timeout= of the call or the client; None waits as long as it takes)")
    return explain


def reading(parse: Callable[[bytes], T]) -> Callable[[bytes], T | AevaeError]:
    """A response deserializer that returns why the bytes cannot be read, for the plan to raise: raised in
    the deserializer, gRPC would report only "Exception deserializing response!"."""
    def read(data: bytes) -> T | AevaeError:
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - any malformed bytes: the reason goes to the caller
            return bad_answer(f"unreadable: {exc}")
    return read


def bulk_stub(channel: Any, stub: Any, service: str, request: Any, parse: Callable[[bytes], Any]) -> Any:
    """`stub` (sync or aio alike) with its two bulk methods, `service` ("Decode" or "Encode") and its
    stream, sending `request` messages and reading responses with `reading(parse)`."""
    read, serialize = reading(parse), request.SerializeToString
    path = f"/aevae.v1.{service}r/{service}"
    setattr(stub, service, channel.unary_unary(path, request_serializer=serialize, response_deserializer=read))
    setattr(stub, f"{service}Stream", channel.stream_stream(f"{path}Stream", request_serializer=serialize,
                                                            response_deserializer=read))
    return stub


def spans(n: int, rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


_MESSAGE = re.compile(r"message (\d+): ")


def located(error: AevaeError, parts: list[tuple[int, int]], first: int, rows: str,
            answered: int = 0) -> AevaeError:
    """A stream's refusal of one message, said of the caller's rows: the server counts the messages of its
    stream (the first being `parts[first]`, the first this attempt sent) and positions within one message, so
    "message 6: ... index [424, 1]" alone depended on the server's limits and the client's `stream_chunk`.
    A stream that broke after `answered` answers and could not be resumed says so (a bare UNAVAILABLE did not
    say the call was half done)."""
    match = _MESSAGE.match(error.details())
    if match is None and answered and broken(error):
        return AevaeError(error.code(), f"{error.details()} (the stream broke after {answered} of {len(parts)} "
                                        "answers and could not be resumed: it waits for the server within the "
                                        "call's timeout, and with none tries once)")
    if match is None or first + int(match[1]) >= len(parts):
        return error
    index = first + int(match[1])
    start, stop = parts[index]
    return AevaeError(error.code(), f"{rows} {start} to {stop - 1} of the batch, sent as message {index} (a "
                                    f"position below counts from {start}): {error.details()[match.end():]}")


def wire_version(version: int | None) -> int:
    """None (the newest) or a positive number -> the request's version field; AevaeError when invalid."""
    try:
        return version_to_wire(version)
    except WireError as exc:
        raise invalid(str(exc)) from None


def service_config(retries: int, backoff: float, max_backoff: float = 2.0) -> str:
    """The channel's service config: gRPC itself retries aevae.v1 calls that fail with UNAVAILABLE, up to
    `retries` times (gRPC caps the attempts at 5), waiting a random time up to backoff x 2^n (at most
    `max_backoff`) before retry n: exponential backoff with full jitter. Health checks are not retried.

    gRPC retries a stream only until its first answer (and while it still holds every message it sent, its
    per-call retry buffer); one that breaks later is resumed by `Retry.resumable`."""
    method: dict[str, object] = {"name": [{"service": "aevae.v1.Encoder"}, {"service": "aevae.v1.Decoder"}]}
    if retries > 0:
        method["retryPolicy"] = {
            "maxAttempts": min(5, retries + 1),
            "initialBackoff": f"{max(backoff, 0.001):.3f}s",
            "maxBackoff": f"{max(max_backoff, backoff, 0.001):.3f}s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"methodConfig": [method]})


def channel_options(retries: int, backoff: float) -> list[tuple[str, object]]:
    return [*CHANNEL_OPTIONS, ("grpc.enable_retries", 1), ("grpc.service_config", service_config(retries, backoff))]


class Unlisted(AevaeError):
    """Latents of another width than ListModels lists for the model version asked for: refused, after the
    client has looked again (a new version may have changed the shapes since it last asked)."""


def broken(error: AevaeError) -> bool:
    """A stream cut by the connection or the server going away: UNAVAILABLE, or the INTERNAL "Internal error
    from Core" that grpc.aio sometimes reports for the same event (a server's own INTERNAL says more)."""
    code, details = error.code(), error.details() or ""
    return code == grpc.StatusCode.UNAVAILABLE or (code == grpc.StatusCode.INTERNAL
                                                   and details.startswith("Internal error from Core"))


# gRPC's per-call retry buffer (grpc.per_rpc_retry_buffer_size's default): a stream whose requests outgrow it is
# no longer retried by gRPC, even before its first answer.
RETRY_BUFFER = 256 * 1024


def restarts_big(request_bytes: int) -> bool:
    """Whether a stream of `request_bytes` (its arrays' bytes; the messages add a little) outgrows gRPC's retry
    buffer, so that the client itself must start it over when it is cut before any answer."""
    return request_bytes > RETRY_BUFFER // 2


def task_cancelled() -> bool:
    """Whether a grpc.aio call's CancelledError is the awaiting task's own cancellation (task.cancel(), a
    timeout, a TaskGroup), which must go on as CancelledError. Otherwise the call's channel was closed under
    it: that cancels its calls, each raising CancelledError into a task nobody cancelled, and a caller
    catching AevaeError (or a TaskGroup, taking it for its own) was misled; that is `closed_under()`, as the sync
    client's closed channel gives AevaeError CANCELLED."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def closed_under() -> AevaeError:
    return AevaeError(grpc.StatusCode.CANCELLED, "the client was closed while this call ran")


class Retry:
    """The retry settings of a client. gRPC retries the calls itself (`channel_options`, the channel's service
    config); calling this runs a call once and surfaces every failure as AevaeError. `retries` and `_delay`
    are also the fan-out's budget for failing over between replicas (fanout.py)."""

    def __init__(self, retries: int, backoff: float, max_backoff: float = 2.0):
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        # turns transport failures (TLS mismatch, missing token) into errors saying what to change
        self.explain: Callable[[AevaeError], AevaeError] = lambda error: error
        # what still applies to a stream that failed after some answers (a deadline), where `explain`'s
        # transport hints would mislead: a server that answered has the right credentials
        self.late: Callable[[AevaeError], AevaeError] = lambda error: error

    def _delay(self, attempt: int) -> float:
        return min(self.max_backoff, self.backoff * 2 ** attempt)

    def __call__(self, call: Callable[[], T], retries: int | None = None) -> T:
        """`retries` is accepted for compatibility; the channel's service config decides."""
        try:
            return call()
        except grpc.RpcError as error:
            raise self.explain(AevaeError.from_rpc(error)) from None

    async def run_async(self, call: Callable[[], Awaitable[T]], retries: int | None = None) -> T:
        try:
            return await call()
        except grpc.RpcError as error:
            raise self.explain(AevaeError.from_rpc(error)) from None
        except asyncio.CancelledError:
            if task_cancelled():
                raise
            raise closed_under() from None

    # A stream that breaks after some answers (the server restarted, a connection dropped) is resumed from the
    # first message not answered: gRPC's own retries stop at a stream's first response, and starting over
    # would throw away the answers already received. Each resumption must have made progress (so the loop
    # ends), within the call's one deadline, and not with retries=0 (a fan-out's replicas: it fails over).
    # One that breaks before any answer is gRPC's to retry while what it sent fits its retry buffer
    # (RETRY_BUFFER); a bigger one (`restart`) starts over here, up to `retries` times: a big call cut before
    # its first answer (its Ray Serve replica killed) failed although the error said it may be retried.
    def _resume(self, error: grpc.RpcError, progressed: bool, answered: bool, restarts: int) -> AevaeError | None:
        """None to resume, or the error to raise (explained as a TLS or token mismatch only if nothing was
        ever answered: a server that answered has the right credentials)."""
        failed = AevaeError.from_rpc(error)
        if broken(failed) and self.retries > 0 and (progressed or (not answered and restarts < self.retries)):
            return None
        return self.late(failed) if answered else self.explain(failed)

    def resumable(self, attempt: Callable[[float | None], T], progress: Callable[[], int],
                  timeout: float | None, answered: Callable[[], bool] | None = None, restart: bool = False,
                  locate: Callable[[AevaeError], AevaeError] = lambda error: error) -> T:
        """`attempt(timeout)` streams the messages not yet answered; `progress()` counts those answered that a
        resumption keeps; `answered()` whether the server answered at all (by default, some progress): a
        stream that cannot resume (a seeded sample's) was called a TLS mismatch when it broke after answers.
        `restart`: its requests overflow gRPC's retry buffer (`restarts_big`), so a cut before any answer is
        started over here. `locate` says the failure of the call in the caller's terms (the plan's `located`)."""
        end = None if timeout is None else time.monotonic() + timeout
        heard = answered or (lambda: progress() > 0)
        restarts = 0 if restart else self.retries  # from the start, nothing answered yet
        while True:
            before = progress()
            try:
                return attempt(None if end is None else max(0.0, end - time.monotonic()))
            except grpc.RpcError as error:
                progressed = progress() > before
                failed = self._resume(error, progressed, heard(), restarts)
                if failed is not None:
                    raise locate(failed) from None
            restarts += not progressed
            time.sleep(self.backoff if progressed else self._delay(restarts))

    async def resumable_async(self, attempt: Callable[[float | None], Awaitable[T]], progress: Callable[[], int],
                              timeout: float | None, answered: Callable[[], bool] | None = None,
                              restart: bool = False,
                              locate: Callable[[AevaeError], AevaeError] = lambda error: error) -> T:
        end = None if timeout is None else time.monotonic() + timeout
        heard = answered or (lambda: progress() > 0)
        restarts = 0 if restart else self.retries
        while True:
            before = progress()
            try:
                return await attempt(None if end is None else max(0.0, end - time.monotonic()))
            except asyncio.CancelledError:
                if task_cancelled():
                    raise
                raise closed_under() from None
            except grpc.RpcError as error:
                progressed = progress() > before
                failed = self._resume(error, progressed, heard(), restarts)
                if failed is not None:
                    raise locate(failed) from None
            restarts += not progressed
            await asyncio.sleep(self.backoff if progressed else self._delay(restarts))
