"""The repository's listing (ListModels; the Open Inference Protocol's RepositoryIndex shares the fitting) within
the largest message the server may send: services/listing.py."""

from __future__ import annotations

import pytest

from aevae.errors import ResourceExhausted
from aevae.services.listing import fitted, models_response
from aevae.services.settings import Limits
from aevae.store import LISTED_BROKEN, ModelSummary

SMALLEST = 64 * 1024  # the least --max-message-bytes takes


def _summaries(models: int, broken: int) -> list[ModelSummary]:
    return [ModelSummary(name=f"m{i:04d}", number=broken + 1, numbers=[broken + 1], kind="vae", latent_dim=4,
                         image_shape=(32, 32), metrics={"test_loss": 116.6},
                         broken={n: "manifest.json lists " + "x" * 280 for n in range(1, broken + 1)},
                         runtime="onnx")
            for i in range(models)]


def _listing(summaries: list[ModelSummary], limit: int) -> object:
    limits = Limits(max_message_bytes=limit, max_batch=65536)
    return fitted(lambda reasons: models_response(summaries, limits, reasons), len(summaries), limit)


def test_a_listing_that_fits_keeps_the_reasons() -> None:
    answer = _listing(_summaries(3, 2), SMALLEST)
    assert [b.reason for b in answer.models[0].broken] == ["manifest.json lists " + "x" * 280] * 2  # type: ignore[attr-defined]


def test_broken_versions_past_the_limit_are_listed_without_their_reasons() -> None:
    """300 models with 3 broken versions each: 280 kB with the reasons, which failed ListModels (and so every
    call of the Python client) at --max-message-bytes 65536 with gRPC's "Sent message larger than max"."""
    summaries = _summaries(300, 3)
    assert models_response(summaries, Limits(max_message_bytes=SMALLEST, max_batch=1)).ByteSize() > SMALLEST
    answer = _listing(summaries, SMALLEST)
    assert answer.ByteSize() <= SMALLEST  # type: ignore[attr-defined]
    assert len(answer.models) == 300  # type: ignore[attr-defined]
    first = answer.models[0]  # type: ignore[attr-defined]
    assert [(b.version, b.reason) for b in first.broken] == [(1, ""), (2, ""), (3, "")]
    assert first.broken_count == 3 and first.version == 4


def test_a_listing_that_cannot_fit_names_the_setting() -> None:
    summaries = _summaries(2000, 0)
    with pytest.raises(ResourceExhausted, match=r"the listing of 2000 models takes \d+ bytes, over this server's "
                                                r"--max-message-bytes of 65536: start it with a larger one"):
        _listing(summaries, SMALLEST)
    assert len(_listing(summaries, 4 * SMALLEST).models) == 2000  # type: ignore[attr-defined]


def test_at_most_the_newest_broken_versions_are_listed() -> None:
    answer = _listing(_summaries(1, LISTED_BROKEN + 5), SMALLEST)
    first = answer.models[0]  # type: ignore[attr-defined]
    assert [b.version for b in first.broken] == list(range(6, LISTED_BROKEN + 6))
    assert first.broken_count == LISTED_BROKEN + 5
