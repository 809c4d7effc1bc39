"""Prints the requirements of aevae's extras, one a line, from pyproject.toml, without aevae itself.

The Dockerfile installs these first, in a layer that depends on pyproject.toml and the constraints only,
then the package with --no-deps: a change to the source rebuilds a few seconds, not the dependencies.

  python3 requirements.py pyproject.toml serve          # the base dependencies plus the `serve` extra
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(project: dict, extras: list[str]) -> list[str]:
    name = project["name"]
    out = list(project.get("dependencies", []))
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in project["optional-dependencies"][extra]:
            own = re.fullmatch(rf"{re.escape(name)}\[([\w,\s-]+)\]", requirement.strip())
            if own:  # aevae[model]: that extra's requirements too
                todo += [e.strip() for e in own.group(1).split(",")]
            else:
                out.append(requirement)
    return sorted(set(out))


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        print("\n".join(requirements(tomllib.load(f)["project"], sys.argv[2:])))
