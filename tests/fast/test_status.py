"""The status every servicer answers an error with (services/status.py): details gRPC can always send."""

from __future__ import annotations

import grpc

from aevae.errors import FailedPrecondition, NotFound
from aevae.services.status import DETAILS_MAX_BYTES, status_of


def test_details_that_are_no_utf8_are_escaped() -> None:
    """A lone surrogate (what Python makes of a file name's undecodable byte) left the call unanswered until
    its deadline: gRPC could not encode the details."""
    code, details = status_of(NotFound("no model '\udcff'"))
    assert code == grpc.StatusCode.NOT_FOUND
    details.encode("utf-8")  # raises UnicodeEncodeError if the surrogate were left in
    assert "\\udcff" in details


def test_long_details_are_cut_under_grpcs_metadata_limit() -> None:
    """Details past gRPC's metadata limit turned the call's status into RESOURCE_EXHAUSTED about metadata."""
    for text in ("x" * 100_000, "é" * 50_000, "no loadable version: " + "\U0001F600" * 10_000):
        code, details = status_of(FailedPrecondition(text))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert len(details.encode("utf-8")) <= DETAILS_MAX_BYTES
        assert details.endswith("...") and text.startswith(details[:-3])


def test_short_details_are_unchanged() -> None:
    text = "unknown model 'vea'; available: ae, vae (versions 1, 2)"
    assert status_of(NotFound(text)) == (grpc.StatusCode.NOT_FOUND, text)
