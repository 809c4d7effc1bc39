"""The per-message limits of a service; light on purpose (the CLI imports it to show the defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from aevae.services.errors import ResourceExhausted


@dataclass(frozen=True)
class Limits:
    """What one request or response may hold; beyond it, RESOURCE_EXHAUSTED with the limit in the message."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_batch: int = 65536

    def check_batch(self, n: int, field: str) -> None:
        if n > self.max_batch:
            raise ResourceExhausted(
                f"{field}: batch of {n} exceeds the maximum batch per request of {self.max_batch}; "
                "split it or use the streaming RPC"
            )

    def check_response(self, n: int, bytes_per_item: int, field: str) -> None:
        size = n * bytes_per_item
        if size > self.max_message_bytes:
            fits = max(1, self.max_message_bytes // bytes_per_item)
            raise ResourceExhausted(
                f"{field}: the response would be {size} bytes, over the max message size of "
                f"{self.max_message_bytes} bytes; send at most {fits} per request or use the streaming RPC"
            )
