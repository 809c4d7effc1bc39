"""deploy/'s manifests against the schemas of what reads them, strictly (an unknown field is an error):

- compose.yaml and compose.train.yaml against the Compose Specification's JSON schema (the copy check-jsonschema ships);
- the built-in Kubernetes kinds with kubernetes-validate, strict, for the oldest and the newest Kubernetes
  release we claim (1.27: native gRPC probes are GA there);
- the RayJob and the RayService against KubeRay's CRD schemas (../shared/schemas/kuberay/, see its README),
  made strict the way kubectl's field validation is: every object schema that lists its properties and does
  not preserve unknown fields refuses any other field. Fields guarded by CEL rules (x-kubernetes-validations,
  which no local validator evaluates) must not be used, so nothing is left unchecked silently.

Each validator is also shown a manifest with a misspelt field, and must refuse it.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY = ROOT.parent / "shared" / "schemas" / "kuberay"
K8S_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
CRDS = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}


def k8s_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    yield path, doc


def messages(errors: Iterator[jsonschema.ValidationError]) -> list[str]:
    return sorted(f"{'/'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}" for e in errors)


# ---- compose ---------------------------------------------------------------------------------------------

def compose_validator() -> jsonschema.Validator:
    text = (resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text()
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("name", ["compose.yaml", "compose.train.yaml"])
def test_compose_files_match_the_compose_specification(name: str) -> None:
    validator = compose_validator()
    compose = yaml.safe_load((DEPLOY / name).read_text())  # YAML merge keys resolved, as compose does
    assert messages(validator.iter_errors(compose)) == []
    typo = copy.deepcopy(compose)
    typo["services"]["decoder"]["healthchek"] = {"test": ["CMD", "true"]}
    assert any("healthchek" in m for m in messages(validator.iter_errors(typo)))


# ---- built-in Kubernetes kinds -----------------------------------------------------------------------------

def test_builtin_kinds_validate_strictly_with_kubernetes_validate() -> None:
    checked = []
    for path, doc in k8s_documents():
        if doc["kind"] == "Kustomization":  # kustomize's own file, not an API object (test_deploy checks it)
            continue
        for version in K8S_VERSIONS:
            if doc["kind"] in CRDS:  # custom resources: their metadata here, their spec against KubeRay's CRDs
                meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
                kubernetes_validate.validate(meta, version, strict=True)
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']} on Kubernetes {version}: "
                            f"{'/'.join(map(str, exc.path))}: {exc.message}")
        checked.append(doc["kind"])
    assert sorted(checked) == sorted(["PersistentVolumeClaim", "RayJob", "RayService"]
                                     + ["Deployment", "Service"] * 3 + ["PodDisruptionBudget"] * 2)

    deployment = next(d for _, d in k8s_documents() if d["kind"] == "Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(typo, K8S_VERSIONS[-1], strict=True)


# ---- KubeRay custom resources --------------------------------------------------------------------------------

def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a CRD's openAPIV3Schema in which listed properties are the only ones allowed."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = strict(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        schema["items"] = strict(schema["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(s) for s in schema[key]]
    return schema


def cel_rules(validator, rules, instance, schema):  # noqa: ANN001 - jsonschema's keyword signature
    """A field carrying CEL rules is used: they are not evaluated here, so the manifest must not rely on it."""
    yield jsonschema.ValidationError(
        "this field has CEL rules no local validator evaluates; check them by hand: "
        + "; ".join(rule["message"] for rule in rules))


StrictCRDValidator = jsonschema.validators.extend(jsonschema.Draft7Validator,
                                                  {"x-kubernetes-validations": cel_rules})


def crd_validator(kind: str, api_version: str) -> jsonschema.Validator:
    path = KUBERAY / CRDS[kind]
    if not path.is_file():
        pytest.fail(f"KubeRay's CRD schema {path} is missing (the shared folder beside the checkout)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1-2 MB each
    group, _, version = api_version.partition("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert served["served"] and served["storage"], f"{kind} {version} is not KubeRay's stored version"
    schema = strict(served["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by kubernetes-validate above
    return StrictCRDValidator(schema)


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_kuberay_resources_match_the_crd_schemas_strictly(kind: str) -> None:
    ((path, doc),) = [(p, d) for p, d in k8s_documents() if d["kind"] == kind]
    validator = crd_validator(kind, doc["apiVersion"])
    assert messages(validator.iter_errors(doc)) == [], f"{path.name} against KubeRay's {CRDS[kind]}"

    cluster = "rayClusterSpec" if kind == "RayJob" else "rayClusterConfig"
    typo = copy.deepcopy(doc)
    typo["spec"][cluster]["headGroupSpec"]["rayStartParam"] = {}
    typo["spec"][cluster]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMount"] = []
    found = messages(validator.iter_errors(typo))
    assert any("rayStartParam'" in m for m in found), found
    assert any("'volumeMount'" in m for m in found), found  # deep inside the pod template
