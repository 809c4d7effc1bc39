"""Real `aevae serve encoder` and `aevae serve decoder` processes while their repository is damaged under them
(an audit of the load path): manifests that broke the scan or the listing for every model, reasons too long
for a gRPC status, and a decoder graph that loaded but could not decode. Each version costs only itself, is named broken with its reason by
ListModels and by the call that asks for it, and the server's descriptors come back to where they were."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np

from aevae.repository import MANIFEST, sha256_file
from aevae.v1 import decoder_pb2, decoder_pb2_grpc, encoder_pb2, encoder_pb2_grpc, tensor_pb2
from aevae.v1.tensors import to_tensor
from helpers import running, write_tiny

ARGS = ["--refresh-seconds", "0.1", "--shutdown-delay", "0"]


def _settled(check: Callable[[], Any], seconds: float = 20) -> Any:
    """check()'s result once it stops failing its assertions (the servers re-read the repository every 0.1 s)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _edit_manifest(folder: Path, edit: Callable[[dict], Any]) -> None:  # type: ignore[type-arg]
    data = json.loads((folder / MANIFEST).read_text())
    edit(data)
    (folder / MANIFEST).write_text(json.dumps(data))


def test_damaged_manifests_and_graphs_cost_only_their_version(tmp_path: Path) -> None:
    import onnx

    repo = tmp_path / "models"
    write_tiny(repo, "ae", "ae")
    write_tiny(repo, "vae", "vae")
    write_tiny(repo, "vae8", "vae", latent_dim=8, image_shape=(24, 20))
    newer = repo / "vae" / "2"
    with running(repo, ARGS) as services, grpc.insecure_channel(services["decoder"].address) as dch, \
            grpc.insecure_channel(services["encoder"].address) as ech:
        decoder, encoder = decoder_pb2_grpc.DecoderStub(dch), encoder_pb2_grpc.EncoderStub(ech)
        pids = {kind: service.process.pid for kind, service in services.items()}  # type: ignore[union-attr]

        def decode(model: str = "vae", version: int = 0, dim: int = 4) -> decoder_pb2.DecodeResponse:
            return decoder.Decode(decoder_pb2.DecodeRequest(model=model, version=version, latents=to_tensor(
                np.zeros((2, dim), np.float32))), timeout=10)

        def listed() -> dict[str, dict[str, Any]]:
            """Both services' ListModels, which must agree: model -> (default, {broken version: reason})."""
            answers = [{m.name: (m.version, {b.version: b.reason for b in m.broken}) for m in stub.ListModels(
                tensor_pb2.ListModelsRequest(), timeout=10).models} for stub in (decoder, encoder)]
            assert answers[0] == answers[1]
            return answers[0]

        def everything_else_serves() -> None:
            assert decode("ae").version == 1 and decode("vae8", dim=8).version == 1
            assert encoder.Encode(encoder_pb2.EncodeRequest(model="ae", images=to_tensor(
                np.zeros((1, 32, 32), np.uint8))), timeout=10).version == 1
            assert encoder.GetLatentStats(encoder_pb2.GetLatentStatsRequest(model="vae8"), timeout=10).latent_dim == 8

        decode()
        fds = {kind: _fds(pid) for kind, pid in pids.items()}

        def broken_with(reason: str) -> None:
            models = listed()
            assert models["vae"][0] == 1 and reason in models["vae"][1].get(2, ""), models
            try:
                decode(version=2)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error  # type: ignore[attr-defined]
                assert reason in error.details(), error.details()  # type: ignore[attr-defined]
            else:
                raise AssertionError("vae/2 served")
            assert decode().version == 1
            everything_else_serves()

        # JSON nested past the recursion limit: the scan raised RecursionError, every call INTERNAL
        shutil.copytree(repo / "vae" / "1", newer)
        (newer / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
        _settled(lambda: broken_with("manifest.json is nested too deeply"))
        # a lone surrogate in a file's name: ListModels UNKNOWN, the call asking for vae/2 hung to its deadline
        shutil.copy(repo / "vae" / "1" / MANIFEST, newer)
        _edit_manifest(newer, lambda data: data["files"].__setitem__("\udcff", "0" * 64))
        _settled(lambda: broken_with("lone UTF-16 surrogate"))
        # a metric no float holds: ListModels INTERNAL for every model; now left out, and vae/2 served
        shutil.copy(repo / "vae" / "1" / MANIFEST, newer)
        _edit_manifest(newer, lambda data: data["metrics"].__setitem__("huge", 10**400))

        def served() -> None:
            assert listed()["vae"] == (2, {}) and decode().version == 2

        _settled(served)

        # a reason quoting 100,000 numbers, and a model of 1,000 broken versions: the errors were past gRPC's
        # 16 KiB of metadata, so the callers got RESOURCE_EXHAUSTED about metadata instead of the reason
        shutil.copytree(repo / "vae" / "1", repo / "vae" / "3")
        _edit_manifest(repo / "vae" / "3", lambda data: data.__setitem__("image_shape", list(range(1, 100_000))))
        for number in range(1, 1001):
            (repo / "many" / str(number)).mkdir(parents=True)

        def reasons_fit() -> None:
            for model, version, reason in (("vae", 3, "'image_shape' must be [height, width]"),
                                           ("many", 0, "no manifest.json; and 997 more broken versions")):
                try:
                    decode(model, version)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error  # type: ignore[attr-defined]
                    assert reason in error.details(), error.details()  # type: ignore[attr-defined]
                else:
                    raise AssertionError(f"{model}/{version} served")
            assert listed()["vae"][0] == 2 and len(listed()["vae"][1][3]) == 300

        _settled(reasons_fit)

        # a valid decoder graph whose input is named otherwise: it loaded and failed every Decode as INTERNAL
        graph = repo / "vae8" / "1" / "decoder.onnx"
        model = onnx.load(str(graph))
        old = model.graph.input[0].name
        model.graph.input[0].name = "z"
        for node in model.graph.node:
            node.input[:] = ["z" if name == old else name for name in node.input]
        onnx.save(model, str(graph))
        _edit_manifest(graph.parent, lambda data: data["files"].__setitem__(graph.name, sha256_file(graph)))

        def graph_broken() -> None:
            try:
                decode("vae8", dim=8)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error  # type: ignore[attr-defined]
                assert "decoder.onnx cannot decode a latent" in error.details()  # type: ignore[attr-defined]
            else:
                raise AssertionError("vae8/1 served")
            assert "decoder.onnx cannot decode a latent" in listed()["vae8"][1][1]

        _settled(graph_broken)
        assert decode("ae").version == 1
        for kind, pid in pids.items():  # what the faults opened was closed again (a little slack for gRPC's own)
            assert _fds(pid) <= fds[kind] + 2, (kind, fds[kind], _fds(pid))
    for service in services.values():
        output = "".join(service.output)
        assert "Traceback" not in output and "internal error" not in output, output
