"""The manifest's one schema: round trip, unknown keys kept, every bad key named."""

from __future__ import annotations

import json

import pytest

from aevae.manifest import Manifest, ManifestError

GOOD = {"name": "vae", "version": 3, "kind": "vae", "latent_dim": 4, "image_shape": [32, 32],
        "architecture": {"hidden": [8]}, "files": {"weights.pt": "a" * 64}, "metrics": {"test_bce": 101.5,
        "units": "nats"}, "created": "2026-11-25T00:00:00+00:00", "packages": {"torch": "2.14.1"}}


def test_round_trip_keeps_every_field_and_unknown_keys() -> None:
    data = {**GOOD, "from_the_future": {"x": 1}}
    manifest = Manifest.from_json(data)
    assert (manifest.name, manifest.number, manifest.kind, manifest.latent_dim) == ("vae", 3, "vae", 4)
    assert manifest.image_shape == (32, 32) and manifest.pixels == 1024
    assert manifest.extra == {"from_the_future": {"x": 1}}
    again = Manifest.loads(manifest.dumps())
    assert again == manifest
    assert json.loads(manifest.dumps())["from_the_future"] == {"x": 1}


def test_numeric_metrics_leave_out_text() -> None:
    manifest = Manifest.from_json(GOOD)
    assert manifest.numeric_metrics() == {"test_bce": 101.5}
    assert manifest.metric("test_bce") == 101.5 and manifest.metric("units") is None


@pytest.mark.parametrize("key", Manifest.REQUIRED)
def test_a_missing_required_key_is_named(key: str) -> None:
    data = {k: v for k, v in GOOD.items() if k != key}
    with pytest.raises(ManifestError, match=repr(key)):
        Manifest.from_json(data)


@pytest.mark.parametrize("key, value, message", [
    ("kind", "gan", r"'kind' must be one of \['ae', 'vae'\], got 'gan'"),
    ("latent_dim", 0, r"'latent_dim' must be an integer >= 1, got 0"),
    ("latent_dim", True, r"'latent_dim' must be an integer"),
    ("image_shape", [32], r"'image_shape' must be \[height, width\]"),
    ("image_shape", [32, -1], r"'image_shape' must be \[height, width\]"),
    ("files", {"weights.pt": "short"}, r"'files'.'weights.pt' must be a SHA-256"),
    ("architecture", [], r"'architecture' must be an object, got a list"),
    ("version", -2, r"'version' must be an integer >= 0"),
    ("architecture", {"image_shape": [28, 28]}, r"'image_shape' is \[32, 32\] but 'architecture'.'image_shape' is "
                                                r"\[28, 28\]; they must agree"),
    ("architecture", {"latent_dim": 8}, r"'latent_dim' is 4 but 'architecture'.'latent_dim' is 8"),
    ("architecture", {"kind": "ae"}, r"'kind' is 'vae' but 'architecture'.'kind' is 'ae'"),
])
def test_a_malformed_key_is_named(key: str, value: object, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.from_json({**GOOD, key: value})


def test_not_json_and_not_an_object_are_errors() -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.loads("{")
    with pytest.raises(ManifestError, match="expected a JSON object"):
        Manifest.loads("[1]")


def test_an_architecture_that_agrees_is_accepted_as_written_or_in_memory() -> None:
    agreeing = {"kind": "vae", "latent_dim": 4, "image_shape": [32, 32], "hidden": [8]}
    assert Manifest.from_json({**GOOD, "architecture": agreeing}).architecture == agreeing
    in_memory = {**agreeing, "image_shape": (32, 32)}  # Architecture.to_json() before a JSON round trip
    assert Manifest.from_json({**GOOD, "architecture": in_memory}).image_shape == (32, 32)
