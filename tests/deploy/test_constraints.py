"""constraints.txt pins every dependency pyproject.toml declares, inside the range it declares.

The ranges in pyproject.toml say what the code is written against; constraints.txt says what
the suite last passed with. Without the pins a fresh `make test` (or image build) takes
whatever was released last night: redis-py 8.2 turned a synchronous ``Retry`` given to the
asyncio client into a warning, which this suite makes an error.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*$")


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"constraints.txt:{number}: not a name==version pin: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"constraints.txt:{number}: {name} pinned twice"
        pins[name] = Version(match[2])
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines.extend(extra)
    return [Requirement(line) for line in lines]


def test_every_declared_dependency_is_pinned_inside_its_range() -> None:
    pins = _pins()
    wrong = []
    for req in _declared():
        version = pins.get(canonicalize_name(req.name))
        if version is None:
            wrong.append(f"{req.name}: not pinned")
        elif not req.specifier.contains(version, prereleases=True):
            wrong.append(f"{req.name}=={version} is outside {req.specifier}")
    assert not wrong, "constraints.txt disagrees with pyproject.toml: " + "; ".join(wrong)


def test_the_project_itself_is_not_pinned() -> None:
    """A pin of marketflow would make `pip install -c constraints.txt -e .` refuse the checkout."""
    assert "marketflow" not in _pins()


def test_every_install_path_uses_the_pins() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install [^\n]*-c constraints\.txt[^\n]*-e '\.\[dev\]'", makefile)
    assert re.search(r"^\$\(STAMP\): [^\n]*constraints\.txt", makefile, re.MULTILINE)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"COPY [^\n]*constraints\.txt", dockerfile)
    assert re.search(r"pip wheel [^\n]*-c constraints\.txt", dockerfile)
