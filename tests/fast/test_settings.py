"""The one source of the services' settings: flags, the server's configuration and Ray Serve's args agree."""

from __future__ import annotations

import argparse
import ast
import socket
from dataclasses import fields

import pytest

from aevae.services.settings import MAX_MESSAGE_BYTES, PORTS, ServiceSettings, listen_problem, listeners_problem
from helpers import ROOT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    ServiceSettings.add_arguments(parser)
    return parser


def test_every_flag_defaults_to_its_setting() -> None:
    assert ServiceSettings.from_args(_parser().parse_args([])) == ServiceSettings()
    args = _parser().parse_args(["--max-batch", "7", "--batch-wait-s", "0.001", "--allow-symlinks", "--port", "0"])
    settings = ServiceSettings.from_args(args)
    assert (settings.max_batch, settings.batch_wait_s, settings.allow_symlinks, settings.port) == (7, 0.001, True, 0)
    assert settings.limits.max_batch == 7


def test_the_default_port_comes_from_the_table() -> None:
    assert ServiceSettings().port_for("encoder") == PORTS["encoder"]
    assert ServiceSettings(port=0).port_for("decoder") == 0


def test_a_mapping_is_checked_key_by_key() -> None:
    assert ServiceSettings.from_mapping({"batch_size": "8", "models_dir": "/m"}) == \
        ServiceSettings(batch_size=8, models_dir="/m")
    with pytest.raises(ValueError, match=r"unknown settings \['batchsize'\]; accepted: .*batch_size"):
        ServiceSettings.from_mapping({"batchsize": 8})
    with pytest.raises(ValueError, match=r"batch_wait_s: expected float, got 'soon'"):
        ServiceSettings.from_mapping({"batch_wait_s": "soon"})
    with pytest.raises(ValueError, match=r"batch-gather-s must be at most 1.0, got 5.0"):
        ServiceSettings.from_mapping({"batch_gather_s": 5})
    with pytest.raises(ValueError, match=r"batch-wait-s must be at most 1.0, got 2.0"):
        ServiceSettings(batch_wait_s=2.0)
    with pytest.raises(ValueError, match=r"batch-size must be at least 1, got 0"):
        ServiceSettings.from_mapping({"batch_size": 0})
    with pytest.raises(ValueError, match=r"runtime must be auto, onnx or torch"):
        ServiceSettings(runtime="tvm")
    # a message limit under the metadata answers' size would refuse every call, ListModels included
    with pytest.raises(ValueError, match=r"max-message-bytes must be at least 65536, got 10"):
        ServiceSettings(max_message_bytes=10)
    # nan passes every comparison with a minimum, inf would wait forever: both refused, from a flag or a file
    with pytest.raises(ValueError, match=r"batch-wait-s must be a finite number, got nan"):
        ServiceSettings.from_mapping({"batch_wait_s": "nan"})
    with pytest.raises(ValueError, match=r"grace must be a finite number, got inf"):
        ServiceSettings(grace=float("inf"))


def test_each_setting_has_help_and_each_default_port_is_written_once() -> None:
    assert all(f.metadata["help"] for f in fields(ServiceSettings))
    literals = []
    for path in ROOT.glob("*/**/*.py"):
        if ".venv" in path.parts or "tests" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in (50051, 50052):
                literals.append(str(path.relative_to(ROOT)))
    assert literals == ["services/settings.py", "services/settings.py"]


def test_settings_past_what_grpc_and_the_runtimes_take_are_refused() -> None:
    """gRPC's channel arguments are 32-bit ints: a larger message limit or keepalive was an OverflowError
    traceback from grpc.aio.server; 100000 intra-op threads took 16 GB and the start never ended."""
    assert ServiceSettings(max_message_bytes=MAX_MESSAGE_BYTES).max_message_bytes == 1 << 30
    with pytest.raises(ValueError, match=r"max-message-bytes must be at most 1073741824, got 3000000000"):
        ServiceSettings(max_message_bytes=3_000_000_000)
    with pytest.raises(ValueError, match=r"keepalive-seconds must be at most 2147483, got 1000000000000.0"):
        ServiceSettings.from_mapping({"keepalive_seconds": 1e12})
    with pytest.raises(ValueError, match=r"threads must be at most 1024, got 100000"):
        ServiceSettings(threads=100_000)


def test_a_mapping_refuses_a_fraction_for_a_count_null_for_a_required_setting_and_a_non_mapping() -> None:
    """int(1.5) is 1, and `batch_size: null` passed every check to fail in the replicas at the first request."""
    with pytest.raises(ValueError, match=r"workers: expected int, got 1.5"):
        ServiceSettings.from_mapping({"workers": 1.5})
    with pytest.raises(ValueError, match=r"workers: expected int, got inf"):  # was an OverflowError
        ServiceSettings.from_mapping({"workers": float("inf")})
    with pytest.raises(ValueError, match=r"batch_size: expected int, got None"):
        ServiceSettings.from_mapping({"batch_size": None})
    with pytest.raises(ValueError, match=r"the settings must be a mapping of names to values .*got 'batch_size'"):
        ServiceSettings.from_mapping("batch_size")  # type: ignore[arg-type]
    assert ServiceSettings.from_mapping({"workers": 2.0, "threads": None}) == ServiceSettings(workers=2)


def test_a_port_that_cannot_be_had_is_named_with_its_cause() -> None:
    """gRPC says "Failed to bind" for every cause, after an E line of its own: a host that does not resolve or
    is not this machine's read as a port in use."""
    assert "--host 999.1.1.1 does not resolve" in (listen_problem("999.1.1.1", 0, "--port", "decoder") or "")
    problem = listen_problem("192.0.2.1", 0, "--port", "decoder") or ""  # TEST-NET-1: nobody's address
    assert problem.startswith("--host 192.0.2.1 is not an address of this machine; give one of its own: 127.0.0.1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert listen_problem("127.0.0.1", port, "--metrics-port", "decoder") == (
            f"127.0.0.1:{port} is in use by another process (another aevae decoder?): stop it, or pass another "
            "--metrics-port (0 picks a free one)")
    assert listen_problem("127.0.0.1", 0, "--port", "decoder") is None


def test_the_metrics_port_is_checked_on_its_own_host() -> None:
    """--metrics-host: the metrics port is tried on that address, and a problem with it names that flag."""
    bad = ServiceSettings(metrics_port=0, metrics_host="999.1.1.1")
    assert (listeners_problem(bad.listeners("decoder")) or "").startswith("--metrics-host 999.1.1.1 does not resolve")
    assert ServiceSettings(metrics_port=0, host="999.1.1.1", metrics_host="127.0.0.1").metrics_address == "127.0.0.1"
    assert ServiceSettings(metrics_port=0).metrics_address == "127.0.0.1"  # --host's
    assert listeners_problem(ServiceSettings(metrics_port=0, metrics_host="127.0.0.2").listeners("decoder")) is None
