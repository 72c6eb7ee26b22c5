"""Every relative Markdown link in the project's documentation resolves to a file inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted(
    {
        ROOT / "README.md",
        ROOT / "BENCHMARKS.md",
        ROOT / "docs" / "architecture.md",
        ROOT / "docs" / "formats.md",
        ROOT / "knowlens" / "organism" / "WORLD_SPEC.md",
        *(ROOT / "docs").glob("*.md"),
    }
)
# [text](target) and ![alt](target); the target ends at whitespace or ')' (an optional "title" follows)
INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
EXTERNAL = ("http://", "https://", "mailto:")


def links(text: str) -> list[str]:
    """Link targets outside code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    return INLINE_LINK.findall(text) + REFERENCE_DEF.findall(text)


def broken_links(doc: Path, root: Path = ROOT) -> list[str]:
    """The relative link targets of ``doc`` that leave ``root`` or name nothing (web links are allowed)."""
    bad = []
    for target in links(doc.read_text(encoding="utf-8")):
        if target.startswith(EXTERNAL):
            continue
        path = target.split("#", 1)[0]
        if not path:
            continue  # an anchor in the same file
        if path.startswith("/") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", path):
            bad.append(f"{target} (absolute path or unknown scheme)")
            continue
        resolved = (doc.parent / path).resolve()
        if not resolved.is_relative_to(root.resolve()):
            bad.append(f"{target} (leaves the repository)")
        elif not resolved.exists():
            bad.append(f"{target} (no such file)")
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(doc: Path) -> None:
    assert doc.is_file(), f"{doc.relative_to(ROOT)} is missing"
    bad = broken_links(doc)
    assert not bad, f"{doc.relative_to(ROOT)}: broken links: {', '.join(bad)}"


def test_link_extraction() -> None:
    text = (
        'See [a](docs/a.md), [b](../x.md#y "t") and ![img](i.png).\n'
        "[ref]: other.md\n`[not](code.md)`\n```\n[nor](fenced.md)\n```\n"
    )
    assert links(text) == ["docs/a.md", "../x.md#y", "i.png", "other.md"]


def test_broken_links_are_found(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (tmp_path / "outside.md").write_text("x")
    (root / "ok.md").write_text("x")
    doc = root / "docs" / "page.md"
    doc.write_text(
        "[in](../ok.md#part) [self](#top) [web](https://example.org/x) [around](../docs/page.md)\n"
        "[out](../../outside.md) [gone](missing.md) [abs](/etc/hosts)\n"
    )
    assert broken_links(doc, root) == [
        "../../outside.md (leaves the repository)",
        "missing.md (no such file)",
        "/etc/hosts (absolute path or unknown scheme)",
    ]
