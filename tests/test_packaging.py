"""The package's metadata lets pip install it where users are: Python 3.11 to 3.13."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).parents[1]


def test_requires_python_allows_3_11_to_3_13_and_the_classifiers_say_so():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    allowed = SpecifierSet(project["requires-python"])
    assert all(version in allowed for version in ("3.11.0", "3.12.3", "3.13.1"))
    assert "3.10.14" not in allowed
    classified = {c.rsplit(" ", 1)[-1] for c in project["classifiers"] if c.startswith("Programming Language")}
    assert {"3.11", "3.12", "3.13"} <= classified
