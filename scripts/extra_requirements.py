#!/usr/bin/env python
"""Print the requirements of leukedge's optional-dependency groups (pyproject.toml), one per line, with the
groups they name (``leukedge[train,export]``) expanded: ``python scripts/extra_requirements.py demo train``.

The Makefile installs them with pip and then builds the Rust core with ``maturin develop``, which shows cargo's
progress but cannot install an extra that names another extra of the same package itself.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the TOML reader pip vendors (pip is in every venv this runs in)
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
SELF = re.compile(r"^leukedge\[([^\]]+)\]\s*(;.*)?$")


def requirements(groups: list[str]) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras: dict[str, list[str]] = project.get("optional-dependencies", {})
    out: list[str] = []
    seen: set[str] = set()

    def add(group: str) -> None:
        if group in seen:
            return
        if group not in extras:
            raise SystemExit(f"{PYPROJECT}: no optional-dependency group {group!r} (have: {', '.join(extras)})")
        seen.add(group)
        for req in extras[group]:
            m = SELF.match(req.strip())
            if m:
                for sub in m.group(1).split(","):
                    add(sub.strip())
            elif req not in out:
                out.append(req)

    for g in groups:
        add(g)
    return out


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1:] or ["dev"])))
