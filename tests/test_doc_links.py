"""Every relative link in README.md and docs/*.md points to a file in the repository (and every
#anchor to a heading), every repository path named in backticks exists, and nothing points a
reader at an issue tracker they cannot see."""
import re

import pytest
from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_PATH = re.compile(r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|md|json|sh|txt|toml|wav|js))`")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {slug(m[1]) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_relative_links_point_to_files_and_headings(doc):
    text = doc.read_text()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: not a file of this repository
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists() or REPO not in file.parents and file != REPO:
            broken.append(f"{target}: no such file in the repository")
        elif anchor and anchor not in anchors(file.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert not broken, f"{doc.relative_to(REPO)}:\n" + "\n".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_paths_in_backticks_exist_and_no_issue_numbers(doc):
    text = doc.read_text()
    missing = [p for p in CODE_PATH.findall(text) if not (REPO / p).exists() and not (doc.parent / p).exists()]
    assert not missing, f"{doc.relative_to(REPO)} names files that do not exist: {missing}"
    assert not re.search(r"issue #\d+|#\d+\b(?!\))", re.sub(r"`[^`]*`", "", text)), \
        f"{doc.relative_to(REPO)} refers to an issue number: a reader has no access to the tracker"
