"""What the package says about itself where no test of behaviour looks: its README and its metadata."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (ROOT / "README.md").exists(), reason="an installed package without its README")
def test_the_readme_links_only_absolute_addresses() -> None:
    """A package index shows the README on its own, where a link relative to it leads nowhere; the
    documentation's pages are named instead (it has no public site yet)."""
    targets = re.findall(r"\]\(([^)]*)\)", (ROOT / "README.md").read_text())
    assert targets, "the README links to Heksher itself"
    assert [t for t in targets if not t.startswith("https://")] == []


def test_the_classifiers_name_every_python_version_supported() -> None:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11 and later read TOML")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lowest = tuple(int(x) for x in project["requires-python"].removeprefix(">=").split("."))
    named = {
        tuple(int(x) for x in c.rsplit(":: ", 1)[1].split("."))
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    assert min(named) == lowest
    assert named == {(3, minor) for minor in range(lowest[1], max(named)[1] + 1)}
    assert (3, 13) in named  # checked: the test suite passes on 3.13 (heksher 0.2.2 is skipped there)
