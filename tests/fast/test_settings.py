"""The one source of the services' settings: flags, the server's configuration and Ray Serve's args agree."""

from __future__ import annotations

import argparse
import ast
from dataclasses import fields

import pytest

from aevae.services.settings import PORTS, ServiceSettings
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
