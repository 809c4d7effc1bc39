"""The UI's service links without a network: closing never hangs the UI's shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from aevae.ui import services
from aevae.ui.services import ServiceLink


class _StuckClient:
    """A client whose close never returns, as a channel whose gRPC poller is stuck (grpc/grpc#40989)."""

    closed = False

    async def close(self) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            self.closed = True  # cancelled by the timeout, not left running


def test_a_client_whose_close_hangs_does_not_hang_aclose(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(services, "CLOSE_TIMEOUT", 0.2)
    link = ServiceLink("decoder", "127.0.0.1:1", _StuckClient)  # type: ignore[type-var]
    stuck = _StuckClient()
    link._client = stuck  # type: ignore[assignment]

    started = time.monotonic()
    asyncio.run(asyncio.wait_for(link.aclose(), 10))
    assert time.monotonic() - started < 5
    assert stuck.closed and link._client is None
    assert "closing the decoder client took over" in caplog.text
