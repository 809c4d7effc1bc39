"""Regenerates the protobuf and gRPC Python code and its mypy stubs from the .proto files beside this module.

`python -m aevae.v1.generate` (or `make proto`) writes into proto/aevae/v1/; commit the result. The proto
root is proto/, so generated modules import each other as `from aevae.v1 import tensor_pb2`, which resolves in
the installed `aevae` namespace. tests/test_proto.py regenerates into a temporary folder and fails when the
committed files differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parents[1]  # proto/
PROTOS = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in HERE.glob("*.proto"))
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _plugin(name: str) -> str:
    """mypy-protobuf's protoc plugins are console scripts installed beside the running Python."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(f"{name} not found beside {sys.executable}: install mypy-protobuf (the dev extra)")
    return str(path)


def generate(out_root: Path = PROTO_ROOT) -> list[Path]:
    """Writes <out_root>/aevae/v1/*_pb2*.py[i] and returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (see the messages above)")
    return generated_files(out_root)


def generated_files(out_root: Path = PROTO_ROOT) -> list[Path]:
    folder = out_root / "aevae" / "v1"
    return sorted(p for p in folder.iterdir() if p.name.endswith(SUFFIXES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="proto root to write into (default: proto/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
