"""deploy/ as an outside operator audited it: what the files assumed and the code (or the tools it drives) did
otherwise. Each test would fail on the files as they were before the audit; none needs a container engine, a
cluster or a Ray cluster.

- ONNX Runtime sizes its default intra-op pool to the machine's cores, not to a CPU limit (a cgroup quota) or
  to Ray's reservation: the Kubernetes services and the Serve replicas give `threads` equal to their CPUs.
- The Kubernetes UI answered 421 to its own Service's name (the DNS-rebinding guard).
- The Kubernetes pods mounted a service-account token that nothing in them uses.
- The `ray` image's default command started a head with the Jobs API, GCS and Ray Client open to anyone.
- docs/deploy.md's list of the Serve `args:` left out one that serve_app accepts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from aevae.cli import parser as aevae_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SERVICES_YAML = DEPLOY / "k8s" / "services.yaml"
RAYSERVICE_YAML = DEPLOY / "k8s" / "rayservice.yaml"
SERVE_CONFIG = DEPLOY / "serve" / "config.yaml"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def deployment(name: str) -> dict[str, Any]:
    (found,) = [d for d in documents(SERVICES_YAML) if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
    return found


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_kubernetes_services_size_the_model_runtime_to_their_cpu_limit() -> None:
    """Without --threads, ONNX Runtime opens every session with a pool as wide as the node's cores: a CPU limit
    (a CFS quota) does not change that, so on a 64-core node each pod ran 64 threads throttled to 2 CPUs."""
    for name in ("aevae-encoder", "aevae-decoder"):
        (container,) = deployment(name)["spec"]["template"]["spec"]["containers"]
        args = aevae_parser().parse_args(container["args"])
        limit = cpus(container["resources"]["limits"]["cpu"])
        assert args.threads is not None, f"{name}: no --threads, so the node's core count"
        assert 1 <= args.threads <= limit, f"{name}: --threads {args.threads} for a limit of {limit} CPUs"


def test_serve_replicas_size_the_model_runtime_to_their_num_cpus() -> None:
    """The same under Ray Serve: Ray sets OMP_NUM_THREADS for a replica, which ONNX Runtime ignores."""
    from aevae.services import serve_app

    rayservice = next(d for d in documents(RAYSERVICE_YAML) if d["kind"] == "RayService")
    for config in (yaml.safe_load(SERVE_CONFIG.read_text()), yaml.safe_load(rayservice["spec"]["serveConfigV2"])):
        for app in config["applications"]:
            (overrides,) = app["deployments"]
            num_cpus = overrides["ray_actor_options"]["num_cpus"]
            threads = serve_app.settings(app["args"]).threads
            assert threads is not None and threads <= num_cpus, f"{app['name']}: threads {threads}, num_cpus {num_cpus}"


def test_the_kubernetes_ui_answers_its_service_name_and_still_refuses_rebinding() -> None:
    """The UI refuses (421) a Host that is no IP address, not localhost and not the pod's own name: a client
    (or a proxy that keeps the Host) reaching http://aevae-ui:8080 got 421 from the manifests as shipped."""
    from aevae.ui.guard import Guard

    (container,) = deployment("aevae-ui")["spec"]["template"]["spec"]["containers"]
    args = aevae_parser().parse_args(container["args"])
    guard = Guard.create(args.host, args.allow_host or (), args.allow_origin or ())
    assert guard.host_allowed("aevae-ui:8080"), "the UI answers 421 to its own Service's name"
    assert guard.host_allowed("10.0.0.7:8080") and guard.host_allowed("localhost:8080")  # probes, port-forward
    assert not guard.host_allowed("rebound.example.net:8080")


def test_kubernetes_pods_mount_no_service_account_token() -> None:
    """Nothing in the encoder, decoder or UI pods calls the Kubernetes API; the token Kubernetes mounts by
    default would only serve whoever compromised the pod."""
    for name in ("aevae-encoder", "aevae-decoder", "aevae-ui"):
        spec = deployment(name)["spec"]["template"]["spec"]
        assert spec.get("automountServiceAccountToken") is False, f"{name} mounts a service-account token"


def test_the_ray_image_refuses_to_start_a_head_without_rays_token(tmp_path: Path) -> None:
    """The `ray` image's CMD is `ray start --head --dashboard-host 0.0.0.0`: with RAY_AUTH_MODE unset (and no
    token file) Ray 2.60 starts without authentication, so `docker run -p 8265:8265 aevae-ray` opened the Jobs
    API to anyone. The image sets RAY_AUTH_MODE=token; then that command, without a token, refuses at once."""
    from test_deploy import dockerfile_stages, exec_form, effective, stage_env

    stages = dockerfile_stages()
    env = stage_env(stages, "ray")
    assert env.get("RAY_AUTH_MODE") == "token", "the ray image starts a head without Ray's token authentication"
    assert stage_env(stages, "trainer").get("RAY_AUTH_MODE") is None  # compose's trainer: its own local Ray
    command = exec_form(effective(stages, "ray", "CMD"))
    assert command[:3] == ["ray", "start", "--head"]
    # That command, as the image runs it (its env, a home without a token), on free ports in a temp folder.
    ray = str(Path(sys.executable).parent / "ray")
    argv = [ray, *command[1:], "--port", "0", "--dashboard-host", "127.0.0.1", "--temp-dir", str(tmp_path / "ray")]
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    run_env.update(env, HOME=str(tmp_path), RAY_AUTH_MODE="token")
    process = subprocess.Popen(argv, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # it started after all: stop the session this test made, and fail
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode != 0, output[-2000:]
    assert "no authentication token was found" in output, output[-2000:]


def test_the_docs_list_every_setting_the_serve_applications_accept() -> None:
    """docs/deploy.md lists the Serve applications' `args:`: exactly those serve_app accepts (ServiceSettings
    without the standalone server's SERVER_ONLY), so an operator reading it neither misses one nor tries one
    that is refused."""
    from aevae.services import serve_app
    from aevae.services.settings import ServiceSettings

    text = (ROOT / "docs" / "deploy.md").read_text()
    paragraph = re.search(r"Application `args` \(in the config, per application\)(.*?)An unknown key", text, re.DOTALL)
    assert paragraph, "docs/deploy.md no longer lists the Serve args"
    listed = set(re.findall(r"`([a-z_]+)`", paragraph.group(1))) - {"aevae", "serve"}
    accepted = {f.name for f in fields(ServiceSettings)} - set(serve_app.SERVER_ONLY)
    assert listed == accepted, f"missing from the docs: {sorted(accepted - listed)}; not accepted: {sorted(listed - accepted)}"


def test_only_the_training_driver_mounts_the_model_repository_writable() -> None:
    """The RayJob's driver (its entrypoint, run on the head) writes the versions (trainer/job.py); the training
    workers only write Ray Train's checkpoints, yet they mounted /models writable. Every serving pod mounts it
    read-only."""
    import inspect

    from aevae.trainer import job, loop

    assert "write_version(" in inspect.getsource(job) and "repository" not in inspect.getsource(loop)
    rayjob = next(d for d in documents(DEPLOY / "k8s" / "rayjob-train.yaml") if d["kind"] == "RayJob")
    rayservice = next(d for d in documents(RAYSERVICE_YAML) if d["kind"] == "RayService")
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    workers = [g["template"]["spec"] for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    serving = [rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"],
               *[g["template"]["spec"] for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]],
               *[deployment(f"aevae-{n}")["spec"]["template"]["spec"] for n in ("encoder", "decoder")]]

    def models_mount(pod: dict[str, Any]) -> dict[str, Any]:
        ((mount,),) = [[m for m in c["volumeMounts"] if m["mountPath"] == "/models"] for c in pod["containers"]]
        return mount

    assert not models_mount(head).get("readOnly"), "the driver writes the versions"
    for pod in workers + serving:
        assert models_mount(pod).get("readOnly") is True, f"{pod['containers'][0]['name']} mounts /models writable"


def _bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return float(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else float(quantity)


def test_every_ray_pod_gives_the_object_store_a_memory_backed_dev_shm() -> None:
    """Ray puts its object store in /dev/shm, which a Kubernetes container gets at 64 MB: below the store's
    size (30 % of the pod's memory) Ray falls back to /tmp on disk, with a warning, for every object. Each Ray
    pod mounts a memory emptyDir there, big enough for the store."""
    rayjob = next(d for d in documents(DEPLOY / "k8s" / "rayjob-train.yaml") if d["kind"] == "RayJob")
    rayservice = next(d for d in documents(RAYSERVICE_YAML) if d["kind"] == "RayService")
    clusters = [rayjob["spec"]["rayClusterSpec"], rayservice["spec"]["rayClusterConfig"]]
    pods = [pod for c in clusters
            for pod in [c["headGroupSpec"]["template"]["spec"], *[g["template"]["spec"] for g in c["workerGroupSpecs"]]]]
    assert len(pods) == 4
    for pod in pods:
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory", container["name"]
        memory = _bytes(container["resources"]["limits"]["memory"])
        assert 0.3 * memory <= _bytes(volume["emptyDir"]["sizeLimit"]) < memory, container["name"]
