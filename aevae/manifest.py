"""The manifest of a model version (`manifest.json`): its schema, parsing and validation, in one place.

Every reader of a manifest goes through `Manifest`, so that a key is spelled, defaulted and checked once.
Unknown keys are kept and written back (a newer aevae may add some), and a missing or malformed required key
raises `ManifestError` naming the key: the repository then reports the version as broken with that reason.
Standard library only: the client, the repository and the services all read manifests without torch.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

KINDS = ("ae", "vae")
FILE_NAME = "manifest.json"
# A latent width or an image side: what a request's tensor dimension may be (the Open Inference Protocol's
# limit). Past int64, ListModels could not even carry it (protobuf raised, and the whole listing failed).
MAX_DIMENSION = 2**31 - 1


class ManifestError(ValueError):
    """A manifest that cannot describe a usable version; the message names the key."""


def _int(data: Mapping[str, Any], key: str, minimum: int = 1, maximum: int = 2**63 - 1) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ManifestError(f"{FILE_NAME}: {key!r} must be an integer >= {minimum}, got {value!r}")
    if value > maximum:
        raise ManifestError(f"{FILE_NAME}: {key!r} must be at most {maximum}, got {value}")
    return value


def _plain(value: Any) -> Any:
    """A JSON value as loaded: an in-memory tuple compares as the list it is written as."""
    return list(value) if isinstance(value, tuple) else value


def _mapping(data: Mapping[str, Any], key: str, required: bool = False) -> dict[str, Any]:
    if key not in data and not required:
        return {}
    value = data.get(key)
    if not isinstance(value, dict):
        what = "missing" if key not in data else f"a {type(value).__name__}"
        raise ManifestError(f"{FILE_NAME}: {key!r} must be an object, got {what}")
    return dict(value)


@dataclass(frozen=True)
class Manifest:
    """What a version says about itself. `number` is the version's number (the folder's name)."""

    kind: str
    latent_dim: int
    image_shape: tuple[int, int]
    architecture: dict[str, Any]
    # file name -> SHA-256 of its bytes; every file listed here is verified before it is used
    files: dict[str, str] = field(default_factory=dict)
    name: str = ""
    number: int = 0  # 0 until the repository assigns one on write
    training: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    packages: dict[str, str] = field(default_factory=dict)  # "aevae", "torch", "python", ... -> version
    # model runtimes beside the torch weights, e.g. {"onnx": {"max_abs_diff": 1e-6}}
    runtimes: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept as they were

    # The keys a version cannot be served without.
    REQUIRED = ("kind", "latent_dim", "image_shape", "architecture", "files")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Manifest":
        if not isinstance(data, Mapping):
            raise ManifestError(f"{FILE_NAME}: expected a JSON object, got {type(data).__name__}")
        for key in cls.REQUIRED:
            if key not in data:
                raise ManifestError(f"{FILE_NAME} lacks {key!r}")
        kind = data["kind"]
        if kind not in KINDS:
            raise ManifestError(f"{FILE_NAME}: 'kind' must be one of {list(KINDS)}, got {kind!r}")
        shape = data["image_shape"]
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_DIMENSION
                           for s in shape)):
            raise ManifestError(f"{FILE_NAME}: 'image_shape' must be [height, width] of positive integers up "
                                f"to {MAX_DIMENSION}, got {shape!r}")
        latent_dim = _int(data, "latent_dim", maximum=MAX_DIMENSION)
        architecture = _mapping(data, "architecture", required=True)
        # the architecture builds the model: a top level that says otherwise describes another model
        for key, value in (("kind", kind), ("latent_dim", latent_dim), ("image_shape", shape)):
            if key in architecture and _plain(architecture[key]) != _plain(value):
                raise ManifestError(f"{FILE_NAME}: {key!r} is {value!r} but 'architecture'.{key!r} is "
                                    f"{architecture[key]!r}; they must agree")
        files = _mapping(data, "files", required=True)
        for name, digest in files.items():
            if not isinstance(digest, str) or len(digest) != 64:
                raise ManifestError(f"{FILE_NAME}: 'files'.{name!r} must be a SHA-256 hex digest, got {digest!r}")
        number = data.get("version", 0)
        known = {f.name for f in fields(cls)} | {"version"}
        return cls(
            kind=kind,
            latent_dim=latent_dim,
            image_shape=(shape[0], shape[1]),
            architecture=architecture,
            files=files,
            name=str(data.get("name", "")),
            number=_int(data, "version", minimum=0) if number else 0,
            training=_mapping(data, "training"),
            data=_mapping(data, "data"),
            metrics=_mapping(data, "metrics"),
            created=str(data.get("created", "")),
            packages={str(k): str(v) for k, v in _mapping(data, "packages").items()},
            runtimes=_mapping(data, "runtimes"),
            extra={k: v for k, v in data.items() if k not in known},
        )

    @classmethod
    def loads(cls, text: str) -> "Manifest":
        """ManifestError for anything that is no manifest. Beyond what `from_json` checks: JSON nested past
        Python's recursion limit (a RecursionError escaped the repository's scan and failed every call of
        every model), and a lone UTF-16 surrogate escape ("\\udcff"), which json accepts but which is no
        text: a reason or a metric name holding one could not be encoded, and ListModels and the call naming
        the version failed with it (the call hung until its deadline)."""
        try:
            data = json.loads(text)
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{FILE_NAME} is not valid JSON: {exc}") from None
        except RecursionError:
            raise ManifestError(f"{FILE_NAME} is nested too deeply to be read; a manifest is a few levels deep") \
                from None
        except UnicodeEncodeError:
            raise ManifestError(f"{FILE_NAME} holds a lone UTF-16 surrogate escape (such as \\ud800), which is "
                                "not text") from None
        except ValueError as exc:  # e.g. an integer of more than 4,300 digits
            raise ManifestError(f"{FILE_NAME} is not valid JSON: {exc}") from None
        return cls.from_json(data)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(
            name=self.name, version=self.number, kind=self.kind, latent_dim=self.latent_dim,
            image_shape=list(self.image_shape), architecture=self.architecture, files=self.files,
            training=self.training, data=self.data, metrics=self.metrics, created=self.created,
            packages=self.packages, runtimes=self.runtimes,
        )
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, default=json_default) + "\n"

    def with_(self, **changes: Any) -> "Manifest":
        return replace(self, **changes)

    @property
    def pixels(self) -> int:
        return self.image_shape[0] * self.image_shape[1]

    def numeric_metrics(self) -> dict[str, float]:
        """The metrics that are numbers (what ListModels carries). An integer past a float's range is none:
        float() raised OverflowError, and one such metric failed the whole listing."""
        numbers = {k: _float(v) for k, v in self.metrics.items()}
        return {k: v for k, v in numbers.items() if v is not None}

    def metric(self, key: str) -> float | None:
        return _float(self.metrics.get(key))


def _float(value: Any) -> float | None:
    """A metric's value as a float; None for text, booleans and integers too big for a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def json_default(value: Any) -> Any:
    """numpy scalars and arrays, paths: what training code tends to leave in a manifest's free-form parts."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__fspath__"):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
