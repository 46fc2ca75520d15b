"""The documentation's links resolve inside the repository (a fresh clone has nothing
beside it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "benchmarks/README.md", "docs/ib-facts.md"]


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve_inside_the_repository(doc):
    path = REPO / doc
    broken = []
    for match in re.finditer(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        target = match.group(1)
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        resolved = (path.parent / target).resolve()
        if not resolved.exists() or REPO not in resolved.parents:
            broken.append(target)
    assert broken == [], f"{doc} links outside the repository or to nothing: {broken}"
