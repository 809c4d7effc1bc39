"""The commands' errors: a one-line message naming what was wrong and what is accepted, a non-zero exit, and
nothing started or lost, never a traceback; and what the commands print and document matches what they do.

In-process calls of the CLI's main() (no subprocess); services are small in-process gRPC servers."""

from __future__ import annotations

import argparse
import functools
import os
import re
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from aevae import cli
from aevae.v1 import decoder_pb2, decoder_pb2_grpc, tensor_pb2
from aevae.v1.tensors import to_tensor
from helpers import write_tiny


class _Decoder(decoder_pb2_grpc.DecoderServicer):
    """A decoder that serves `vae` (4-d latent, 32 x 32) and answers black images."""

    def ListModels(self, request: Any, context: Any) -> tensor_pb2.ListModelsResponse:
        model = tensor_pb2.ModelInfo(name="vae", version=1, versions=[1], kind="vae", latent_dim=4,
                                     image_shape=[32, 32])
        return tensor_pb2.ListModelsResponse(models=[model], limits=tensor_pb2.Limits(max_message_bytes=1 << 22,
                                                                                      max_batch=1000))

    def Decode(self, request: Any, context: Any) -> decoder_pb2.DecodeResponse:
        rows = int(request.latents.shape[0])
        dtype = np.uint8 if request.dtype == "uint8" else np.float32
        return decoder_pb2.DecodeResponse(model="vae", version=1, images=to_tensor(np.zeros((rows, 32, 32), dtype)))


def _server(*servicers: Any) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    for servicer in servicers:
        decoder_pb2_grpc.add_DecoderServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


@pytest.fixture
def decoder() -> Iterator[str]:
    yield from _server(_Decoder())


@pytest.fixture
def no_decoder() -> Iterator[str]:
    """A gRPC server without the aevae.v1 Decoder, as the encoder's port is to a decoder client."""
    yield from _server()


@pytest.fixture(autouse=True)
def _no_local_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No token from this machine's ~/.config/aevae or the environment leaks into the tests."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in ("AEVAE_TOKEN", "AEVAE_TOKEN_FILE", "AEVAE_TLS_CA", "AEVAE_TLS_CERT", "AEVAE_TLS_KEY", "AEVAE_TLS"):
        monkeypatch.delenv(name, raising=False)


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Runs the command, which must fail with exit status 2 (from the command or from argparse); its stderr."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# -- 1. tracebacks --------------------------------------------------------------------------------------
def test_an_unknown_log_level_is_refused_naming_the_levels(capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(["--log-level", "bogus", "encode", "x.png"], capsys)
    assert "--log-level" in err and "DEBUG" in err and "CRITICAL" in err
    assert cli.parser().parse_args(["--log-level", "debug", "encode", "x.png"]).log_level == "DEBUG"


def test_decode_refuses_a_png_too_large_for_memory_before_building_it(decoder: str, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "big.png"
    err = _refused(["decode", "0,0,0,0", "-o", str(out), "--decoder", decoder, "--scale", "100000"], capsys)
    assert "--scale 100000" in err and "at most 67,108,864" in err and "--scale at most 256" in err
    assert not out.exists()
    assert cli.main(["decode", "0,0,0,0", "-o", str(out), "--decoder", decoder, "--scale", "2"]) == 0
    assert out.is_file()


def test_report_refuses_an_out_that_is_a_file_or_cannot_be_written(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    a_file = tmp_path / "report.html"
    a_file.write_text("not a folder")
    err = _refused(["report", "--models-dir", str(tmp_path / "none"), "--out", str(a_file)], capsys)
    assert f"--out {a_file} is a file" in err
    unwritable = "/proc/rep" if os.path.isdir("/proc") else str(a_file / "inside")
    err = _refused(["report", "--models-dir", str(tmp_path / "none"), "--out", unwritable], capsys)
    assert f"--out {unwritable}: cannot write the report there" in err


@pytest.mark.parametrize("seed", ["-1", str(2**63)])
def test_report_refuses_a_seed_no_generator_takes(tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: str) -> None:
    """A negative --seed ran until numpy's generator raised, a traceback."""
    err = _refused(["report", "--models-dir", str(tmp_path / "none"), "--out", str(tmp_path / "r"), "--seed", seed],
                   capsys)
    assert f"--seed must be an integer from 0 to {2**63 - 1}, got {seed}" in err


def _without_graphs(root: Path) -> Any:
    """A version written before the trainer wrote ONNX graphs (weights and statistics only): vae-old/1."""
    import torch

    from aevae.repository import STATS, WEIGHTS, ModelRepository, json_writer

    made = write_tiny(root / "scratch")
    state = torch.load(made.file(WEIGHTS), weights_only=True)
    return ModelRepository(root / "models").write(
        "vae-old", made.manifest.with_(runtimes={}),
        {WEIGHTS: functools.partial(torch.save, state), STATS: json_writer(made.latent_stats())})


def test_export_onnx_reports_a_version_with_truncated_weights_as_broken(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    version = _without_graphs(tmp_path)
    weights = version.file("weights.pt")
    weights.write_bytes(weights.read_bytes()[:1000])
    err = _refused(["export-onnx", "--models-dir", str(tmp_path / "models")], capsys)
    assert "vae-old/1: broken: weights.pt does not match the checksum in its manifest" in err
    assert "1 version(s) broken, left as they are: vae-old/1" in err
    assert sorted(p.name for p in version.path.iterdir()) == ["latent_stats.json", "manifest.json", "weights.pt"]


def _nothing_may_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training that gets past its checks fails the test at once, before reading MNIST or starting Ray."""
    from aevae import mnist
    from aevae.trainer import job

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("the run started: it should have been refused before anything started")

    monkeypatch.setattr(mnist, "load", started)
    monkeypatch.setattr(job, "_start_ray", started)


def test_train_refuses_a_bad_name_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray")
    _nothing_may_start(monkeypatch)
    err = _refused(["train", "--models", "vae", "--name", "Bad Name", "--models-dir", str(tmp_path / "m")], capsys)
    assert "--name 'Bad Name' is not a model name" in err and "lowercase letters, digits" in err
    assert not (tmp_path / "m").exists()


def test_train_refuses_a_models_dir_it_cannot_create_before_anything_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Permission bits pass for root, and say nothing of /proc or a read-only mount: only a real write tells."""
    pytest.importorskip("ray")
    _nothing_may_start(monkeypatch)
    blocked = "/proc/aevae" if os.path.isdir("/proc") else str(tmp_path)
    if blocked == str(tmp_path):
        tmp_path.chmod(0o500)
    err = _refused(["train", "--models-dir", blocked], capsys)
    assert f"cannot write model versions under {blocked}" in err and "--models-dir" in err
    from aevae import mnist

    def load(*args: object) -> None:
        raise RuntimeError("got past the check")

    monkeypatch.setattr(mnist, "load", load)
    with pytest.raises(RuntimeError, match="got past the check"):  # a folder that can be made passes ...
        cli.main(["train", "--models-dir", str(tmp_path / "new" / "models")])
    assert not (tmp_path / "new").exists()  # ... and the check leaves nothing behind


# -- 2. the UI's bound port -----------------------------------------------------------------------------
def test_ui_on_port_0_prints_the_port_it_listens_on(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("aiohttp")
    from aevae.ui import server

    seen: dict[str, Any] = {}

    def run_app(app: Any, **kwargs: Any) -> None:  # aiohttp's, once bound: calls print, then returns
        seen["port"] = kwargs["sock"].getsockname()[1] if "sock" in kwargs else kwargs.get("port")
        kwargs["print"]("======== Running on ... ========")
        if "sock" in kwargs:
            kwargs["sock"].close()

    monkeypatch.setattr(server.web, "run_app", run_app)
    assert cli.main(["ui", "--port", "0"]) == 0
    out = capsys.readouterr().out
    assert seen["port"] != 0 and f"http://127.0.0.1:{seen['port']}/" in out


# -- 3. clear messages ----------------------------------------------------------------------------------
def test_decode_at_a_server_without_the_decoder_says_so(no_decoder: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(["decode", "0,0,0,0", "-o", str(tmp_path / "x.png"), "--decoder", no_decoder], capsys)
    assert f"the server at {no_decoder} does not serve aevae.v1.Decoder (perhaps it is the encoder?)" in err


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_version_0_is_the_newest_and_a_number_out_of_range_names_the_range(
        command: str, capsys: pytest.CaptureFixture[str]) -> None:
    def parse(version: str) -> argparse.Namespace:
        rest = ["x.png"] if command == "encode" else ["0,0,0,0", "-o", "x.png"]
        return cli.parser().parse_args([command, "--version", version, *rest])

    assert parse("0").version is None and parse("7").version == 7
    for bad in ("99999999999999999999", "-1", "newest"):
        with pytest.raises(SystemExit):
            parse(bad)
        assert "from 1 to 9,223,372,036,854,775,807 or 0 for the newest" in capsys.readouterr().err


def test_decode_with_version_0_gets_the_newest(decoder: str, tmp_path: Path) -> None:
    assert cli.main(["decode", "0,0,0,0", "-o", str(tmp_path / "x.png"), "--decoder", decoder,
                     "--version", "0"]) == 0


def test_a_huge_timeout_is_no_deadline_rather_than_an_expired_one(decoder: str, tmp_path: Path) -> None:
    from aevae.client import DecoderClient

    with DecoderClient(decoder, timeout=1e300) as client:
        assert client.decode(np.zeros((1, 4)), timeout=1e12).shape == (1, 32, 32)
        assert client.decode(np.zeros((1, 4))).shape == (1, 32, 32)
    assert cli.main(["decode", "0,0,0,0", "-o", str(tmp_path / "x.png"), "--decoder", decoder,
                     "--timeout", "1e300"]) == 0


@pytest.fixture
def ui_not_served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """`aevae ui` gets as far as serving, and records what it would serve with, instead of serving."""
    pytest.importorskip("aiohttp")
    from aevae.ui import server

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(server, "serve", lambda *args, **kwargs: calls.append(kwargs))
    return calls


def test_ui_refuses_a_classifier_file_it_cannot_use(ui_not_served: list[dict[str, Any]], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "classifier.npz"
    for content in (b"not an npz", b"PK\x03\x04 truncated"):
        bad.write_bytes(content)
        err = _refused(["ui", "--classifier", str(bad)], capsys)
        assert f"--classifier: digit classifier not loaded from {bad}" in err
    assert not ui_not_served


def test_ui_names_an_https_file_it_cannot_read(ui_not_served: list[dict[str, Any]], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    err = _refused(["ui", "--https-cert", "/nope", "--https-key", str(key)], capsys)
    assert "--https-cert: cannot read /nope: No such file or directory" in err
    err = _refused(["ui", "--https-cert", str(key), "--https-key", str(key)], capsys)
    assert f"--https-cert {key} and --https-key {key} are not a PEM certificate and its private key" in err


def test_ui_says_where_the_login_token_comes_from_never_the_token(
        ui_not_served: list[dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aevae.client.credentials import local_token_path

    token = local_token_path()
    assert str(token).startswith(str(tmp_path))
    token.parent.mkdir(parents=True)
    token.write_text("s3cret-token-value\n")
    assert cli.main(["ui", "--host", "0.0.0.0"]) == 0 and ui_not_served
    err = capsys.readouterr().err
    assert f"the page needs a login: the services' token, from {token} (written by `aevae up`)" in err
    assert "s3cret" not in err


# -- 4. documentation ---------------------------------------------------------------------------------
def test_train_help_shows_the_defaults_of_train_config(capsys: pytest.CaptureFixture[str]) -> None:
    from aevae.trainer.config import TrainConfig

    defaults = TrainConfig()
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in (f"(default: {defaults.epochs})", f"(default: {defaults.seed})", f"(default: {defaults.latent_dim})",
                  f"(default: {defaults.storage_path}, that is $TMPDIR/aevae-ray)"):
        assert shown in text
    assert (defaults.epochs, defaults.seed, defaults.latent_dim) == (15, 0, 4)  # README, Training
    assert "(default: None)" not in text


def test_serving_docs_cite_test_files_that_exist() -> None:
    import re

    from helpers import ROOT

    text = (ROOT / "docs" / "serving.md").read_text()
    cited = set(re.findall(r"`(tests/[\w/]+\.py)`", text))
    assert "tests/fast/test_proto.py" in cited
    assert [path for path in sorted(cited) if not (ROOT / path).is_file()] == []


# -- 5. training and export-onnx: what fails late fails in one line, and loses or leaves nothing half-done -------
@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_train_refuses_a_seed_its_generators_cannot_take_before_anything_starts(
        seed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """-1 failed in numpy's generator for the latent statistics, after the whole run; 2**64 in the worker."""
    pytest.importorskip("ray")
    _nothing_may_start(monkeypatch)
    err = _refused(["train", "--seed", seed, "--models-dir", str(tmp_path / "m")], capsys)
    assert f"--seed must be an integer from 0 to {2**63 - 1}, got {seed}" in err
    assert not (tmp_path / "m").exists()


def _trained(monkeypatch: pytest.MonkeyPatch, poison: bool = False, start_ray: bool = False) -> None:
    """`aevae train` with a fake run: 300 random images for MNIST, no Ray (unless `start_ray`: the real
    _start_ray, whose ray.init the caller fakes), _fit returning freshly built weights (nan throughout with
    `poison`, as a diverged run leaves them) and their metrics."""
    pytest.importorskip("ray")
    import ray
    import torch

    from aevae import mnist
    from aevae.models import Architecture, build
    from aevae.trainer import job

    rng = np.random.default_rng(0)
    split = mnist.Split(rng.integers(0, 256, (300, 32, 32), dtype=np.uint8), rng.integers(0, 10, 300))
    monkeypatch.setattr(mnist, "load", lambda *args: mnist.Mnist(split, split, "fake", {}))
    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    if not start_ray:
        monkeypatch.setattr(job, "_start_ray", lambda address: None)
    monkeypatch.setattr(ray, "put", lambda value: value)

    def fit(config: Any, archs: dict[str, Architecture], refs: Any, run_name: str) -> tuple[dict, dict]:
        states = {}
        for name, arch in archs.items():
            model = build(arch)
            if poison:
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float("nan"))
            states[name] = model.state_dict()
        loss = float("nan") if poison else 700.0
        figures = {"train_loss": loss, "test_bce": loss, "test_kl": 0.0, "test_loss": loss}
        return states, {**{name: figures for name in archs}, "epoch_seconds": 1.0}

    monkeypatch.setattr(job, "_fit", fit)


def test_train_that_diverged_says_so_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """nan weights failed in the latent statistics' histogram, a traceback at the end of the run."""
    _trained(monkeypatch, poison=True)
    err = _refused(["train", "--models", "vae", "--hidden", "16", "--lr", "100",
                    "--models-dir", str(tmp_path / "m")], capsys)
    assert "training diverged for vae (a loss of nan or inf), nothing written: lower --lr (this run 100" in err
    assert not list((tmp_path / "m").glob("*/[0-9]*"))


def test_train_that_cannot_write_its_version_says_so_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A disk that fills while the run trains: an OSError traceback after the run; now one line naming the
    file, where the run's checkpoint stays, and the version written before; no half version is left."""
    import errno

    from aevae.repository import STATS, ModelRepository
    from aevae.trainer import job

    _trained(monkeypatch)
    writer = job.json_writer

    def json_writer(data: Any) -> Any:
        write = writer(data)

        def full_for_the_second(path: Path) -> None:
            if path.parent.parent.name == "vae":
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            write(path)

        return full_for_the_second

    monkeypatch.setattr(job, "json_writer", json_writer)
    models = tmp_path / "m"
    err = _refused(["train", "--hidden", "16", "--models-dir", str(models), "--storage-path", str(tmp_path / "r")],
                   capsys)
    assert (f"[vae] cannot write its version under {models}: No space left on device ({STATS}); the run's last "
            f"checkpoint stays under --storage-path {tmp_path / 'r'} (`aevae train --resume` with the same options "
            f"continues it); written: ae/1") in err
    assert [v.number for v in ModelRepository(models).versions()["ae"]] == [1]
    assert not (models / "vae").exists()  # no staging folder, no version, no empty folder made for it


def test_the_weights_on_a_full_disk_are_an_os_error_not_torchs_own() -> None:
    """torch.save into the file said "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"."""
    import errno

    import torch

    from aevae.trainer.job import weights_writer

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(OSError) as error:
        weights_writer({"w": torch.zeros(1000)})(Path("/dev/full"))
    assert error.value.errno == errno.ENOSPC


def test_export_onnx_names_a_version_missing_a_file_as_broken_not_absent(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It said "no such model or version: vae-old/1; available: ..." when asked for it, and nothing at all
    when converting every version."""
    pytest.importorskip("onnxruntime")
    version = _without_graphs(tmp_path)
    version.file("latent_stats.json").unlink()
    for argv in (["vae-old/1"], []):
        err = _refused(["export-onnx", "--models-dir", str(tmp_path / "models"), *argv], capsys)
        assert "vae-old/1: broken: no latent_stats.json" in err
        assert "1 version(s) broken, left as they are: vae-old/1" in err


def test_export_onnx_into_a_repository_it_cannot_write_says_so_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A read-only mount (root passes permission bits, so the write is what fails here): an OSError traceback."""
    import errno

    pytest.importorskip("onnxruntime")
    from aevae import onnx_export

    version = _without_graphs(tmp_path)

    def read_only(data: bytes) -> Any:
        def write(path: Path) -> None:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return write

    monkeypatch.setattr(onnx_export, "bytes_writer", read_only)
    err = _refused(["export-onnx", "--models-dir", str(tmp_path / "models")], capsys)
    assert (f"cannot add the graphs to vae-old/1 in {tmp_path / 'models'}: Read-only file system "
            "(encoder.onnx); it is left as it was") in err
    assert sorted(p.name for p in version.path.iterdir()) == ["latent_stats.json", "manifest.json", "weights.pt"]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process listens on (this test, here)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _refused_fd(argv: list[str], capfd: pytest.CaptureFixture[str]) -> str:
    """As _refused, reading the file descriptor: gRPC's core writes its E lines there, not to sys.stderr."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capfd.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "add_port" not in err and "(in use?)" not in err, err
    return err


@pytest.mark.parametrize("args, message", [
    (["--host", "999.1.1.1", "--insecure"], "--host 999.1.1.1 does not resolve"),
    (["--host", "192.0.2.1", "--insecure"], "--host 192.0.2.1 is not an address of this machine"),
    (["--port", "{taken}"], "127.0.0.1:{taken} is in use by another process (another aevae decoder?): stop it, or "
                            "pass another --port"),
    (["--port", "0", "--health-port", "{taken}"], "pass another --health-port"),
    (["--port", "{free}", "--health-port", "{free}"], "--port and --health-port are both {free}: each needs a port "
                                                      "of its own"),
])
def test_serve_says_why_it_cannot_listen_in_one_line(args: list[str], message: str, taken_port: int, tmp_path: Path,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    """It said "cannot listen on X (in use?)" after gRPC's own E line, for every cause."""
    fill = {"taken": taken_port, "free": _free_port()}
    err = _refused_fd(["serve", "decoder", "--models-dir", str(tmp_path), *[a.format(**fill) for a in args]], capfd)
    assert message.format(**fill) in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args, message", [
    (["--host", "999.1.1.1", "--insecure"], "--host 999.1.1.1 does not resolve"),
    (["--encoder-port", "{taken}"], "127.0.0.1:{taken} is in use by another process (another aevae encoder?): stop "
                                    "it, or pass another --encoder-port"),
    (["--encoder-port", "0", "--decoder-port", "{free}", "--ui-port", "{free}"],
     "--decoder-port and --ui-port are both {free}"),
    # found by the services, it named `aevae serve`'s --tls-cert and --tls-key, which `aevae up` makes itself
    (["--host", "0.0.0.0", "--encoder-port", "0", "--decoder-port", "0"],
     "--host 0.0.0.0 listens beyond this machine: pass --tls (aevae up makes a certificate"),
])
def test_up_refuses_ports_it_cannot_have_before_it_trains_or_starts_anything(
        args: list[str], message: str, taken_port: int, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Found by the services, a port in use came after a training run of minutes, named `aevae serve`'s --port;
    a --host that does not resolve was a socket.gaierror traceback."""
    fill = {"taken": taken_port, "free": _free_port()}
    models = tmp_path / "models"
    write_tiny(models)  # were a port let through, the services would start rather than a training run
    before = sorted(p.name for p in models.iterdir())
    no_ui = [] if "--ui-port" in args else ["--no-ui"]
    err = _refused_fd(["up", "--models-dir", str(models), "--no-metrics", *no_ui, *[a.format(**fill) for a in args]],
                      capfd)
    assert message.format(**fill) in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in models.iterdir()) == before


@pytest.mark.parametrize("address, message", [
    ("bogus", "--address takes host:port, ray://host:port or auto, got 'bogus'"),
    ("127.0.0.1:{closed}", "cannot reach the Ray cluster at --address 127.0.0.1:{closed}: Connection refused; "
                           "pass the address of a running cluster"),
    ("auto", "cannot connect to the Ray cluster at --address auto: Could not find any running Ray instance"),
])
def test_train_at_an_address_with_no_cluster_says_so_at_once(
        address: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A host:port where no Ray listens: ray.init retried for over 9 minutes; "bogus" and "auto" with no cluster
    were tracebacks. (ray.init is faked: reaching it with a dead address fails the test, as it would hang.)"""
    import socket

    import ray

    _trained(monkeypatch, start_ray=True)

    def init(address: str | None = None, **kwargs: object) -> None:
        if address == "auto":
            raise ConnectionError("Could not find any running Ray instance.")
        raise AssertionError(f"ray.init({address!r}) reached: it retries for minutes")

    monkeypatch.setattr(ray, "init", init)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # free, and nobody listens once closed
    address, message = address.format(closed=closed), message.format(closed=closed)
    err = _refused(["train", "--address", address, "--hidden", "16", "--models-dir", str(tmp_path / "m")], capsys)
    assert message in err
    assert not (tmp_path / "m").exists()


def test_commands_start_without_a_writable_temporary_folder(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A read-only root with no /tmp mount (`docker run --read-only`): tempfile finds no usable folder, and
    every command, `aevae serve` in its container included, died at start with that traceback, because the CLI
    builds `train`'s options (the storage path's default) for its help."""
    import tempfile

    from aevae.trainer.config import TrainConfig

    def nowhere() -> str:
        raise FileNotFoundError("No usable temporary directory found in ['/tmp', '/var/tmp', '/usr/tmp', '/']")

    monkeypatch.setattr(tempfile, "gettempdir", nowhere)
    monkeypatch.setenv("TMPDIR", "/nonexistent-tmp")
    assert TrainConfig().storage_path == "/nonexistent-tmp/aevae-ray"
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    assert "decoder" in capsys.readouterr().out


# -- the CLI audit of this stop: each was a traceback, or a silent guess --------------------------------------
def test_a_folder_as_the_png_and_a_name_without_extension(decoder: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(["decode", "0,0,0,0", "-o", str(tmp_path), "--decoder", decoder], capsys)
    assert f"cannot write {tmp_path}: it is a folder; name the PNG file to write" in err
    assert cli.main(["decode", "0,0,0,0", "-o", str(tmp_path / "digit"), "--decoder", decoder]) == 0
    assert (tmp_path / "digit").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, words", [
    (["train", "--models-dir", ""], "--models-dir is empty; pass a folder"),
    (["serve", "decoder", "--models-dir", " ", "--port", "0"], "--models-dir is empty"),
    (["export-onnx", "--models-dir", ""], "--models-dir is empty"),
    (["train", "--hidden", "16", "--storage-path", "foo://bucket/x"],
     "--storage-path foo://bucket/x: cannot reach it from here (Unrecognized filesystem type"),
    (["up", "--encoder-port", "0", "--decoder-port", "0", "--ui-port", "0", "--serve-args", "'x"],
     "--serve-args \"'x\": No closing quotation"),
    (["up", "--encoder-port", "0", "--decoder-port", "0", "--ui-port", "0", "--train-args", "--epochs '2"],
     "--train-args \"--epochs '2\": No closing quotation"),
    (["up", "--host", "", "--encoder-port", "0", "--decoder-port", "0", "--ui-port", "0"], "--host is empty"),
])
def test_empty_folders_unreachable_storage_and_unbalanced_quotes_are_one_line(
        argv: list[str], words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # an empty --models-dir meant ./models: it must not be made here
    if argv[0] == "train" and "--models-dir" not in argv:
        argv = [*argv, "--models-dir", str(tmp_path / "m")]
    if argv[0] == "up":
        argv = [*argv, "--models-dir", str(tmp_path / "m")]
    err = _refused(argv, capsys)
    assert words in err, err
    assert not (tmp_path / "models").exists() and not (tmp_path / "m").exists()


def test_export_onnx_names_a_damaged_version_that_has_its_graphs(tiny_repo: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """It said "vae/1: has its ONNX graphs", exit 0, for a version whose weights were cut short."""
    weights = tiny_repo / "vae" / "1" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    err = _refused(["export-onnx", "--models-dir", str(tiny_repo)], capsys)
    assert "vae/1: broken: weights.pt does not match the checksum in its manifest" in err
    assert "1 version(s) broken, left as they are: vae/1" in err


def test_export_onnx_adds_only_the_graph_a_version_lacks_and_names_one_onnx_cannot_read(
        tiny_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A version with its encoder graph but no decoder graph failed with a traceback ("ae/1 already has
    ['encoder.onnx']"); one whose decoder graph was cut short (its checksum rewritten to match) with ONNX's own
    traceback. The first gets the missing graphs, its encoder graph kept byte for byte; the second is named
    broken, with the reason, and the exit status says so."""
    import json

    from aevae.repository import sha256_file
    from aevae.store import ModelStore

    folder = tiny_repo / "ae" / "1"
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in ("decoder.onnx", "decoder.int8.onnx"):
        (folder / name).unlink()
        del manifest["files"][name]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    encoder = (folder / "encoder.onnx").read_bytes()
    assert cli.main(["export-onnx", "--models-dir", str(tiny_repo), "ae"]) == 0
    out = capsys.readouterr().out
    assert "ae/1: wrote decoder.int8.onnx and decoder.onnx" in out, out
    assert (folder / "encoder.onnx").read_bytes() == encoder
    assert ModelStore(tiny_repo).get("ae").runtime.name == "onnx"

    folder = tiny_repo / "vae" / "1"
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "decoder.int8.onnx").unlink()
    del manifest["files"]["decoder.int8.onnx"]
    decoder = folder / "decoder.onnx"
    decoder.write_bytes(decoder.read_bytes()[:1000])
    manifest["files"]["decoder.onnx"] = sha256_file(decoder)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    err = _refused(["export-onnx", "--models-dir", str(tiny_repo), "vae"], capsys)
    assert "vae/1: broken: cannot make its graphs (" in err and "1 version(s) broken" in err, err
    assert not (folder / "decoder.int8.onnx").exists()


def test_export_onnx_names_a_model_folder_it_cannot_read(tiny_repo: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A model folder it may not read was left out without a word (the others converted, exit 0), and a
    repository it may not read was "no model versions ...: `aevae train` writes them"."""
    real = Path.iterdir

    def denied(self: Path) -> Any:  # what chmod 000 does to a user who is not root (the tests run as root)
        if self.name in ("ae", "empty"):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    assert cli.main(["export-onnx", "--models-dir", str(tiny_repo)]) == 0
    err = capsys.readouterr().err
    assert f"{tiny_repo / 'ae'}: not converted: the model folder cannot be read" in err, err
    (tiny_repo.parent / "empty").mkdir()
    err = _refused(["export-onnx", "--models-dir", str(tiny_repo.parent / "empty")], capsys)
    assert "cannot be read" in err and "writes them" not in err, err


@pytest.mark.parametrize(("flags", "words"), [
    (["--test-limit", "5"], "--test-limit must be a whole number of at least 100, got 5"),
    (["--classifier-train-limit", "5"], "--classifier-train-limit must be a whole number of at least 1,000, got 5"),
    (["--samples", "10000000"], "--samples must be a whole number from 1 to 100,000, got 10,000,000"),
    (["--out", ""], "--out is empty; name the folder for the report"),
])
def test_report_refuses_values_its_parts_cannot_take_before_any_work(
        flags: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each was accepted and failed minutes later with a traceback (a sample larger than the population, PCA's
    n_components, a 38 GiB allocation), or wrote the page into the current folder."""
    err = _refused(["report", "--models-dir", str(tmp_path / "m"), *flags], capsys)
    assert words in err, err


def test_a_report_run_keeps_the_last_page_until_its_own_and_an_ae2d_of_the_wrong_shape_is_refused(
        tiny_repo: Path, tmp_path: Path) -> None:
    """A rerun stopped half way left the old index.html and numbers.json beside new figures (a page that looked
    whole, of two runs): they are now replaced only when the run publishes its own; an `ae-2d` with a 4-d latent (`--latent-dim` forgotten) was compared as the 2-d AE and
    the claim called supported."""
    import shutil

    from aevae.report import ae2d, build
    from aevae.report.config import ReportError
    from aevae.store import ModelStore

    out = tmp_path / "out"
    out.mkdir()
    for name in (build.PAGE, build.NUMBERS):
        (out / name).write_text("the last run's")
    build.prepare_out(out, out / ".staging")  # the earlier page stays until this run publishes its own
    assert (out / build.PAGE).read_text() == "the last run's" and (out / ".staging").is_dir()
    (out / build.PAGE).unlink()
    (out / build.PAGE).mkdir()
    with pytest.raises(ReportError, match="holds a folder named index.html"):
        build.prepare_out(out, out / ".staging")
    (out / build.PAGE).rmdir()
    (out / "figures").write_text("")
    with pytest.raises(ReportError, match="holds a file named figures"):
        build.prepare_out(out, out / ".staging")
    shutil.copytree(tiny_repo / "ae" / "1", tiny_repo / "ae-2d" / "1")
    found = ae2d.find(ModelStore(tiny_repo))
    assert found is not None and ae2d.unfit(found) == (
        "ae-2d/1 is an AE with a 4-d latent; the comparison needs an AE with a 2-d latent")
    write_tiny(tiny_repo, "ae-2d", "ae", latent_dim=2)
    assert ae2d.unfit(ae2d.find(ModelStore(tiny_repo))) is None


def test_a_damaged_classifier_cache_is_trained_again_not_a_traceback(tmp_path: Path) -> None:
    from aevae.report import classifier

    rng = np.random.default_rng(0)
    images, labels = rng.random((300, 32, 32), dtype=np.float32), np.arange(300) % 10
    path = classifier.cache_path(tmp_path, "sha", len(images), 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PK\x03\x04 cut short")
    said: list[str] = []
    model = classifier.load_or_train(images, labels, "sha", tmp_path, say=said.append)
    assert any("ignoring unreadable cache" in line for line in said), said
    assert model.probabilities(images[:3]).shape == (3, 10)


@pytest.mark.parametrize(("argv", "usage", "unknown"), [
    (["serve", "decoder", "--prot", "5"], "usage: aevae serve decoder ", "--prot 5"),
    (["up", "--no-uii"], "usage: aevae up ", "--no-uii"),
    (["serve", "--x", "decoder"], "usage: aevae serve ", "--x"),
    (["--bogus", "train"], "usage: aevae ", "--bogus"),
])
def test_an_unknown_argument_is_refused_with_its_own_commands_usage(
        argv: list[str], usage: str, unknown: str, capsys: pytest.CaptureFixture[str]) -> None:
    """argparse handed a subcommand's unknown arguments to the root, whose error showed `usage: aevae [-h]
    [--log-level LEVEL] COMMAND ...` for `aevae serve decoder --prot 5`: the command's own usage says what it
    takes."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith(usage), err
    assert err.rstrip().endswith(f"error: unrecognized arguments: {unknown}"), err


def test_a_stop_landing_in_a_class_s_set_name_ends_the_command_as_any_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python wraps what __set_name__ raises in RuntimeError: a Ctrl-C while an import made its dataclasses
    (Ray Train's, 0.5 s into `aevae train`) was a traceback instead of exit 130."""
    from dataclasses import dataclass, field

    from aevae.errors import Terminated

    def stopped_while_importing(stop: BaseException) -> Any:
        def run(argv: Any) -> int:
            class Descriptor:
                def __set_name__(self, owner: type, name: str) -> None:
                    raise stop

            @dataclass
            class Imported:  # noqa: F841 - made for its __set_name__ call
                value: Any = field(default=Descriptor())
            return 0
        return run

    for stop, code in ((KeyboardInterrupt(), 130), (Terminated(), 143)):
        monkeypatch.setattr(cli, "_run", stopped_while_importing(stop))
        assert cli.main(["train"]) == code
    monkeypatch.setattr(cli, "_run", stopped_while_importing(ValueError("a bug")))
    with pytest.raises(RuntimeError):
        cli.main(["train"])


def test_decode_s_png_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`aevae decode -o keep.png` wrote in place: a full disk or a file-size limit left a truncated file where
    the earlier image was. Now a temporary is renamed over it once whole."""
    from PIL import Image

    from aevae.client.cli import write_image

    target = tmp_path / "keep.png"
    target.write_bytes(b"an earlier image")
    row = np.zeros((32, 64), np.uint8)

    def full_disk(self: Any, fp: Any, format: Any = None, **params: Any) -> None:
        Path(fp).write_bytes(b"\x89PNG\r\n")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(Image.Image, "save", full_disk)
        with pytest.raises(OSError, match="No space left"):
            write_image(Image, row, str(target))
    assert target.read_bytes() == b"an earlier image" and sorted(os.listdir(tmp_path)) == ["keep.png"]
    write_image(Image, row, str(target))  # the real save: whole, over the old one
    with Image.open(target) as written:
        assert written.size == (64, 32)
    with pytest.raises(ValueError, match="unknown file extension: .xyz"):
        write_image(Image, row, str(tmp_path / "out.xyz"))


@pytest.mark.parametrize("error", [BrokenPipeError(32, "Broken pipe"), OSError(28, "No space left on device")])
def test_a_stdout_that_takes_no_output_is_named_not_a_traceback(error: OSError) -> None:
    """`aevae decode ... | head -0` or `> /dev/full` ended in a BrokenPipeError or OSError traceback, exit 1."""
    from aevae.client.cli import say
    from aevae.errors import UserError

    class Refusing:
        encoding = "utf-8"

        def write(self, text: str) -> int:
            raise error

        def flush(self) -> None:
            raise error

        def fileno(self) -> int:
            raise ValueError("no descriptor")  # _quiet leaves it

    with pytest.raises(UserError, match=f"cannot write to its stream: {error.strerror}"):
        say("wrote x.png", Refusing())


def test_a_path_the_output_encoding_cannot_show_is_written_escaped() -> None:
    import io

    from aevae.client.cli import say

    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    say("wrote zé.png", stream)
    stream.seek(0)
    assert stream.read() == "wrote z\\xe9.png\n"


@pytest.mark.parametrize("error", [BrokenPipeError(32, "Broken pipe"), OSError(28, "No space left on device"),
                                   OSError(5, "Input/output error")])
def test_aevae_up_s_output_takes_any_write_error_as_output_gone(error: OSError) -> None:
    """Only BrokenPipeError was taken as "output gone": with stdout on a full disk (or a terminal hung up) each
    echo thread died in a traceback and `aevae up` waited for a start line it would never see."""
    from aevae.up import _Output

    class Failing:
        encoding = "utf-8"
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            raise error

        def flush(self) -> None:
            raise error

        def fileno(self) -> int:
            raise ValueError("no descriptor")

    stream = Failing()
    output = _Output(stream)
    assert output.write("aevae encoder serving ...\n") == len("aevae encoder serving ...\n")
    output.flush()
    assert stream.writes == 1


def test_batch_input_too_long_a_fifo_a_folder_or_a_device_is_named_for_what_it_is(
        decoder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A name over the file system's limit was pathlib's OSError traceback (is_file raises ENAMETOOLONG); a
    FIFO, a folder or a device was "no such file"."""
    from aevae.batch.sources import ArrayFile, ParquetFile
    from aevae.errors import UserError

    monkeypatch.chdir(tmp_path)
    long = "a" * 300
    err = _refused(["decode-batch", "--input", f"{long}.npy", "-o", str(tmp_path / "out"), "--decoder", decoder],
                   capsys)
    assert f"--input {long}.npy: File name too long" in err and len(err.strip().splitlines()) == 1, err
    err = _refused(["decode-batch", "--input", long, "-o", str(tmp_path / "out"), "--decoder", decoder], capsys)
    assert f"--input {long}: expected a .npy, .npz or .parquet file" in err, err
    with pytest.raises(UserError, match=f"--input {long}: File name too long"):
        ParquetFile(long, "image")
    fifo, folder = tmp_path / "fifo.npy", tmp_path / "folder.npy"
    os.mkfifo(fifo)
    folder.mkdir()
    with pytest.raises(UserError, match="fifo.npy: is not a regular file$"):
        ArrayFile(fifo)
    with pytest.raises(UserError, match="fifo.npy: is not a regular file or folder$"):
        ParquetFile(fifo)
    with pytest.raises(UserError, match="folder.npy: is a folder, not a file$"):
        ArrayFile(folder)
    with pytest.raises(UserError, match="/dev/null: is not a regular file$"):
        ArrayFile("/dev/null")
    with pytest.raises(UserError, match="missing.npy: no such file$"):
        ArrayFile(tmp_path / "missing.npy")


def test_encode_refuses_a_decompression_bomb_as_encode_batch_does(tmp_path: Path) -> None:
    """Pillow's DecompressionBombError (over twice its own bound) was a traceback; an image over encode-batch's
    bound is refused with that bound, not decoded."""
    from PIL import Image

    from aevae.batch.png import MAX_PIXELS
    from aevae.client.cli import _read_image
    from aevae.errors import UserError

    bomb, big = tmp_path / "bomb.png", tmp_path / "big.png"
    Image.new("L", (20000, 10000)).save(bomb)
    Image.new("L", (4097, 4096)).save(big)
    limit = f"over the limit of {MAX_PIXELS:,}$"
    with pytest.raises(UserError, match=f"^cannot read image {re.escape(str(bomb))}: 200,000,000 pixels, {limit}"):
        _read_image(str(bomb), False, [(32, 32)])
    with pytest.raises(UserError, match=f"^cannot read image {re.escape(str(big))}: 16,781,312 pixels, {limit}"):
        _read_image(str(big), False, [(32, 32)])
    Image.new("L", (4096, 4096)).save(big)
    assert _read_image(str(big), False, [(32, 32)]).shape == (32, 32)


def test_encode_reads_16_bit_grey_as_encode_batch_does_and_refuses_floats(tmp_path: Path) -> None:
    """Pillow's conversion clipped a 16-bit image's values at 255: a digit became black and white and was
    encoded without a word; a float image was read as almost black."""
    import numpy as np
    from PIL import Image

    from aevae.client.cli import _read_image
    from aevae.errors import UserError

    digit = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 256
    Image.fromarray(digit.astype(np.uint8)).save(tmp_path / "8.png")
    Image.fromarray(digit * 257).save(tmp_path / "16.png")  # the same values, 16-bit
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    eight = _read_image(str(tmp_path / "8.png"), False, [(32, 32)])
    assert np.array_equal(_read_image(str(tmp_path / "16.png"), False, [(32, 32)]), eight)
    Image.fromarray(digit.astype(np.float32) / 255).save(tmp_path / "f.tif")
    with pytest.raises(UserError, match=r"f\.tif: it is an image of 32-bit floats; give 8- or 16-bit grey"):
        _read_image(str(tmp_path / "f.tif"), False, [(32, 32)])


def test_ui_names_a_classifier_that_is_no_npz_archive(ui_not_served: list[dict[str, Any]], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """np.load returns a .npy file's array (a TypeError traceback: no context manager) and takes other bytes
    for pickled data ("load it unsafely")."""
    npy, junk = tmp_path / "z.npy", tmp_path / "junk.npz"
    np.save(npy, np.zeros(3))
    junk.write_bytes(bytes(range(256)))
    err = _refused(["ui", "--port", "0", "--classifier", str(npy)], capsys)
    assert f"not loaded from {npy}: a .npy array (numpy.save), not an .npz archive (the digit classifier " \
           "`aevae report` caches)" in err, err
    err = _refused(["ui", "--port", "0", "--classifier", str(junk)], capsys)
    assert f"not loaded from {junk}: not an .npz archive" in err and "pickle" not in err, err
    assert not ui_not_served


def test_a_removed_current_folder_is_named_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Run from a folder removed meanwhile, `aevae train` failed in oneMKL ("Cannot load libtorch_cpu.so") and
    decode-batch with an unnamed FileNotFoundError and "run the same command again", which could not help."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert cli.main(["list-nothing"]) == 2
    assert "the current folder no longer exists (it was removed); cd to another folder" in capsys.readouterr().err


def test_decode_names_the_one_latent_that_is_no_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    """One bad latent among 20,000 echoed the whole list (220 KB) without saying which."""
    latents = ["0,0,0,0"] * 20_000 + ["x"]
    assert cli.main(["decode", *latents, "-o", "never.png", "--decoder", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "latent 20001 of 20001 is 'x'" in err and len(err) < 300, err[:300]


def test_decode_names_a_value_beyond_float32_as_typed(capsys: pytest.CaptureFixture[str]) -> None:
    """1e40 was cast to float32 by the command: numpy's overflow warning, then the server's "got inf"."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.main(["decode", "0.5,-1.2,0.3,1e40", "-o", "never.png", "--decoder", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "1e+40 at index [0, 3] is beyond float32's range" in err and "inf" not in err, err


def test_a_token_file_that_cannot_be_read_is_the_command_s_error_naming_what_named_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """It read "aevae decode: error: HOST:PORT: INVALID_ARGUMENT: token_file: cannot read the token file X", as if
    the server had refused the call, without why the file could not be read or that AEVAE_TOKEN_FILE named it."""
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.write_text("# no token yet\n")
    monkeypatch.setenv("AEVAE_TOKEN_FILE", str(missing))
    err = _refused(["decode", "1,2", "-o", str(tmp_path / "x.png"), "--decoder", "127.0.0.1:1"], capsys)
    assert err == (f"aevae decode: error: AEVAE_TOKEN_FILE (the environment): cannot read the token file {missing}: "
                   "No such file or directory\n"), err
    err = _refused(["encode", str(empty), "--encoder", "127.0.0.1:1", "--token-file", str(empty)], capsys)
    assert err == f"aevae encode: error: token_file: token file {empty} holds no token\n", err
    err = _refused(["decode", "1,2", "-o", "x.png", "--decoder", "127.0.0.1:1", "--token-file", str(tmp_path)], capsys)
    assert err.endswith(f"cannot read the token file {tmp_path}: Is a directory\n") and "127.0.0.1" not in err, err
