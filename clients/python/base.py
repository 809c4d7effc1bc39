"""The channel, retries, timeouts, health and server limits that both clients share, sync and async."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

import grpc

from aevae.client import health
from aevae.client.core import (Retry, ServerLimits, channel_options, check_settings, check_timeout,
                               deadline_hint, grpc_timeout, unimplemented_hint)
from aevae.client.errors import AevaeError, invalid
from aevae.client.credentials import ChannelSecurity, open_channel
from aevae.client.fanout import AsyncFanOut, Deadline, SyncFanOut, parse_targets
from aevae.client.metadata import Metadata
from aevae.client.results import ModelInfo, model_infos
from aevae.v1 import tensor_pb2


LIMITS_SECONDS = 2.0  # as `aevae serve --refresh-seconds`' default


class _Common:
    SERVICE = ""  # the aevae.v1 service name, "Encoder" or "Decoder"
    AIO = False  # the twin: grpc.aio channels and AsyncFanOut
    FANOUT: Any = SyncFanOut

    def __init__(self, target: str | Sequence[str], timeout: float | None = 30.0, retries: int = 3,
                 backoff: float = 0.1, stream_chunk: int = 4096, metadata: Metadata = (), *,
                 token: str | None = None, token_file: str | None = None, tls: bool | None = None,
                 tls_ca: str | bytes | None = None, tls_cert: str | bytes | None = None,
                 tls_key: str | bytes | None = None, security: ChannelSecurity | None = None):
        """`timeout` (seconds) is one total deadline per call, a streamed one included, retries included
        (None, or over core.MAX_TIMEOUT, about 31 years: no deadline). `retries`: gRPC retries a call that
        fails with UNAVAILABLE (core.service_config).
        `metadata` goes with every call, e.g. [("application", "decoder")] for Ray Serve's gRPC proxy.

        `target`: host:port; several (a list, a comma-separated string, or dns:///name:port for every address
        of a name) make a fan-out client whose big batches run as parallel streams over them (fanout.py).

        TLS and the token (credentials.py): `token`, `token_file`, `tls`, `tls_ca`, `tls_cert`, `tls_key`, or
        the AEVAE_TOKEN, AEVAE_TOKEN_FILE, AEVAE_TLS_CA, AEVAE_TLS_CERT, AEVAE_TLS_KEY variables; or a ready
        `security=ChannelSecurity(...)`. Every replica of a fan-out client gets the same.
        """
        check_timeout(timeout)
        check_settings(retries, backoff, stream_chunk, metadata)
        self._closed = False
        self._loop: Any = None  # the event loop a grpc.aio channel belongs to (None: not known, not checked)
        self.targets = parse_targets(target)  # first: a target of None or a number is refused before it is used
        self._made_from = target if isinstance(target, str) else self.targets  # dns:/// resolved again in a copy
        if security is not None and not isinstance(security, ChannelSecurity):
            raise invalid(f"security: expected a ChannelSecurity, got {security!r:.80}")
        self.security = security = security or ChannelSecurity.resolve(token, token_file, tls, tls_ca, tls_cert,
                                                                       tls_key, target=target)
        self.target = ",".join(self.targets)
        self._fanout: Any = None
        self.timeout = timeout
        self.stream_chunk = stream_chunk
        self._retry = Retry(retries, backoff)
        transport, unimplemented = security.explain(self.target), unimplemented_hint(self.SERVICE, self.target)
        late = self._retry.late = deadline_hint(self.target)
        self._retry.explain = lambda error: late(unimplemented(transport(error)))
        self._limits: ServerLimits | None = None
        self._limits_at = 0.0  # time.monotonic() of the ListModels response they came from
        self._options: dict[str, Any] = dict(timeout=timeout, retries=retries, backoff=backoff,
                                             stream_chunk=stream_chunk, metadata=metadata, security=security)
        if len(self.targets) > 1:  # each replica: this constructor, one target, these options
            options = {**self._options, "retries": 0}
            self._fanout = self.FANOUT(lambda t: type(self)(t, **options), self.targets, self._retry)
            return
        try:
            self._raw_channel, self._channel = open_channel(self.target, channel_options(retries, backoff),
                                                            security, metadata, aio=self.AIO)
        except RuntimeError as exc:  # grpc.aio outside a running loop, in a thread whose loop was unset
            raise AevaeError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"{type(self).__name__} needs an event loop ({exc}): make it inside the coroutine "
                             f"that uses it (`async with {type(self).__name__}(...) as client:`), or use the "
                             "synchronous client outside asyncio") from None
        self._stub: Any = self._make_stub(self._channel)
        if self.AIO:  # grpc.aio binds a channel to the loop running when it is made (none: the thread's default)
            self._loop = getattr(self._channel, "_loop", None)

    def _make_stub(self, channel: Any) -> Any:
        raise NotImplementedError

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (for a process pool, Ray or joblib) and copied as what makes it: the targets and the settings,
        security included (the token and the PEM files' paths or bytes travel with it). The copy opens its own
        channel where it is unpickled; a channel, its threads and its loop cannot travel."""
        return _rebuilt, (type(self), self._made_from, self._options)

    @property
    def replicas(self) -> list[Any]:
        """The single-target clients this one spreads its calls over, one per target with the same options (a
        fan-out client's), or itself: for asking every replica, e.g. whether they all serve a model alike."""
        return list(self._fanout.replicas) if self._fanout is not None else [self]

    def _deadline(self, timeout: float | None) -> float | None:
        """One total deadline for the call, however many messages it streams: `timeout`, or the client's for
        None; longer than core.MAX_TIMEOUT is none (gRPC's deadline would overflow and expire at once). Every
        call asks for it before it touches the channel, so it is where a closed client is refused."""
        self._check_open()
        check_timeout(timeout)
        return grpc_timeout(self.timeout if timeout is None else timeout)

    def _fanned(self, timeout: float | None) -> Deadline:
        """The one deadline of a fan-out call (its replicas' calls get what is left of it)."""
        return Deadline(self._deadline(timeout))

    def _left(self, timeout: float | None, started: float) -> float | None:
        """The call's deadline (`_deadline`) less what it spent since `started` (asking for the limits)."""
        deadline = self._deadline(timeout)
        return None if deadline is None else max(0.0, deadline - (time.monotonic() - started))

    def _stale(self) -> bool:
        """The server's limits and shapes are asked for again after LIMITS_SECONDS: a new version (the
        newest, with shapes of its own) is seen within about the server's own refresh."""
        return self._limits is None or time.monotonic() - self._limits_at > LIMITS_SECONDS

    def _check_open(self) -> None:
        """A call on a closed client is an error of its own: gRPC would raise ValueError, or with a token (an
        intercepted channel) crash the process."""
        if self._closed:
            raise AevaeError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"this {type(self).__name__} for {self.target} is closed; make a new one")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"


def _rebuilt(cls: type[_Common], target: str | list[str], options: dict[str, Any]) -> _Common:
    return cls(target, **options)


class SyncClient(_Common):
    def _list_models_response(self, timeout: float | None) -> tensor_pb2.ListModelsResponse:
        response = self._retry(lambda: self._stub.ListModels(tensor_pb2.ListModelsRequest(),
                                                             timeout=self._deadline(timeout)))
        self._limits, self._limits_at = ServerLimits.from_response(response), time.monotonic()
        return response

    def _server_limits(self, fresh: bool = False, timeout: float | None = None) -> ServerLimits:
        """The server's limits and shapes, asked for again when stale, within the call's `timeout`."""
        if fresh or self._stale():
            self._list_models_response(timeout)
        assert self._limits is not None
        return self._limits

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server serves: its newest version, all versions, kind, shapes, test metrics, the
        runtime and its broken versions (results.ModelInfo)."""
        if self._fanout is not None:
            return self._fanout.first(lambda client, t: client.list_models(timeout=t), self._fanned(timeout))
        return model_infos(self._list_models_response(timeout))

    def health(self, *, timeout: float | None = None) -> str:
        """"SERVING" or "NOT_SERVING"; AevaeError (UNAVAILABLE) when the server cannot be reached.

        Over several replicas: "SERVING" when any replica serves."""
        if self._fanout is not None:
            return self._fanout.health(lambda client, t: client.health(timeout=t), self._fanned(timeout))
        return self._retry(lambda: health.check(self._channel, self._deadline(timeout), self.SERVICE), retries=0)

    def serves(self, *, timeout: float | None = 5.0) -> bool | None:
        """Whether the server at this (single) target serves this client's service: False for another one (the
        encoder's address given to a DecoderClient), None when it cannot tell (see health.serves)."""
        return health.serves(self._channel, timeout, self.SERVICE)

    def close(self) -> None:
        """Closes the channel(s); later calls raise AevaeError (FAILED_PRECONDITION). Closing twice is fine."""
        self._closed = True
        if self._fanout is not None:
            return self._fanout.close()
        self._raw_channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class AsyncClient(_Common):
    AIO = True
    FANOUT = AsyncFanOut

    def _check_open(self) -> None:
        """Also refuses a call from another event loop than the one the client was made in: a grpc.aio channel
        belongs to the loop that made it (outside any loop: none that will run), and a call from another
        failed with asyncio's RuntimeError "got Future ... attached to a different loop", naming neither."""
        super()._check_open()
        if self._loop is not None and self._loop is not _running_loop():
            raise AevaeError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"this {type(self).__name__} for {self.target} was made in another event loop than "
                             "the one running this call (one made outside a coroutine belongs to none that "
                             "asyncio.run starts); a grpc.aio channel works only in its own loop: make the client "
                             f"inside the coroutine that uses it (`async with {type(self).__name__}(...) as "
                             "client:`), or use the synchronous client outside asyncio")

    async def _list_models_response(self, timeout: float | None) -> tensor_pb2.ListModelsResponse:
        response = await self._retry.run_async(
            lambda: self._stub.ListModels(tensor_pb2.ListModelsRequest(), timeout=self._deadline(timeout)))
        self._limits, self._limits_at = ServerLimits.from_response(response), time.monotonic()
        return response

    async def _server_limits(self, fresh: bool = False, timeout: float | None = None) -> ServerLimits:
        if fresh or self._stale():
            await self._list_models_response(timeout)
        assert self._limits is not None
        return self._limits

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """As the synchronous client's list_models."""
        if self._fanout is not None:
            return await self._fanout.first(lambda client, t: client.list_models(timeout=t), self._fanned(timeout))
        return model_infos(await self._list_models_response(timeout))

    async def health(self, *, timeout: float | None = None) -> str:
        """As the synchronous client's health."""
        if self._fanout is not None:
            return await self._fanout.health(lambda client, t: client.health(timeout=t), self._fanned(timeout))
        return await self._retry.run_async(
            lambda: health.check_async(self._channel, self._deadline(timeout), self.SERVICE), retries=0)

    async def close(self) -> None:
        """Closes the channel(s); later calls raise AevaeError (FAILED_PRECONDITION). Closing twice is fine."""
        self._closed = True
        if self._fanout is not None:
            return await self._fanout.close()
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
