"""The container smoke test (`make smoke-containers`): the lean images, run with compose, used for real.

1. builds the encoder, decoder and ui images (deploy/scripts/images.sh; --no-build uses the ones there are)
   and checks that none of them carries torch, that they run as uid 10001 and carry HEALTHCHECK and labels
   (those of this build, not of an earlier one kept by the layer cache);
2. trains a small model repository on the host (--models DIR serves an existing one instead);
3. checks that `podman-compose up` without AEVAE_TOKEN refuses to start, saying how to make one; then
   `podman-compose -f deploy/compose.yaml up -d` with a random AEVAE_TOKEN and that repository mounted
   read-only, on free ports;
4. waits for each service to answer SERVING (grpc.health.v1, polled from the host through aevae.client)
   and then for each container's own HEALTHCHECK to pass;
5. round-trips MNIST test digits through both services with aevae.client and the token (encode, then
   decode), for the VAE and the AE, and checks the answers against the same repository loaded in-process on
   the host; a call without the token, or with a wrong one, must get UNAUTHENTICATED; ONNX Runtime's
   telemetry is off in both services;
6. checks the UI as a browser uses it: the page sends an anonymous visitor to /login, the form logs in with
   the token (a session cookie), then the page, /api/status (both services up) and /api/models (the UI's
   own calls to the services, with the token) answer;
7. SIGTERM to the three containers: each must exit 0 within its stop grace period;
8. prints the image sizes, build times, the time from `compose up` to SERVING and the round trip.

Needs root and podman (apt-get install podman buildah runc debootstrap), podman-compose (the `dev` extra),
and the project's venv for the host side. Exits non-zero on the first failure, with the containers' logs.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"
SERVICES = ("encoder", "decoder", "ui")
GRACE = {"encoder": 15, "decoder": 15, "ui": 10}  # compose.yaml's stop_grace_period
# podman on these machines: runc (crun fails on hybrid cgroups), bounded ulimits (the host's are huge); the
# file operators pass as CONTAINERS_CONF too (docs/deploy.md).
CONTAINERS_CONF = ROOT / "deploy" / "scripts" / "containers.conf"
SMALL_TRAINING = ["--train-limit", "2000", "--epochs", "1", "--batch-size", "128"]


class SmokeFailure(Exception):
    pass


def log(message: str) -> None:
    print(f"smoke: {message}", flush=True)


def run(cmd: list[str], timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise SmokeFailure(f"`{' '.join(cmd)}` exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_root() -> Path:
    path = Path(os.environ.get("AEVAE_DATA_ROOT") or ROOT.parent / "shared" / "datasets")
    if not (path / "MNIST" / "raw").is_dir():
        raise SmokeFailure(f"MNIST not found: set AEVAE_DATA_ROOT to a folder holding MNIST/raw/ (tried {path})")
    return path


def test_digits(root: Path, n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The first n test images (uint8, 28 x 28) and labels, read straight from the IDX files."""
    raw = root / "MNIST" / "raw"
    images = np.fromfile(raw / "t10k-images-idx3-ubyte", dtype=np.uint8, offset=16, count=n * 784)
    labels = np.fromfile(raw / "t10k-labels-idx1-ubyte", dtype=np.uint8, offset=8, count=n)
    return images.reshape(n, 28, 28), labels


# ---- images ------------------------------------------------------------------------------------------------

def build_images(env: dict[str, str]) -> list[str]:
    start = time.monotonic()
    done = run(["bash", str(ROOT / "deploy" / "scripts" / "images.sh"), *SERVICES], timeout=1800, env=env)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    for line in lines:
        log(line)
    log(f"images built in {time.monotonic() - start:.0f} s")
    return lines


def check_images(version: str, env: dict[str, str], built_since: float | None = None) -> dict[str, str]:
    """`built_since`: when this run's build began; the images' org.opencontainers.image.created label must not
    be older (buildah's layer cache once kept the date and revision of the build that filled it)."""
    sizes = {}
    for name in SERVICES:
        image = f"aevae-{name}:{version}"
        (info,) = json.loads(run(["podman", "image", "inspect", image], env=env).stdout)
        config = info["Config"]
        if config.get("User") != "10001:10001":
            raise SmokeFailure(f"{image} runs as {config.get('User')!r}, not 10001:10001")
        if not (info.get("Healthcheck") or config.get("Healthcheck") or {}).get("Test"):  # podman, docker
            raise SmokeFailure(f"{image} has no HEALTHCHECK (built without --format docker?)")
        labels = config.get("Labels") or {}
        for label in ("version", "source", "revision", "created"):
            if f"org.opencontainers.image.{label}" not in labels:
                raise SmokeFailure(f"{image} lacks the label org.opencontainers.image.{label}")
        if labels["org.opencontainers.image.version"] != version:
            raise SmokeFailure(f"{image} is labelled version {labels['org.opencontainers.image.version']}, "
                               f"not pyproject's {version}")
        if built_since is not None:
            created = labels["org.opencontainers.image.created"]
            try:
                stamp = finished_at(created)
            except SmokeFailure:
                stamp = float("-inf")
            if stamp < built_since - 2:  # the label has whole seconds
                raise SmokeFailure(f"{image}, built by this run, is labelled created={created} and revision="
                                   f"{labels['org.opencontainers.image.revision']}: an earlier build's labels, "
                                   "kept by the layer cache")
        probe = run(["podman", "run", "--rm", "--network", "none", "--no-healthcheck", "--entrypoint", "python",
                     image, "-c", "import importlib.util as u; print([m for m in ('torch', 'ray') if u.find_spec(m)])"],
                    env=env)
        if probe.stdout.strip() != "[]":
            raise SmokeFailure(f"{image} carries {probe.stdout.strip()}: the lean images must not")
        sizes[name] = f"{info['Size'] / 1e6:.0f} MB"
    return sizes


# ---- the model repository ----------------------------------------------------------------------------------

def train_small(folder: Path) -> Path:
    models = folder / "models"
    start = time.monotonic()
    run([sys.executable, "-m", "aevae.cli", "train", "--data-root", str(data_root()), "--models-dir", str(models),
         "--storage-path", str(folder / "ray"), *SMALL_TRAINING], timeout=900, cwd=ROOT)
    log(f"trained a small repository ({' '.join(SMALL_TRAINING)}) in {time.monotonic() - start:.0f} s: {models}")
    return models


def readable_by_all(folder: Path) -> None:
    """The containers run as uid 10001: the smoke test's own folder (mkdtemp: 0700) must be readable to it."""
    for dirpath, _, filenames in os.walk(folder):
        Path(dirpath).chmod(0o755)
        for name in filenames:
            (Path(dirpath) / name).chmod(0o644)


# ---- compose -----------------------------------------------------------------------------------------------

class Stack:
    def __init__(self, project: str, env: dict[str, str]):
        self.project, self.env = project, env
        self.compose = [sys.executable, "-m", "podman_compose", "-f", str(COMPOSE), "-p", project]

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return run([*self.compose, *args], timeout=timeout, check=check, env=self.env, cwd=ROOT)

    def container(self, service: str) -> str:
        names = run(["podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={self.project}",
                     "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}"],
                    env=self.env).stdout.split()
        if len(names) != 1:
            raise SmokeFailure(f"expected one container for {service}, found {names}")
        return names[0]

    def inspect(self, service: str) -> dict:
        (info,) = json.loads(run(["podman", "inspect", self.container(service)], env=self.env).stdout)
        return info

    def logs(self) -> str:
        out = []
        for service in SERVICES:
            try:
                done = run(["podman", "logs", self.container(service)], check=False, env=self.env)
                out.append(f"---- {service} ----\n{done.stdout[-4000:]}{done.stderr[-4000:]}")
            except SmokeFailure as exc:
                out.append(f"---- {service}: {exc}")
        return "\n".join(out)


def refused_without_token(stack: Stack) -> str:
    """`compose up` without AEVAE_TOKEN (unset, then empty) must fail before starting anything, saying how to
    make one."""
    for unset in (True, False):
        env = {k: v for k, v in stack.env.items() if k != "AEVAE_TOKEN"} if unset else {**stack.env, "AEVAE_TOKEN": ""}
        done = run([*stack.compose, "up", "-d"], check=False, env=env, cwd=ROOT, timeout=120)
        if done.returncode == 0 or 'export AEVAE_TOKEN="$(openssl rand -hex 32)"' not in done.stderr:
            raise SmokeFailure(f"`compose up` with AEVAE_TOKEN {'unset' if unset else 'empty'} did not refuse "
                               f"clearly (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        left = run(["podman", "ps", "-aq", "--filter", f"label=io.podman.compose.project={stack.project}"],
                   env=stack.env).stdout.split()
        if left:
            raise SmokeFailure(f"`compose up` without AEVAE_TOKEN created containers: {left}")
    message = done.stderr.strip().splitlines()[-1]
    return f"compose up without AEVAE_TOKEN (unset or empty) refuses to start: {message!r}"


def wait_serving(service: str, target: str, t0: float, timeout: float = 120) -> float:
    from aevae.client import DecoderClient, EncoderClient

    client_class = EncoderClient if service == "encoder" else DecoderClient
    deadline = t0 + timeout
    with client_class(target, timeout=2, retries=0) as client:
        while True:
            try:
                if client.health(timeout=1) == "SERVING":
                    return time.monotonic() - t0
            except Exception:  # noqa: BLE001 - not up yet: refused, unavailable, deadline
                pass
            if time.monotonic() > deadline:
                raise SmokeFailure(f"{service} at {target} was not SERVING {timeout:.0f} s after compose up")
            time.sleep(0.05)


def wait_healthcheck(stack: Stack, service: str, timeout: float = 60) -> None:
    """The image's own HEALTHCHECK, run by podman in the container (what compose's ordering relies on)."""
    deadline = time.monotonic() + timeout
    while True:
        done = run(["podman", "healthcheck", "run", stack.container(service)], check=False, env=stack.env)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise SmokeFailure(f"{service}'s HEALTHCHECK kept failing: {done.stdout}{done.stderr}")
        time.sleep(1)


def in_process(models: Path):
    """The same repository loaded on the host (aevae's own loader): what the containers must answer."""
    from aevae.store import ModelStore

    return ModelStore(models).get


def round_trip(encoder: str, decoder: str, models: Path, token: str) -> list[str]:
    from aevae.client import DecoderClient, EncoderClient

    digits, _ = test_digits(data_root())
    x = np.pad(digits.astype(np.float32) / 255, ((0, 0), (2, 2), (2, 2)))  # the models' 32 x 32
    load = in_process(models)
    results = []
    with EncoderClient(encoder, timeout=30, token=token) as enc, DecoderClient(decoder, timeout=30, token=token) as dec:
        for model in ("vae", "ae"):
            z = enc.encode(digits, model=model).mean
            images = dec.decode(z, model=model)
            if z.shape != (len(digits), 4) or images.shape != x.shape or images.dtype != np.float32:
                raise SmokeFailure(f"{model}: latents {z.shape}, images {images.shape} {images.dtype}")
            if not (np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1):
                raise SmokeFailure(f"{model}: decoded images outside [0, 1] or not finite")
            if not np.array_equal(images, dec.decode(z, model=model)):
                raise SmokeFailure(f"{model}: decoding the same latents twice gave different images")
            local = load(model)
            z_host = local.encode(x)[0]
            images_host = local.decode(z)
            dz, dx = float(np.abs(z - z_host).max()), float(np.abs(images - images_host).max())
            mse = float(((images - x) ** 2).mean())
            results.append(f"round trip {model}: {len(x)} MNIST test digits -> {z.shape[1]}-d latents -> "
                           f"32 x 32 images; containers vs the host's in-process model: latents within "
                           f"{dz:.1e}, images within {dx:.1e}; reconstruction MSE {mse:.4f}")
            if dz > 1e-4 or dx > 1e-4:
                raise SmokeFailure("the containers' answers differ from the in-process model: " + results[-1])
    return results


def refusals(encoder: str, decoder: str) -> str:
    """Calls without the token, and with a wrong one: UNAUTHENTICATED from both services."""
    import grpc

    from aevae.client import AevaeError, DecoderClient, EncoderClient

    seen = []
    for name, client_class, target, call in (
            ("encoder", EncoderClient, encoder, lambda c: c.encode(np.zeros((1, 28, 28), np.uint8), model="vae")),
            ("decoder", DecoderClient, decoder, lambda c: c.decode(np.zeros((1, 4), np.float32), model="vae"))):
        for what, token in (("no token", ""), ("a wrong token", secrets.token_hex(32))):
            # token="" sends none (not even ~/.config/aevae/token, which a loopback client would otherwise send)
            with client_class(target, timeout=30, retries=0, token=token) as client:
                try:
                    call(client)
                except AevaeError as exc:
                    if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                        raise SmokeFailure(f"{name} with {what}: {exc.code().name}, not UNAUTHENTICATED: {exc}")
                    seen.append(f"{name} {what}")
                    continue
            raise SmokeFailure(f"{name} answered a call with {what}: compose must require AEVAE_TOKEN")
    return "UNAUTHENTICATED without the token and with a wrong one: " + ", ".join(seen)


def no_telemetry(stack: Stack) -> str:
    """ONNX Runtime's telemetry is off in the services (ORT_DISABLE_TELEMETRY=1 in the images): without it they
    looked up mobile.events.data.microsoft.com to upload events, and warned at every start that the read-only
    root kept them from persisting a device ID."""
    for service in ("encoder", "decoder"):
        info = stack.inspect(service)
        if "ORT_DISABLE_TELEMETRY=1" not in (info["Config"].get("Env") or []):
            raise SmokeFailure(f"{service} runs with ONNX Runtime's telemetry on (no ORT_DISABLE_TELEMETRY=1)")
        done = run(["podman", "logs", stack.container(service)], env=stack.env)
        said = [line for line in (done.stdout + done.stderr).splitlines() if "telemetry" in line.lower()]
        if said:
            raise SmokeFailure(f"{service}'s log speaks of telemetry: {said[0]!r}")
    return "ONNX Runtime telemetry off in both services (ORT_DISABLE_TELEMETRY=1; nothing about it in their logs)"


# compose.yaml's limits: (CPUs, memory in bytes) per service
LIMITS = {"encoder": (2.0, 2 << 30), "decoder": (2.0, 2 << 30), "ui": (1.0, 512 << 20)}


def limits(stack: Stack) -> str:
    """compose.yaml's CPU and memory limits reach the containers (podman-compose passes --cpus and --memory),
    and what each container uses after the round trips, against its limit."""
    used = {}
    for service, (cpus, memory) in LIMITS.items():
        host = stack.inspect(service)["HostConfig"]
        got = (host.get("NanoCpus", 0) / 1e9, host.get("Memory", 0))
        if got != (cpus, memory):
            raise SmokeFailure(f"{service} runs with {got[0]:g} CPUs and {got[1]} bytes of memory, not compose's "
                               f"{cpus:g} and {memory}")
        stats = json.loads(run(["podman", "stats", "--no-stream", "--format", "json", stack.container(service)],
                               env=stack.env).stdout)
        used[service] = stats[0].get("mem_usage", "?").split("/")[0].strip()
    return ("limits applied: encoder and decoder 2 CPUs and 2 GiB, ui 1 CPU and 512 MiB; memory in use: "
            + ", ".join(f"{n} {u}" for n, u in used.items()))


def check_ui(url: str, token: str) -> str:
    """The UI as a browser uses it: anonymous -> /login; the form logs in (a session cookie); then the page and
    the API answer, /api/models through the UI's own (token-carrying) calls to the services."""
    anonymous = urllib.request.build_opener()  # follows redirects, keeps no cookies
    with anonymous.open(url + "/", timeout=10) as response:
        if urllib.parse.urlsplit(response.url).path != "/login" or 'action="/login"' not in response.read().decode():
            raise SmokeFailure(f"the UI's page without a login: {response.url}, not the login form")
    try:
        anonymous.open(url + "/api/models", timeout=10)
        raise SmokeFailure("the UI answered /api/models without a login")
    except urllib.error.HTTPError as exc:
        if exc.code != 401:
            raise SmokeFailure(f"the UI's /api/models without a login: HTTP {exc.code}, not 401") from None
    jar = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    form = urllib.parse.urlencode({"token": token}).encode()
    login = urllib.request.Request(url + "/login", data=form, headers={"Origin": url})  # as a browser posts it
    with browser.open(login, timeout=10) as response:  # 302 to / with the session cookie, then the page
        page = response.read().decode()
        if response.status != 200 or "<html" not in page.lower() or 'action="/login"' in page:
            raise SmokeFailure(f"the UI's page after logging in: HTTP {response.status}, {page[:200]!r}")
    if not any(cookie.name == "aevae_session" for cookie in jar):
        raise SmokeFailure("logging in to the UI set no session cookie")
    deadline = time.monotonic() + 30
    while True:  # the UI polls the services on its own: wait until it has seen both up
        with browser.open(url + "/api/status", timeout=10) as response:
            status = json.loads(response.read())
        states = {name: s.get("state", s.get("up")) for name, s in status.get("services", {}).items()}
        if set(states) == {"encoder", "decoder"} and all(s in (True, "up", "SERVING") for s in states.values()):
            break
        if time.monotonic() > deadline:
            raise SmokeFailure(f"the UI does not see both services up: {status}")
        time.sleep(0.5)
    with browser.open(url + "/api/models", timeout=10) as response:
        listed = json.loads(response.read())
    names = {service: sorted(m["name"] for m in listed.get(service, {}).get("models", []))
             for service in ("encoder", "decoder")}
    if not all({"ae", "vae"} <= set(found) for found in names.values()):
        raise SmokeFailure(f"the UI's /api/models (its calls to the services, with the token): {listed}")
    return (f"UI: anonymous -> /login; logged in with the token (session cookie): page {len(page)} bytes, "
            f"/api/status {json.dumps(states)}, /api/models {json.dumps(names)}")


def finished_at(value: str) -> float:
    """podman's RFC 3339 time with nanoseconds -> seconds since the epoch."""
    from datetime import datetime

    match = re.fullmatch(r"(\S+T[\d:]+)(?:\.(\d+))?(Z|[+-][\d:]+)(?: \w+)?", value.strip().replace(" ", "T", 1)
                         if "T" not in value else value.strip())
    if not match:
        raise SmokeFailure(f"cannot read the time {value!r}")
    stamp, fraction, zone = match.groups()
    zone = "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(f"{stamp}.{(fraction or '0')[:6]:0<6}{zone}").timestamp()


def sigterm_all(stack: Stack) -> list[str]:
    """SIGTERM to all three at once; each must exit 0 within its grace period (compose's stop_grace_period)."""
    containers = {service: stack.container(service) for service in SERVICES}
    sent = time.time()
    # `podman stop`: the image's STOPSIGNAL (SIGTERM) to all three in parallel, SIGKILL only after the grace
    # (exit 137); unlike a bare kill it also keeps `restart: unless-stopped` from starting them again.
    run(["podman", "stop", "--time", str(max(GRACE.values())), *containers.values()],
        timeout=max(GRACE.values()) + 60, env=stack.env)
    lines = []
    for service in SERVICES:
        state = stack.inspect(service)["State"]
        took = finished_at(state["FinishedAt"]) - sent
        lines.append(f"{service} exit {state['ExitCode']} after {took:.1f} s")
        if state["ExitCode"] != 0 or took > GRACE[service]:
            raise SmokeFailure(f"{service} after SIGTERM: exit {state['ExitCode']} after {took:.1f} s "
                               f"(grace {GRACE[service]} s)")
    return [f"SIGTERM to all three: {', '.join(lines)} (grace {GRACE['encoder']} s for the services, "
            f"{GRACE['ui']} s for the UI)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, help="serve (a copy of) this repository instead of training one")
    parser.add_argument("--no-build", action="store_true", help="use the images there are")
    parser.add_argument("--keep", action="store_true", help="leave the stack running (and the temp folder)")
    args = parser.parse_args(argv)
    if shutil.which("podman") is None:
        print("smoke: podman not found: apt-get install podman buildah runc debootstrap (make test does)",
              file=sys.stderr)
        return 1
    version = next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version = "))
    folder = Path(tempfile.mkdtemp(prefix="aevae-smoke-"))
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    summary: list[str] = []
    stack = None
    try:
        built_since = None if args.no_build else time.time()
        summary += build_images(env) if not args.no_build else []
        sizes = check_images(version, env, built_since)
        summary.append("image sizes: " + ", ".join(f"aevae-{n} {s}" for n, s in sizes.items()) + " (no torch)")
        if args.models:  # a copy: the containers need it readable, and the original stays as it is
            models = folder / "models"
            shutil.copytree(args.models, models, ignore=shutil.ignore_patterns(".*"))
        else:
            models = train_small(folder)
        readable_by_all(folder)
        ports = {name: free_port() for name in SERVICES}
        token = secrets.token_hex(32)  # what `export AEVAE_TOKEN="$(openssl rand -hex 32)"` makes
        env.update(AEVAE_MODELS=str(models), AEVAE_TOKEN=token)
        for name in SERVICES:  # the published ports: free ones, so that nothing here clashes
            env[f"AEVAE_{name.upper()}_PORT"] = str(ports[name])
            env[f"AEVAE_{name.upper()}_METRICS_PORT"] = str(free_port())
        stack = Stack(f"aevae-smoke-{os.getpid()}", env)
        summary.append(refused_without_token(stack))
        t0 = time.monotonic()
        stack("up", "-d", timeout=300)
        up_seconds = time.monotonic() - t0
        serving, from_start = {}, {}
        for name in ("encoder", "decoder"):
            serving[name] = wait_serving(name, f"127.0.0.1:{ports[name]}", t0)
            wall = time.time() - (time.monotonic() - t0 - serving[name])  # when SERVING was first seen
            from_start[name] = wall - finished_at(stack.inspect(name)["State"]["StartedAt"])
        summary.append(f"compose up returned in {up_seconds:.1f} s; SERVING after "
                       + ", ".join(f"{n} {s:.1f} s" for n, s in serving.items()) + " from `compose up`, "
                       + ", ".join(f"{n} {s:.1f} s" for n, s in from_start.items()) + " from the container's start")
        for name in SERVICES:
            wait_healthcheck(stack, name)
            info = stack.inspect(name)
            if not info["HostConfig"].get("ReadonlyRootfs"):
                raise SmokeFailure(f"{name} does not run with a read-only root filesystem")
        summary.append("HEALTHCHECK passes in all three containers (read-only root filesystems, uid 10001)")
        encoder, decoder = f"127.0.0.1:{ports['encoder']}", f"127.0.0.1:{ports['decoder']}"
        summary += round_trip(encoder, decoder, models, token)
        summary.append(no_telemetry(stack))
        summary.append(refusals(encoder, decoder))
        summary.append(check_ui(f"http://127.0.0.1:{ports['ui']}", token))
        summary.append(limits(stack))
        if args.keep:
            summary.append(f"left running: project {stack.project}, ports {ports}")
        else:
            summary += sigterm_all(stack)
    except (SmokeFailure, subprocess.TimeoutExpired) as exc:
        print(f"smoke: FAILED: {exc}", file=sys.stderr)
        if stack is not None:
            print(stack.logs(), file=sys.stderr)
        return 1
    finally:
        if stack is not None and not args.keep:
            stack("down", "-v", "-t", "15", timeout=120, check=False)
            left = run(["podman", "ps", "-aq", "--filter", f"label=io.podman.compose.project={stack.project}"],
                       check=False, env=env).stdout.split()
            if left:  # e.g. a container that `restart: unless-stopped` was restarting during `down`
                run(["podman", "rm", "-f", "-t", "5", *left], check=False, env=env)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print("smoke: passed\n" + "\n".join(f"  {line}" for line in summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
