"""The README is a landing page that starts with the quickstart, and every relative link in it and
in docs/ resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"(?m)^#+ (.+)$", page.read_text())
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


def test_the_first_screen_is_the_quickstart() -> None:
    first = "\n".join((REPO / "README.md").read_text().splitlines()[:40])
    assert "bash scripts/run.sh" in first and "bash scripts/test.sh" in first
    assert ".ci/run" in first and "docs/run-summary.png" in first


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target}"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.name}: {target}"


def test_the_readme_is_a_landing_page() -> None:
    # What it is, the two commands, what you get, where to go next (issue 26): measurement
    # narrative belongs in docs/, where each page links back.
    words = len((REPO / "README.md").read_text().split())
    assert words < 1000, f"README.md has {words} words; move detail into a docs/ page"
