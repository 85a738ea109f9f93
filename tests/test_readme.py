"""README is the front door: its layout section matches the tree, its links resolve, and the long guides live in
docs/ (each linked from README)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


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


def test_every_local_link_of_readme_and_docs_resolves():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links {target}, which does not exist"


def test_readme_links_every_guide_in_docs():
    for guide in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{guide.name})" in README, f"README does not link docs/{guide.name}"
