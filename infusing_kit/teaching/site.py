"""The static course site: executed chapters as pages, with the course around them, offline.

`render_site(executed, out_dir)` writes into out_dir:

* one page per executed chapter (nbconvert's lab template without CDN scripts, templates/site; figures embedded as
  data URIs, formulas as MathML);
* ``index.html``: "start here" (the syllabus, then chapter 00), the reference pages, and every chapter with its time
  and what it teaches (its kit-goals cell's "You will learn" list; without one, its first substantive sentence);
* ``syllabus.html``: `course.syllabus` (the two-week module day by day, each chapter's goals, time and what to
  assign), every chapter title a link to its page;
* ``method.html`` and ``glossary.html``: docs/method.md and docs/glossary.md;
* ``explorer.html``: how to open the ablation explorer (an interactive Voila page, `make explorer`: it needs a
  running kernel, so the static site only explains it and links chapter 11's page).

Every page carries the contents sidebar (the start pages, all chapters with the current one marked
``aria-current="page"``, the reference pages); a chapter page also has prev / index / next links at its top and
bottom. Nothing is fetched from the network: no page links a script, stylesheet or font outside the site.

What a chapter page shows of its cells:

* the ``parameters`` cell and papermill's ``injected-parameters`` cell are not shown; a line under the top links
  says which SMOKE (and CONFIG) the page ran with, the building machine's folders cut to their last part (as in
  every output);
* a pure check cell (`is_pure_check`) is collapsed behind a one-line verdict ("Check passed"): the page exists only
  when every cell ran, so every check on it passed. A cell that asserts *and* teaches (prints, draws, displays)
  stays open;
* an exercise's worked solution (``kit-solution``) is collapsed behind "Worked solution", under its exercise;
* the first use of each glossary term in the chapter's text links to its entry (`course.link_terms`).
"""
from __future__ import annotations

import ast
import html
import json
import re
from pathlib import Path

from . import course

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
ABSOLUTE = re.compile(r"""(["'])(/[^"']+)\1""")  # a quoted absolute path
MATH = re.compile(r"(?<![\\$])\$\$?([^$]+?)\$?\$(?!\$)")
PARAMETERS = ("parameters", "injected-parameters")  # papermill's cell tags: not shown on the site
PAGE_STYLE = ("body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
              "table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.25rem .5rem;"
              "text-align:left;vertical-align:top}code{font-size:.92em}pre{overflow-x:auto}")
# the contents: a fixed left column on a wide screen, a block at the end of the page on a narrow one
SIDEBAR_STYLE = (
    "nav.kit-sidebar{font-family:system-ui,sans-serif;font-size:.88rem;line-height:1.35;box-sizing:border-box;"
    "background:#f7f7f7;padding:.8rem 1rem}"
    "nav.kit-sidebar h2{font-size:.8rem;text-transform:uppercase;letter-spacing:.05em;color:#555;margin:.9rem 0 .3rem}"
    "nav.kit-sidebar ul{margin:0;padding-left:0;list-style:none}nav.kit-sidebar li{margin:.2rem 0}"
    "nav.kit-sidebar a{color:#1a55a0;text-decoration:none}nav.kit-sidebar a:hover{text-decoration:underline}"
    'nav.kit-sidebar a[aria-current="page"]{color:#000;font-weight:700}'
    "nav.kit-sidebar a[aria-current=\"page\"]::before{content:'\\25B8\\00a0'}"
    "@media (min-width:64rem){nav.kit-sidebar{position:fixed;top:0;left:0;bottom:0;width:15rem;overflow-y:auto;"
    "border-right:1px solid #ddd}body{margin-left:16rem!important}}"
    "@media (max-width:63.99rem){nav.kit-sidebar{margin:2rem 1rem;border:1px solid #ddd}}"
    ".kit-run{font-family:system-ui,sans-serif;font-size:.88rem;color:#444;margin:0 2rem}"
    "details.kit-check>summary,details.kit-solution>summary{cursor:pointer;font-family:system-ui,sans-serif;"
    "margin:.4rem 0;color:#2a6a2a}details.kit-solution>summary{color:#1a55a0}")
SOLUTION_TAG, CHECK_TAG = course.SOLUTION, "kit-check"
_CHECK_STATEMENTS = (ast.Assert, ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Import, ast.ImportFrom, ast.Pass)


def math_to_mathml(markdown: str) -> str:
    """$...$ (inline) and $$...$$ (display) LaTeX in a markdown cell as MathML, which browsers render without
    MathJax; a formula latex2mathml cannot parse stays as code, so the page still shows it."""
    from latex2mathml.converter import convert

    def one(m: re.Match) -> str:
        display = m.group(0).startswith("$$")
        try:
            return convert(m.group(1).strip(), display="block" if display else "inline")
        except Exception:
            return f"<code>{html.escape(m.group(0))}</code>"
    return MATH.sub(one, markdown)


def _table_pipes(markdown: str) -> str:
    """A table row with more cells than its header (a formula's norm bars, ||x|| or |g|, read as cell borders) with
    those pipes escaped: only a lone pipe between blanks (or at the row's ends) separates cells there."""
    out, width = [], None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            out.append(line)
            width = None
            continue
        cells = len(re.findall(r"(?<!\\)\|", line.strip())) - 1
        width = cells if width is None else width
        if cells != width:
            line = re.sub(r"(?<!\\)\|", lambda m: "|" if _lone(line, m.start()) else "\\|", line)
        out.append(line)
    return "\n".join(out)


def _lone(line: str, i: int) -> bool:
    return (i == 0 or line[i - 1].isspace()) and (i + 1 == len(line) or line[i + 1].isspace())


def markdown_html(text: str) -> str:
    """A markdown document (tables, definition lists, $...$ formulas as MathML) as HTML."""
    import mistune
    md = mistune.create_markdown(escape=False, plugins=["table", "def_list", "strikethrough"])
    return md(math_to_mathml(_table_pipes(text)))


def inline_html(text: str) -> str:
    """A line of markdown as inline HTML: formulas as MathML, `code`, **bold**, *italic*. An emphasis marker left
    unmatched (a sentence cut inside **...**) is dropped rather than shown as a raw '*'."""
    import mistune
    out = mistune.html(math_to_mathml(text)).strip()
    if "*" in re.sub(r"<math.*?</math>|<code>.*?</code>", "", out, flags=re.S):
        bare = re.sub(r"(`[^`]*`)|(?<!\\)\*+", lambda m: m.group(1) or "", text)  # code spans keep theirs
        out = mistune.html(math_to_mathml(bare)).strip()
    return out[3:-4] if out.startswith("<p>") and out.endswith("</p>") else out


def _source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def first_sentence(markdown: str, min_words: int = 5) -> str:
    """The first substantive sentence of a markdown cell: from its prose paragraphs (not headings, quotes, lists,
    tables, code or HTML), the first sentence of at least min_words words; '' when there is none."""
    for para in re.split(r"\n\s*\n", markdown):
        lines = [l.strip() for l in para.strip().splitlines()]
        if not lines or re.match(r"(#|>|[-*+] |\d+\. |\||```|<)", lines[0]):
            continue
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z(*`$])", " ".join(lines)):
            if len(sentence.split()) >= min_words:
                return sentence if sentence.endswith((".", "!", "?", ":")) else sentence + "."
    return ""


def chapter_summary(path: Path) -> dict:
    """A chapter's entry on the index: title, time (text, '' if unknown) and what it teaches as HTML: its
    "You will learn" goals as a list, or its first substantive sentence when it has no kit-goals cell."""
    lay = course.layer(path)
    if lay["goals"]:
        items = "".join(f"<li>{inline_html(g)}</li>" for g in lay["goals"])
        teaches = f'<span class="learn">You will learn:</span><ul class="goals">{items}</ul>'
    else:
        cells = json.loads(Path(path).read_text())["cells"]
        prose = (first_sentence(_source(c)) for c in cells if c["cell_type"] == "markdown")
        teaches = f'<p class="summary">{inline_html(next((s for s in prose if s), ""))}</p>'
    time = f"about {lay['minutes']} min of study" if lay["minutes"] else ""
    return {"title": lay["title"], "time": time, "teaches": teaches}


def _only_checks(body: list) -> bool:
    for s in body:
        if isinstance(s, (ast.If, ast.For)):
            if not (_only_checks(s.body) and _only_checks(s.orelse)):
                return False
        elif not isinstance(s, _CHECK_STATEMENTS):
            return False
    return True


def _assignments_feed(tree: ast.Module) -> bool:
    """Every name the cell assigns (except _-names) is read later in the cell."""
    loads = [(n.lineno, n.col_offset, n.id) for n in ast.walk(tree)
             if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            end = (node.end_lineno, node.end_col_offset)
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                for name in ast.walk(target):
                    if isinstance(name, ast.Name) and not name.id.startswith("_") and \
                            not any(n == name.id and (line, col) >= end for line, col, n in loads):
                        return False
    return True


def _shows(output) -> bool:
    """Whether an output shows the reader anything: printed text, a figure, a table, a widget, an error."""
    if output.get("output_type") == "stream":
        text = output.get("text", "")
        return bool(("".join(text) if isinstance(text, list) else text).strip())
    return bool(output.get("data")) or output.get("output_type") == "error"


def is_pure_check(cell) -> bool:
    """Whether a code cell only checks (collapsed on the site behind "Check passed"), by this rule:

    * its source parses as Python (a cell with IPython magics or shell escapes is not a pure check);
    * it asserts at least once;
    * every statement is an ``assert``, an assignment, an import or ``pass``, or an ``if`` / ``for`` whose body
      holds only these (a comment is no statement): no call on its own line (``print``, ``display``,
      ``plt.show``), no bare expression that Jupyter would display, no ``def``, ``with`` or ``while``;
    * every name it assigns (``_``-names aside) is read later in the cell: the assignments feed its asserts, they
      compute nothing the chapter uses afterwards;
    * its outputs show nothing: no printed text (stdout or stderr), figure, table, widget or error.

    Anything else stays open, asserts or not: a kit-versus-hand comparison that prints both numbers and then
    asserts teaches with its output. A worked solution (kit-solution) is never a check: it is collapsed behind
    its own "Worked solution" line."""
    if cell.get("cell_type") != "code" or SOLUTION_TAG in _tags(cell):
        return False
    try:
        tree = ast.parse(_source(cell))
    except SyntaxError:
        return False
    if not any(isinstance(n, ast.Assert) for n in ast.walk(tree)):
        return False
    return (_only_checks(tree.body) and _assignments_feed(tree)
            and not any(_shows(o) for o in cell.get("outputs", [])))


def _run_values(cells: list) -> str:
    """The note on what a chapter ran with: SMOKE (and CONFIG when set), from papermill's injected cell, else
    the notebook's own parameters cell; '' when neither sets SMOKE."""
    for tag in ("injected-parameters", "parameters"):
        values = {}
        for c in (c for c in cells if tag in _tags(c)):
            try:
                tree = ast.parse(_source(c))
            except SyntaxError:
                continue
            for s in tree.body:
                if isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name):
                    try:
                        values[s.targets[0].id] = ast.literal_eval(s.value)
                    except ValueError:
                        pass
        if "SMOKE" in values:
            note = f"<code>SMOKE = {values['SMOKE']!r}</code>" + (
                ": tiny schedules, as in CI; the numbers on this page are not the teaching mode's"
                if values["SMOKE"] else " (teaching mode)")
            if values.get("CONFIG"):
                shown = repr(values["CONFIG"])
                shown = ABSOLUTE.sub(lambda m: f"{m.group(1)}.../{Path(m.group(2)).name}{m.group(1)}", shown)
                note += f", with <code>CONFIG = {html.escape(shown)}</code>"
            return f'<p class="kit-run">This page ran with {note}.</p>'
    return ""


def _scrub(output, folders: list[str]) -> None:
    """An output's text without the given absolute folders (each replaced by .../its last part)."""
    def clean(text: str) -> str:
        for f in folders:
            text = text.replace(f, f".../{Path(f).name}")
        return text
    if "text" in output:
        output["text"] = clean("".join(output["text"]) if isinstance(output["text"], list) else output["text"])
    for mime, value in list(output.get("data", {}).items()):
        if mime.startswith("text/") or mime.endswith(("json", "javascript", "svg+xml")):
            output["data"][mime] = clean("".join(value) if isinstance(value, list) else value) \
                if isinstance(value, (str, list)) else value


REFERENCE = [("method.html", "The method, protocol and metrics"), ("glossary.html", "Glossary"),
             ("explorer.html", "The ablation explorer")]


def sidebar(chapters: list[dict], current: str) -> str:
    """The contents on every page: start pages, all chapters (the current page marked aria-current="page"), and
    the reference pages."""
    def link(page: str, text: str) -> str:
        mark = ' aria-current="page"' if page == current else ""
        return f'<li><a href="{page}"{mark}>{text}</a></li>'
    return ('<nav class="kit-sidebar" aria-label="Course contents">'
            '<h2>The course</h2><ul>' + link("index.html", "Start here (all chapters)")
            + link("syllabus.html", "Syllabus: the two-week module") + "</ul>"
            '<h2>Chapters</h2><ul class="kit-chapters">'
            + "".join(link(c["page"], inline_html(c["title"])) for c in chapters) + "</ul>"
            '<h2>Reference</h2><ul>' + "".join(link(p, t) for p, t in REFERENCE) + "</ul></nav>")


def _nav(chapters: list[dict], i: int) -> str:
    """The links of chapter i's page: the previous chapter, the index, the syllabus and glossary, the next."""
    link = lambda j, rel, text: (f'<a rel="{rel}" href="{chapters[j]["page"]}">{text}</a>'
                                 if 0 <= j < len(chapters) else "")
    parts = [link(i - 1, "prev", f"&larr; {html.escape(chapters[i - 1]['title'])}" if i else ""),
             '<a rel="index" href="index.html">all chapters</a> &middot; <a href="syllabus.html">syllabus</a>'
             ' &middot; <a href="glossary.html">glossary</a>',
             link(i + 1, "next", f"{html.escape(chapters[i + 1]['title'])} &rarr;" if i + 1 < len(chapters) else "")]
    return ('<nav class="chapter-nav" style="display:flex;justify-content:space-between;gap:1rem;margin:1rem 2rem;'
            'font-family:system-ui,sans-serif">' + "".join(f"<span>{p}</span>" for p in parts) + "</nav>")


def _page(title: str, body: str, current: str, chapters: list[dict], style: str = "") -> str:
    top = "" if current == "index.html" else (
        '<p class="kit-top"><a rel="index" href="index.html">all chapters</a> &middot; '
        '<a href="syllabus.html">syllabus</a></p>\n')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>infusing_kit: {html.escape(title)}</title>\n<style>{PAGE_STYLE}{SIDEBAR_STYLE}{style}</style>"
            f"</head><body>\n<main>\n{top}{body}\n</main>\n{sidebar(chapters, current)}\n</body></html>\n")


def _chapter_page(nb: Path, i: int, chapters: list[dict], exporter) -> str:
    import nbformat
    book = nbformat.read(str(nb), as_version=4)
    params = [c for c in book.cells if set(PARAMETERS) & set(_tags(c))]
    injected = [c for c in params if "injected-parameters" in _tags(c)]
    folders = sorted({m.group(2) for c in injected for m in ABSOLUTE.finditer(c.source)}, key=len, reverse=True)
    note = _run_values(params)
    hidden = {id(c) for c in params}
    book.cells = [c for c in book.cells if id(c) not in hidden]
    terms, seen = course.glossary_terms(), set()
    for cell in book.cells:
        for out in cell.get("outputs", []):  # the building machine's folders cut to their last part
            _scrub(out, folders)
        if is_pure_check(cell):  # collapsed behind a verdict (the template)
            cell.metadata.setdefault("tags", []).append(CHECK_TAG)
        if cell.cell_type == "markdown":
            cell.source = math_to_mathml(course.link_terms(cell.source, terms, seen))
    body, _ = exporter.from_notebook_node(book, resources={"metadata": {"name": nb.stem}, "kit_css": SIDEBAR_STYLE})
    nav, top = _nav(chapters, i), body.index(">", body.index("<body")) + 1  # right after <body ...>, and at the end
    end = body.rindex("</body>")
    return body[:top] + nav + note + body[top:end] + nav + sidebar(chapters, chapters[i]["page"]) + body[end:]


def render_site(executed: list[Path], out_dir: Path, seconds: dict[str, float] | None = None) -> Path:
    """The course site for the executed chapters (in order) in out_dir (the module docstring lists its pages and
    rules); seconds: each chapter's measured run time by file name, shown on the syllabus. Returns the index."""
    from nbconvert import HTMLExporter
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(template_name="site", extra_template_basedirs=[str(Path(__file__).parent / "templates")])
    executed = [Path(p) for p in executed]
    chapters = [{"path": p, "page": p.stem + ".html", **chapter_summary(p)} for p in executed]
    for i, ch in enumerate(chapters):
        (out_dir / ch["page"]).write_text(_chapter_page(ch["path"], i, chapters, exporter))

    links = {c["path"].name: c["page"] for c in chapters}
    write = lambda page, title, body, style="": (out_dir / page).write_text(_page(title, body, page, chapters, style))
    write("syllabus.html", "syllabus", markdown_html(course.syllabus(executed, seconds, links=links)))
    write("method.html", "the method", markdown_html((DOCS / "method.md").read_text()))
    glossary = re.sub(r"<dt>(.*?)</dt>", lambda m: f'<dt id="{course.anchor(html.unescape(m.group(1)))}">{m.group(1)}</dt>',
                      markdown_html((DOCS / "glossary.md").read_text()))
    write("glossary.html", "glossary", glossary,
          "dt{font-weight:600;margin-top:.8rem}dd{margin-left:1.5rem}")
    eleven = next((c for c in chapters if c["page"].startswith("11")), None)
    write("explorer.html", "the ablation explorer", _explorer(eleven))

    first = next((c for c in chapters if c["page"].startswith("00")), chapters[0] if chapters else None)
    start = ('<section id="start-here"><h2>Start here</h2><p>New to the course? Read the '
             '<a href="syllabus.html">syllabus</a> first: what each chapter teaches, how long it takes, the order '
             "for a two-week module and the exercises to assign. Then open "
             + (f'<a href="{first["page"]}">{inline_html(first["title"])}</a>' if first else "the first chapter")
             + " and follow the <em>next</em> links; the words the chapters use are in the "
             '<a href="glossary.html">glossary</a>, the formulas and the protocol in '
             '<a href="method.html">the method</a>.</p></section>\n')
    items = "\n".join(
        f'<li><a class="chapter" href="{c["page"]}">{inline_html(c["title"])}</a>'
        + (f' <span class="time">({c["time"]})</span>' if c["time"] else "") + f'<div>{c["teaches"]}</div></li>'
        for c in chapters)
    write("index.html", "the chapters",
          "<h1>infusing_kit: knowledge-preserving fine-tuning of vision-language models</h1>\n" + start
          + "<p>The executed chapters of the kit, in order. Each page opens without Jupyter, and nothing on this "
          'site is fetched from the internet. Reference: <a href="method.html">the method</a>, '
          '<a href="glossary.html">glossary</a>, <a href="explorer.html">the ablation explorer</a>.</p>\n'
          f'<h2>The chapters</h2>\n<ol class="chapters">\n{items}\n</ol>',
          "ol.chapters{list-style:none;padding-left:0}ol.chapters>li{margin:.9rem 0}.time{color:#555;font-size:.9rem}"
          "ul.goals{margin:.2rem 0;color:#333;font-size:.92rem}.learn{color:#555;font-size:.9rem}")
    return out_dir / "index.html"


def _explorer(eleven: dict | None) -> str:
    """The explorer page: what the ablation explorer is and how to open it (it needs a running kernel)."""
    chapter = (f'<a href="{eleven["page"]}">{inline_html(eleven["title"])}</a>' if eleven
               else "chapter 11 (notebooks/11_ablation_explorer.ipynb)")
    return (
        "<h1>The ablation explorer</h1>\n"
        "<p>The explorer shows every run of a comparison and every trial of its searches with widgets: pick methods, "
        "seeds and the two axes of the trade-off, a run for its metric table and retrieval gallery, a method's "
        f"searched strength for its validation scores. It is taught in {chapter}, whose page here shows what it "
        "drew when this site was built. Its widgets need a running Python kernel, so this static site cannot run "
        "them; open it on your own machine in one of two ways.</p>\n"
        "<h2>As a page, without code (Voila)</h2>\n"
        "<pre><code>make explorer</code></pre>\n"
        "<p>in the kit's folder starts Voila on <code>notebooks/explorer_page.ipynb</code> and serves the explorer "
        "at <code>http://127.0.0.1:8866</code>: open that address in your browser. <code>make explorer PORT=9000"
        "</code> picks another port; <code>make explorer COMPARISON=DIR</code> explores your own comparison (a "
        "<code>compare --out</code> folder, or a registry file) instead of the one committed with the kit. The "
        "page is served from your machine only and fetches nothing from the internet.</p>\n"
        "<h2>In JupyterLab</h2>\n<pre><code>make lab</code></pre>\n"
        "<p>and open <code>11_ablation_explorer.ipynb</code>: the same explorer with its code, as the chapter "
        "teaches it.</p>")
