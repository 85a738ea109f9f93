"""The static course site's rules (`infusing_kit.teaching.site`), without a browser and without executing a notebook: the
syllabus page links every chapter, every page carries the contents sidebar with its own entry marked, the index
summaries say what a chapter teaches (no raw markdown), only pure check cells collapse, the parameters cells are
not shown, the reference pages exist, and nothing is fetched from the network. Small hand-made chapters, plus the
kit's own chapters rendered unexecuted (a few seconds)."""
import re
import shutil
from html.parser import HTMLParser

import nbformat
import pytest

from infusing_kit.teaching import course
from infusing_kit.teaching.site import _table_pipes, is_pure_check, markdown_html, render_site

GOALS = ("**You will learn**\n- to tell a *pure* check from a **teaching** cell\n- the formula $x^2$\n\n"
         "**Before you start:** nothing.\n\n**Time:** about 15 min of study")


class Page(HTMLParser):
    """What a test needs of a page: its links (href, rel, aria-current, inside which nav), its text outside
    style/script, the classes of its details elements, and every src/href of a non-anchor element."""

    def __init__(self, text: str):
        super().__init__()
        self.links, self.details, self.resources, self.navs, self._text = [], [], [], [], []
        self._skip, self._nav = 0, []
        self.feed(text)
        self.text = "".join(self._text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("style", "script"):
            self._skip += 1
        if tag == "nav":
            self._nav.append(a.get("class", ""))
            self.navs.append(a.get("class", ""))
        if tag == "a":
            self.links.append({"href": a.get("href"), "rel": a.get("rel"), "current": a.get("aria-current"),
                               "nav": self._nav[-1] if self._nav else None})
        elif a.get("src") or a.get("href"):
            self.resources.append((tag, a.get("src") or a.get("href")))
        if tag == "details":
            self.details.append(a.get("class"))

    def handle_endtag(self, tag):
        if tag in ("style", "script"):
            self._skip -= 1
        if tag == "nav" and self._nav:
            self._nav.pop()

    def handle_data(self, data):
        if not self._skip:
            self._text.append(data)


def _chapter(tmp_path, name: str, cells: list, goals: str | None = GOALS):
    nb = nbformat.v4.new_notebook()
    title = nbformat.v4.new_markdown_cell(f"# {name[:2]} · Chapter {name[:2]}\n\nThe paper fine-tunes CLIP/SigLIP. "
                                          "No such weights can be downloaded here, so the kit brings its own world.")
    nb.cells = [title] + ([nbformat.v4.new_markdown_cell(goals, metadata={"tags": [course.GOALS]})] if goals else [])
    nb.cells += cells
    path = tmp_path / "nbs" / f"{name}.ipynb"
    path.parent.mkdir(exist_ok=True)
    nbformat.write(nb, path)
    return path


def _code(source: str, *outputs, tags=()):
    return nbformat.v4.new_code_cell(source, outputs=list(outputs), metadata={"tags": list(tags)} if tags else {})


def _stdout(text: str):
    return nbformat.v4.new_output("stream", name="stdout", text=text)


@pytest.fixture(scope="module")
def small_site(tmp_path_factory):
    """Three small chapters: parameters and injected cells, a teaching check (computes, prints, asserts), a pure
    check, a worked solution; the third chapter has no goals cell and opens with a markdown list."""
    tmp = tmp_path_factory.mktemp("site")
    root = tmp / "build" / "results"
    first = _chapter(tmp, "00_first", [
        _code("SMOKE = False  # PARAMS-CELL-MARKER\nRESULTS_DIR = '../runs'", tags=["parameters"]),
        _code(f'# Parameters\nSMOKE = True  # INJECTED-CELL-MARKER\nRESULTS_DIR = "{root}"',
              tags=["injected-parameters"]),
        _code("kit = 2 * 3  # TEACHING-CELL\nprint(f'kit {kit}, by hand {6}')\nassert kit == 6",
              _stdout("kit 6, by hand 6\n")),
        _code("# PURE-CHECK-CELL: the phenomenon holds\nratio = 6 / 3\nassert ratio == 2, ratio"),
        nbformat.v4.new_markdown_cell("### Exercise 1 · Double\nDouble it.", metadata={"tags": [course.EXERCISE]}),
        _code("y = 2 * 6  # SOLUTION-CELL\nprint(y)\nassert y == 12", _stdout("12\n"), tags=[course.SOLUTION]),
    ])
    second = _chapter(tmp, "01_second", [_code("assert True  # SECOND-CHECK")])
    third = _chapter(tmp, "02_third", [], goals=None)
    nb = nbformat.read(third, as_version=4)  # no goals: the summary is the first substantive sentence
    nb.cells[0].source = ("# 02 · Chapter 02\n\n* **generic domain**: a shape\n* **fine**: a shade\n\n"
                          "Keep the *outputs* close instead of the weights, on **generic** images.")
    nbformat.write(nb, third)
    site = tmp / "site"
    index = render_site([first, second, third], site, seconds={first.name: 12.0})
    pages = {p.name: p.read_text() for p in site.glob("*.html")}
    return {"index": index, "site": site, "pages": pages, "root": root,
            "chapters": [first.stem + ".html", second.stem + ".html", third.stem + ".html"]}


def test_the_site_has_its_pages(small_site):
    assert small_site["index"] == small_site["site"] / "index.html"
    assert set(small_site["pages"]) == {"index.html", "syllabus.html", "method.html", "glossary.html",
                                        "explorer.html", *small_site["chapters"]}


def test_the_syllabus_links_every_chapter_and_says_what_to_assign(small_site):
    page = Page(small_site["pages"]["syllabus.html"])
    main = {link["href"] for link in page.links if link["nav"] is None}
    assert set(small_site["chapters"]) <= main, main
    assert "A two-week module" in page.text and "Exercise 1 · Double" in page.text and "Assign" in page.text
    assert "runs in 12 s on this build" in page.text
    assert page.text.count("about 15 min of study") == 2  # each chapter's time (the third has none)


@pytest.mark.parametrize("name", ["index.html", "syllabus.html", "method.html", "glossary.html", "explorer.html",
                                  "00_first.html", "01_second.html", "02_third.html"])
def test_every_page_has_the_contents_with_its_own_entry_marked(small_site, name):
    page = Page(small_site["pages"][name])
    side = [link for link in page.links if link["nav"] == "kit-sidebar"]
    hrefs = [link["href"] for link in side]
    assert all(c in hrefs for c in small_site["chapters"]), hrefs
    assert {"index.html", "syllabus.html", "method.html", "glossary.html", "explorer.html"} <= set(hrefs)
    assert [link["href"] for link in side if link["current"] == "page"] == [name]
    assert any(link["href"] == "syllabus.html" and link["nav"] != "kit-sidebar" for link in page.links), \
        "the syllabus is linked from the page itself, not only from the contents"


def test_chapter_pages_keep_their_prev_next_links(small_site):
    page = Page(small_site["pages"]["01_second.html"])
    nav = [link for link in page.links if link["nav"] == "chapter-nav"]
    assert [link["href"] for link in nav if link["rel"] == "prev"] == ["00_first.html"] * 2  # top and bottom
    assert [link["href"] for link in nav if link["rel"] == "next"] == ["02_third.html"] * 2
    assert [link["href"] for link in nav if link["rel"] == "index"] == ["index.html"] * 2


def test_the_index_starts_here_and_summarises_without_raw_markdown(small_site):
    html = small_site["pages"]["index.html"]
    page = Page(html)
    hrefs = [link["href"] for link in page.links if link["nav"] is None]
    assert hrefs[:2] == ["syllabus.html", "00_first.html"], hrefs  # "start here": the syllabus, then chapter 00
    assert {"method.html", "glossary.html", "explorer.html"} <= set(hrefs)
    assert "Start here" in page.text
    assert "*" not in page.text, page.text
    assert "to tell a pure check from a teaching cell" in page.text  # the goals, emphasis rendered
    assert "<em>pure</em>" in html and "<strong>teaching</strong>" in html and "<math" in html
    assert "The paper fine-tunes CLIP/SigLIP." not in page.text  # the goals, not the first line
    assert "Keep the outputs close instead of the weights, on generic images." in page.text  # no goals: prose
    assert "about 15 min of study" in page.text


def test_only_pure_check_cells_collapse(small_site):
    html = small_site["pages"]["00_first.html"]
    blocks = re.findall(r'<details class="kit-check">.*?</details>', html, re.S)
    assert len(blocks) == 1 and "PURE-CHECK-CELL" in blocks[0], blocks
    assert "TEACHING-CELL" in html and "kit 6, by hand 6" in html
    opened = html.split('<details class="kit-check">')[0]
    assert "TEACHING-CELL" in opened  # before the collapsed check, outside any details
    solutions = re.findall(r'<details class="kit-solution">.*?</details>', html, re.S)
    assert len(solutions) == 1 and "SOLUTION-CELL" in solutions[0]
    assert "SOLUTION-CELL" not in "".join(blocks)
    assert '<details class="kit-check">' in small_site["pages"]["01_second.html"]


def test_the_parameters_cells_are_not_shown(small_site):
    html = small_site["pages"]["00_first.html"]
    assert "PARAMS-CELL-MARKER" not in html and "INJECTED-CELL-MARKER" not in html
    assert "celltag_parameters" not in html and "celltag_injected-parameters" not in html
    assert "SMOKE = True" in Page(html).text  # what it ran with, in one line under the links
    assert str(small_site["root"]) not in html


def test_the_reference_pages_render_offline(small_site):
    pages = small_site["pages"]
    assert Page(pages["method.html"]).text.count("L2-SP") >= 2 and "<table>" in pages["method.html"]
    assert pages["glossary.html"].count("<dt id=") >= 15
    for term, anchor in course.glossary_terms().items():  # every entry a chapter can link to has its id
        assert f'<dt id="{anchor}">' in pages["glossary.html"], term
    explorer = Page(pages["explorer.html"]).text
    assert "make explorer" in explorer and "Voila" in explorer
    for name, html in pages.items():
        page = Page(html)
        assert not [r for r in page.resources if re.match(r"(https?:)?//", r[1])], (name, page.resources)
        assert "<script src" not in html and "cdn" not in html.lower(), name
        assert not [link for link in page.links if link["href"] and re.match(r"(https?:)?//", link["href"])], name


def test_the_site_template_drops_every_script_from_a_cdn():
    from pathlib import Path

    from infusing_kit import teaching
    folder = Path(teaching.__file__).parent / "templates" / "site"
    template = (folder / "index.html.j2").read_text()
    for block in ("html_head_js_requirejs", "jupyter_widgets", "html_head_js_mathjax", "html_head_js_mermaidjs"):
        assert re.search(rf"{{%-? block {block} -?%}}{{%-? endblock {block} -?%}}", template), block  # emptied
    for f in folder.iterdir():
        assert not re.search(r"https?://", f.read_text()), f


# ---------------------------------------------------------------------------- which cells are pure checks
@pytest.mark.parametrize("source, outputs, pure", [
    ("assert x > 0", [], True),
    ("# a comment\nn = len(a)\nassert n > 2, n", [], True),
    ("import numpy as np\nfor v in values:\n    assert np.isfinite(v)\nif SMOKE:\n    assert x > 0", [], True),
    ("check.x.value = 'generic'\nafter = check.draw()\nassert after", [], True),  # a widget driven, then asserted
    ("assert x > 0", [_stdout("a warning\n")], False),  # it printed something: open
    ("kit = f(1)\nprint(kit)\nassert kit == 1", [_stdout("1\n")], False),  # the kit-versus-hand comparison
    ("kit = f(1)\nprint(kit)\nassert kit == 1", [], False),  # (unexecuted: the print still teaches)
    ("y = f(1)\nassert x > 0", [], False),  # y is computed for later, not for the assert
    ("assert x > 0\nplt.show()", [], False),
    ("assert x > 0\nx", [], False),  # a displayed expression
    ("def g():\n    assert True\ng()", [], False),
    ("%time assert x", [], False),  # IPython syntax
    ("x = 1\ny = x + 1", [], False),  # no assert: not a check
])
def test_is_pure_check(source, outputs, pure):
    assert is_pure_check(_code(source, *outputs)) is pure


def test_a_solution_is_never_a_check():
    assert not is_pure_check(_code("assert True", tags=[course.SOLUTION]))


def test_a_figure_keeps_a_check_open():
    fig = nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})
    assert not is_pure_check(_code("assert x", fig))


def test_table_pipes_of_a_formula_are_not_cell_borders():
    text = "| a | formula |\n|---|---|\n| | mean ||s - t||^2 |\n| b | the |g| rule |\n"
    assert "\\|\\|s - t\\|\\|" in _table_pipes(text)
    html = markdown_html(text)
    assert html.count("<tr>") == 3 and "||s - t||^2" in html and "the |g| rule" in html


# ---------------------------------------------------------------------------- the kit's own chapters
@pytest.fixture(scope="module")
def kit_site(tmp_path_factory):
    """The kit's chapters rendered as they are in the repository (unexecuted: no outputs)."""
    tmp = tmp_path_factory.mktemp("kit-site")
    copies = []
    for p in course.chapters():
        copies.append(tmp / "nbs" / p.name)
        copies[-1].parent.mkdir(exist_ok=True)
        shutil.copy(p, copies[-1])
    index = render_site(copies, tmp / "site")
    return {"index": index, "site": tmp / "site", "chapters": [p.stem + ".html" for p in copies]}


def test_the_kit_index_says_what_each_chapter_teaches(kit_site):
    html = kit_site["index"].read_text()
    page = Page(html)
    body = page.text.split("The chapters", 1)[-1]
    assert "*" not in page.text and "$" not in body
    assert "The paper fine-tunes CLIP/SigLIP" not in page.text
    for p in course.chapters():
        lay = course.layer(p)
        assert lay["title"] in page.text
        assert f"about {lay['minutes']} min of study" in page.text
        entry = html.split(f'class="chapter" href="{p.stem}.html"', 1)[1].split("</ul>", 1)[0]
        assert entry.count("<li>") == len(lay["goals"]) >= 2, entry


def test_the_kit_syllabus_links_every_chapter(kit_site):
    page = Page((kit_site["site"] / "syllabus.html").read_text())
    main = [link["href"] for link in page.links if link["nav"] is None]
    assert set(kit_site["chapters"]) <= set(main)
    for day in course.MODULE:  # the two-week module's table
        assert re.search(rf"\b{day}\b", page.text)


def test_the_kit_chapters_show_no_parameters_cell_and_keep_teaching_checks_open(kit_site):
    for name in kit_site["chapters"]:
        html = (kit_site["site"] / name).read_text()
        assert "celltag_parameters" not in html and "tiny schedule for CI" not in html, name
    html = (kit_site["site"] / "01_retrieval_metrics.html").read_text()
    assert '<details class="kit-check">' not in html  # its checks print what they compare: all open
    assert "kit = metrics.retrieval_metrics(emb, labels, k=k)" in Page(html).text  # the comparison, shown


def test_an_unmatched_emphasis_marker_is_dropped_not_shown():
    from infusing_kit.teaching.site import inline_html
    assert inline_html("plain *em* and **strong**") == "plain <em>em</em> and <strong>strong</strong>"
    cut = inline_html("a sentence cut inside **bold, with `a*b` in code")
    assert "*" not in cut.replace("<code>a*b</code>", ""), cut
    assert "<code>a*b</code>" in cut


def test_make_run_says_each_chapters_expected_time_and_how_to_go_on_after_a_failure(tmp_path, monkeypatch, capsys):
    from infusing_kit.teaching import notebook_runner as nr
    ch04 = next(p for p in nr.notebook_paths() if p.name.startswith("04"))
    assert "runs in" in nr.expected(ch04) and "min" in nr.expected(ch04)

    class CellError(Exception):  # papermill's PapermillExecutionError carries these
        cell_index, exec_count, ename, evalue = 13, 7, "CellTimeoutError", "A cell timed out after 14400 seconds"

    def run(p, out, smoke, **kw):
        if p.name.startswith("05"):
            raise CellError()
        out.mkdir(parents=True, exist_ok=True)
        (out / p.name).write_text(p.read_text())
        return 1.0
    monkeypatch.setattr(nr, "run_notebook", run)
    assert nr.main(["--out", str(tmp_path), "--from", "04", "--only", "04", "05", "06"]) == 1
    out, err = capsys.readouterr()
    assert "[1/3] running 04_" in out and "runs in" in out and "06_" not in out
    assert "05_" in err and "cell 13" in err and "CellTimeoutError" in err and "--from 05" in err
    assert "reused" in err


def test_the_first_use_of_each_glossary_term_links_to_its_entry():
    terms = course.glossary_terms()
    assert terms["L2-SP"] == "term-l2-sp" and terms["near world"] == terms["far world"] and len(terms) >= 40
    seen = set()
    text = ("# EWC and L2-SP\nWe compare L2-SP (`L2-SP` in code, $L2-SP$ in a formula) with EWC; L2-SP again.\n"
            "<details><summary>Answer</summary>gain kept</details>\nThe gain kept, then the gain.")
    out = course.link_terms(text, terms, seen)
    assert out.count("glossary.html#term-l2-sp") == 1 and "We compare [L2-SP](glossary.html#term-l2-sp) (" in out
    assert "# EWC and L2-SP\n" in out and "with [EWC](glossary.html#term-ewc);" in out  # headings stay as they are
    assert "`L2-SP` in code, $L2-SP$ in a formula" in out and "gain kept</details>" in out
    assert "The [gain kept](glossary.html#term-gain-kept), then the [gain](glossary.html#term-gain)." in out
    assert course.link_terms("EWC and L2-SP", terms, seen) == "EWC and L2-SP"  # once per page
