"""The README's relative links lead somewhere: every file exists, every #anchor is a heading there.

The README is not a page of the documentation site, so ``mkdocs build --strict`` (which
checks the links between the pages of docs/) does not see its links into docs/.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_slug(heading: str) -> str:
    """The anchor GitHub (and MkDocs' toc, for these headings) gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {github_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_readme_links_resolve():
    links = [m for m in LINK.findall((ROOT / "README.md").read_text()) if not re.match(r"[a-z]+://", m)]
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README.md links to {path}, which does not exist"
        if anchor:
            assert anchor in anchors(target), f"README.md links to {link}: no such heading in {path}"


def results_table(text: str) -> str:
    start = text.index("| result | setting | measured |")
    return text[start : text.index("\n\n", start)]


def test_docs_home_shows_the_readme_results_table():
    """docs/index.md repeats the README's results table (its links relative to docs/): one
    set of numbers, so a refreshed README row cannot leave a stale one on the site."""
    readme = results_table((ROOT / "README.md").read_text()).replace("](docs/", "](")
    assert results_table((ROOT / "docs" / "index.md").read_text()) == readme
