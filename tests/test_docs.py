"""Every relative link and image in the README and docs/ points at a file that is committed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_targets(page: Path) -> list[str]:
    """The link targets of a markdown page that are paths in this repository (no URL, no anchor)."""
    targets = (match.group(1).split("#")[0] for match in LINK.finditer(page.read_text()))
    return [t for t in targets if t and not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page: Path) -> None:
    missing = [t for t in relative_targets(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) ![gone](figures/gone.png) [web](https://x.org/a) [top](#setup)")
    assert relative_targets(page) == ["page.md", "figures/gone.png"]
