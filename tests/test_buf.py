"""The API guarded by buf (buf-bin from PyPI, proto/buf.yaml): lint with the standard rules (v1's listed
exceptions only), and no breaking change against the proto as v1 first shipped nor against HEAD, from the
git history a clone has. Negative controls show that both checks bite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

BUF = Path(sys.executable).with_name("buf")
PROTO = ROOT / "proto"


def buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    if not BUF.exists():
        pytest.fail(f"buf not found at {BUF}: install the dev extra (buf-bin)")
    return subprocess.run([str(BUF), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()


def test_lint_passes_and_new_messages_follow_the_standard_rules(tmp_path: Path) -> None:
    done = buf("lint", "proto")
    assert done.returncode == 0, done.stdout + done.stderr
    copy = tmp_path / "proto"
    shutil.copytree(PROTO, copy, ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    (copy / "aevae" / "v1" / "extra.proto").write_text(
        'syntax = "proto3";\npackage aevae.v1;\nservice Extra {\n  rpc Do(Thing) returns (Thing);\n}\n'
        "message Thing {\n  string Bad_Name = 1;\n}\n")
    done = buf("lint", str(copy))
    assert done.returncode != 0
    for rule in ('Service name "Extra" should be suffixed with "Service"', 'should be named "DoRequest"',
                 "Bad_Name"):
        assert rule in done.stdout, done.stdout


def test_no_breaking_change_against_history(tmp_path: Path) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("no git history to compare against (not a clone)")
    first = git("log", "--reverse", "--format=%H", "--", "proto/aevae/v1/decoder.proto").splitlines()
    assert first, "proto/aevae/v1 has no history in this clone (a shallow clone?)"
    depth = int(git("rev-list", "--count", f"{first[0]}..HEAD")) + 1
    for against in (f".git#ref={first[0]},subdir=proto,depth={depth}", ".git#ref=HEAD,subdir=proto"):
        done = buf("breaking", "proto", "--against", against)
        assert done.returncode == 0, f"breaking change against {against}:\n{done.stdout}{done.stderr}"

    # negative control: a renumbered field and a removed RPC are reported
    copy = tmp_path / "proto"
    shutil.copytree(PROTO, copy, ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    decoder = copy / "aevae" / "v1" / "decoder.proto"
    text = decoder.read_text()
    assert "string dtype = 4;" in text and "rpc ListModels" in text
    decoder.write_text(text.replace("string dtype = 4;", "string dtype = 5;")
                       .replace("  rpc ListModels(ListModelsRequest) returns (ListModelsResponse);\n", ""))
    done = buf("breaking", str(copy), "--against", "proto")
    assert done.returncode != 0
    assert 'field "4" with name "dtype"' in done.stdout and 'RPC "ListModels"' in done.stdout, done.stdout
