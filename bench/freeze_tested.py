"""`make constraints-tested`: constraints-tested.txt, the exact versions this environment passed with.

Only this project's real dependencies: the packages that qlora-notebooks[dev,export] requires, and theirs,
as installed here (pip freeze, filtered), without local version labels (torch==2.13.0 matches the CPU
build 2.13.0+cpu and a CUDA build alike). Usable as `pip install -c constraints-tested.txt -e ".[dev]"`.
"""

from __future__ import annotations

import datetime
import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

OUT = Path(__file__).resolve().parents[1] / "constraints-tested.txt"


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: set[str]) -> dict[str, str]:
    """Every installed distribution `root[extras]` needs, by normalised name -> installed version."""
    found, todo = {}, [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        if _name(name) != _name(root):
            found[_name(dist.metadata["Name"])] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            env_ok = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (wanted or {""}))
            if env_ok and _name(req.name) not in found:
                todo.append((req.name, set(req.extras)))
    return found


def main() -> int:
    pins = closure("qlora-notebooks", {"dev", "export"})
    head = (f"# The exact versions `make test` last passed with ({datetime.date.today()}, Python "
            f"{sys.version.split()[0]}): `make constraints-tested` (bench/freeze_tested.py) writes it.\n"
            "# Use: pip install -c constraints-tested.txt -e \".[dev]\"   (torch: the CPU or CUDA build of this version)\n")
    lines = [f"{n}=={v.split('+')[0]}" for n, v in sorted(pins.items())]
    OUT.write_text(head + "\n".join(lines) + "\n")
    print(f"{OUT.name}: {len(lines)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
