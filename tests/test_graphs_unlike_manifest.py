"""The encoder service over a repository whose files do not say what they hold (an audit of the encoder and
the load path), against a real `aevae serve encoder` process."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from aevae.v1 import encoder_pb2, encoder_pb2_grpc, tensor_pb2
from aevae.v1.tensors import to_tensor
from helpers import running, write_tiny


def test_an_ae_graph_under_a_vae_manifest_is_broken_not_answered_with_uninitialized_memory(tmp_path: Path) -> None:
    """ae/1's manifest edited to say VAE (its architecture edited to agree), its ONNX graphs left as they are:
    Encode answered OK with a `logvar` of whatever the server's memory held (the graph gives no log-variance).
    The version is broken with the reason, named by ListModels and the call; the other models serve on."""
    root = tmp_path / "models"
    write_tiny(root, "ae", "ae")
    write_tiny(root, "vae", "vae")
    path = root / "ae" / "1" / "manifest.json"
    data = json.loads(path.read_text())
    data["kind"] = data["architecture"]["kind"] = "vae"
    path.write_text(json.dumps(data))
    with running(root, kinds=("encoder",)) as services, grpc.insecure_channel(services["encoder"].address) as ch:
        stub = encoder_pb2_grpc.EncoderStub(ch)
        images = to_tensor(np.zeros((3, 32, 32), np.uint8))
        with pytest.raises(grpc.RpcError) as error:
            stub.Encode(encoder_pb2.EncodeRequest(model="ae", images=images), timeout=10)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION, error.value.details()
        assert "encoder.onnx gives 1 output (the mean), but the manifest says vae" in error.value.details()
        listed = {m.name: m for m in stub.ListModels(tensor_pb2.ListModelsRequest(), timeout=10).models}
        assert [b.version for b in listed["ae"].broken] == [1] and "encoder.onnx gives 1 output" in \
            listed["ae"].broken[0].reason
        assert listed["vae"].version == 1 and not listed["vae"].broken
        answer = stub.Encode(encoder_pb2.EncodeRequest(model="vae", images=images), timeout=10)
        assert (answer.model, answer.version, list(answer.logvar.shape)) == ("vae", 1, [3, 4])
    assert "Traceback" not in "".join(services["encoder"].output)
