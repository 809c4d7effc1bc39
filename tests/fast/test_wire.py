"""The wire's conversions: "the newest" is None in Python and 0 only on the wire."""

from __future__ import annotations

import numpy as np
import pytest

from aevae.v1.tensors import WireError, version_from_wire, version_to_wire


def test_newest_is_none_in_python_and_zero_on_the_wire() -> None:
    assert version_from_wire(0) is None and version_to_wire(None) == 0
    assert version_from_wire(7) == 7 and version_to_wire(np.int64(7)) == 7


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2", 2**63])
def test_a_python_version_must_be_none_or_positive(bad: object) -> None:
    with pytest.raises(WireError, match="expected None"):
        version_to_wire(bad)  # type: ignore[arg-type]


def test_a_negative_wire_version_is_refused() -> None:
    with pytest.raises(WireError, match=r"version: expected 0 \(the newest\) or a positive version, got -3"):
        version_from_wire(-3)
