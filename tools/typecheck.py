"""Type-checks the `aevae` package as it is installed: the folders that pyproject.toml maps into the `aevae.*`
namespace are linked into one tree under build/typecheck, and mypy checks that tree with the generated
stubs of aevae.v1 (mypy cannot follow setuptools' editable-install finder). Run by `make typecheck` and CI.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "typecheck"


def link_tree() -> Path:
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(TREE, ignore_errors=True)
    package = TREE / "aevae"
    package.mkdir(parents=True)
    for module, folder in sorted(mapping.items()):
        source = ROOT / folder
        if module == "aevae":
            for file in source.glob("*.py"):
                (package / file.name).symlink_to(file)
        else:
            (package / module.split(".", 1)[1]).symlink_to(source, target_is_directory=True)
    return package


def main() -> int:
    link_tree()
    config = ROOT / "pyproject.toml"
    return subprocess.call([sys.executable, "-m", "mypy", "--config-file", str(config), "-p", "aevae"], cwd=TREE)


if __name__ == "__main__":
    sys.exit(main())
