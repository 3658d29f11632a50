"""The README and docs/: every relative link reaches a file (and heading) that exists, and the README's
rows against mlx-lm are rows of the generated benchmark table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(path: Path) -> str:
    """The text outside fenced code blocks, where a link is a link."""
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", prose(path), flags=re.M)}


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path)) if not re.match(r"[a-z]+:", t)]


def test_every_doc_has_links():
    assert all(relative_links(doc) for doc in DOCS), "a doc without a single relative link: is the pattern right?"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_reach_files_and_headings(doc):
    broken = []
    for target in relative_links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)


def table_rows(text: str, begin: str, end: str) -> dict[tuple[str, str], list[str]]:
    """(model, benchmark) -> the row's cells, from the table between two markers."""
    assert begin in text and end in text, f"{begin} ... {end} markers missing"
    body = text.split(begin, 1)[1].split(end, 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines() if line.startswith("| ")]
    return {(r[0], r[1]): r for r in rows if r[0] != "model"}


def test_readme_rows_against_mlx_lm_are_the_benchmark_tables():
    ours = table_rows((REPO / "README.md").read_text(), "<!-- peer-rows -->", "<!-- /peer-rows -->")
    measured = table_rows((REPO / "docs" / "benchmarks.md").read_text(), "<!-- bench-table -->",
                          "<!-- /bench-table -->")
    assert ours
    for key, cells in ours.items():
        assert key in measured, f"README row {key} is not in docs/benchmarks.md's table"
        assert cells[2:5] == measured[key][2:5], f"README row {key} differs from docs/benchmarks.md's"
