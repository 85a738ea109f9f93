"""README is the front door: its layout section matches the tree, it stays short, its links (and the docs' links,
anchors included) resolve, and the long guides live in docs/, every page listed in the contents page docs/README.md
that README links."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONTENTS = ROOT / "docs" / "README.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]*)\)")


def test_the_layout_section_names_every_module_and_nothing_that_is_not_there():
    block = README.split("## Layout", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"(?<![\w.])(\w+\.py)\b", block))
    modules = {p.name for p in (ROOT / "infusing_kit").rglob("*.py")}
    assert not modules - named, f"README's layout misses {sorted(modules - named)}"
    assert not named - modules, f"README's layout names {sorted(named - modules)}, which infusing_kit/ does not have"
    folders = re.findall(r"^(\S+/)\s", block, re.M) + re.findall(r"\s(\w+/)(?:\s|$)", block)
    inside = {d.name + "/" for d in (ROOT / "infusing_kit").rglob("*") if d.is_dir()}
    missing = [f for f in folders if not (ROOT / f).is_dir() and f not in inside]
    assert folders and not missing, missing


def test_readme_stays_a_front_door():
    lines = README.count("\n")
    assert lines <= 220, (f"README.md has {lines} lines: move guides to docs/ (and list them in docs/README.md); "
                          "README keeps the commands, the chapters, the headline result, the layout and links")


def _anchors(page):
    """GitHub's heading anchors of a markdown page (fenced code skipped; a repeated heading gets -1, -2, ...)."""
    seen, anchors, fenced = {}, set(), False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_the_anchor_rule_is_githubs():
    assert {"the-near-worlds-comparison-v4-and-v4b", "reproduce-the-papers-protocol-on-your-data",
            "make-run-and-make-test-what-they-write-and-how-long-they-take"} <= (
        _anchors(ROOT / "docs" / "results.md") | _anchors(ROOT / "docs" / "your-data.md")
        | _anchors(ROOT / "docs" / "commands.md"))
    assert "my-studytoml-the-papers-method-on-stanford-online-products-with-siglip-vit-b16" not in _anchors(
        ROOT / "docs" / "your-data.md"), "a comment inside a code block is not a heading"


def test_every_local_link_of_readme_and_docs_resolves_anchors_included():
    for page in PAGES:
        for link in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", link):
                continue
            target, _, anchor = link.partition("#")
            path = (page.parent / target) if target else page
            where = f"{page.relative_to(ROOT)} links {link}"
            assert path.exists(), f"{where}, which does not exist"
            if anchor and path.suffix == ".md":
                assert anchor in _anchors(path), f"{where}: {path.relative_to(ROOT)} has no heading with that anchor"


def test_readme_links_the_docs_contents_page_which_lists_every_page_of_docs():
    assert "](docs/README.md)" in README, "README does not link the docs contents page docs/README.md"
    listed = re.findall(r"^- \[[^\]]+\]\(([^)#/]+\.md)\): \S", CONTENTS.read_text(), re.M)
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p != CONTENTS)
    assert sorted(set(listed)) == pages, (f"docs/README.md lists {sorted(set(listed))}; docs/ has {pages}: "
                                          "one line '- [page.md](page.md): what it holds' per page")
    assert len(listed) == len(set(listed)), "docs/README.md lists a page twice"
