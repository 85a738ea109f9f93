"""Execute the notebook series headless with papermill, and render it as a static course site.

  python -m infusing_kit.notebook_runner --out build/notebooks [--smoke] [--only 02 03] [--html build/html]
                                         [--figures build/figures]

Each notebook runs in a fresh kernel with its `parameters` cell overridden (SMOKE, RESULTS_DIR, FIGURES_DIR);
executed copies land in --out, the source notebooks stay clean. The kernel draws inline (no MPLBACKEND is
forced on it), so every figure a chapter shows is in its executed copy; the runner counts them per chapter.
A failing cell stops the run with that cell's error and the path of the executed copy, which shows
everything up to the failure. --html renders the executed chapters into a site (one page per chapter,
figures embedded, and an index page) that opens without Jupyter.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
IMAGE_TYPES = ("image/png", "image/svg+xml", "image/jpeg")


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
    return paths


def _kernel_config():
    """IPC transport between papermill and its local kernel: no TCP ports, and no "running over TCP without
    encryption" warning from every chapter."""
    from traitlets.config import Config
    c = Config()
    c.KernelManager.transport = "ipc"
    return c


CELL_TIMEOUT = 4 * 3600   # seconds: a hung kernel, not a slow machine (`make run` failed at 1,800 s under load)


def run_notebook(path: Path, out_dir: Path, smoke: bool, results_dir: Path | None = None,
                 figures_dir: Path | None = None, timeout: int | None = CELL_TIMEOUT,
                 parameters: dict | None = None) -> float:
    """Execute one notebook; returns its wall time in seconds. Raises papermill's error on a failing cell.
    parameters: more values for its `parameters` cell (e.g. CONFIG, the study file it runs on). timeout: seconds a
    cell may run (None: no limit); the default only catches a hung kernel, since a busy laptop runs a chapter's
    longest cell (a live search, 10-30 min idle) several times slower and slowness must not become failure."""
    import papermill as pm
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"SMOKE": smoke, **(parameters or {})}
    if results_dir is not None:
        params["RESULTS_DIR"] = str(Path(results_dir).resolve())
    if figures_dir is not None:
        params["FIGURES_DIR"] = str(Path(figures_dir).resolve())
    t0 = time.time()
    pm.execute_notebook(str(path), str(out_dir / path.name), parameters=params, kernel_name="python3",
                        cwd=str(path.parent), progress_bar=False, execution_timeout=timeout, config=_kernel_config())
    return time.time() - t0


def count_images(executed: Path) -> int:
    """Figures a reader sees in an executed notebook: image outputs of its code cells (widgets' own outputs
    included)."""
    nb = json.loads(Path(executed).read_text())
    n = 0
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            n += sum(t in out.get("data", {}) for t in IMAGE_TYPES)
    return n


def chapter_line(path: Path) -> tuple[str, str]:
    """(title, one-line summary) of a chapter: its first heading and the first sentence after it."""
    nb = json.loads(Path(path).read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        lines = "".join(cell["source"]).splitlines()
        title = next((l.lstrip("# ").strip() for l in lines if l.startswith("#")), Path(path).stem)
        body = " ".join(l.strip() for l in lines if l.strip() and not l.startswith("#"))
        first = body.split(". ")[0].strip()
        return title, (first if first.endswith(".") else first + ".") if first else ""
    return Path(path).stem, ""


GLOSSARY = ROOT / "docs" / "glossary.md"
PAGE_STYLE = "body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;line-height:1.45}"
CHECK = re.compile(r"^\s*assert ", re.M)  # a check cell: it asserts the chapter's phenomenon
ABSOLUTE = re.compile(r"""(["'])(/[^"']+)\1""")  # a quoted absolute path
MATH = re.compile(r"(?<![\\$])\$\$?([^$]+?)\$?\$(?!\$)")


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


def render_site(executed: list[Path], out_dir: Path) -> Path:
    """One HTML page per executed chapter and an index page listing the chapters in order with one line each.
    Returns the index path. Every chapter page links to the index and to the previous and next chapters (top and
    bottom); the index's summaries are rendered (markdown as HTML, formulas as MathML); papermill's injected
    parameters cell shows its values with absolute folders cut to their last part (no path of the building
    machine on a page); check cells (those that assert) are collapsed behind a one-line verdict. The pages
    fetch nothing: the kit's template (templates/site) is nbconvert's lab template
    without CDN scripts, figures are embedded as data URIs."""
    import nbformat
    from nbconvert import HTMLExporter
    out_dir.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(template_name="site", extra_template_basedirs=[str(Path(__file__).parent / "templates")])
    chapters = [(nb, nb.stem + ".html", *chapter_line(nb)) for nb in executed]
    items = []
    for i, (nb, page, title, line) in enumerate(chapters):
        book = nbformat.read(str(nb), as_version=4)
        injected = [c for c in book.cells if "injected-parameters" in c.get("metadata", {}).get("tags", [])]
        folders = sorted({m.group(2) for c in injected for m in ABSOLUTE.finditer(c.source)}, key=len, reverse=True)
        for cell in book.cells:  # the building machine's folders (papermill's injected values) cut to their last part
            if cell.cell_type == "code" and CHECK.search(cell.source):  # collapsed behind a verdict (the template)
                cell.metadata.setdefault("tags", []).append("kit-check")
            if cell in injected:
                cell.source = ABSOLUTE.sub(lambda m: f'{m.group(1)}.../{Path(m.group(2)).name}{m.group(1)}', cell.source)
            for out in cell.get("outputs", []):
                _scrub(out, folders)
        for cell in book.cells:
            if cell.cell_type == "markdown":
                cell.source = math_to_mathml(cell.source)
        body, _ = exporter.from_notebook_node(book, resources={"metadata": {"name": nb.stem}})
        nav, top = _nav(chapters, i), body.index(">", body.index("<body")) + 1  # right after <body ...>, and at the end
        end = body.rindex("</body>")
        (out_dir / page).write_text(body[:top] + nav + body[top:end] + nav + body[end:])
        items.append(f'<li><a href="{page}">{_inline(title)}</a><br><span>{_inline(line)}</span></li>')
    import mistune
    glossary = mistune.create_markdown(plugins=["def_list"])(math_to_mathml(GLOSSARY.read_text()))
    (out_dir / "glossary.html").write_text(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>infusing_kit: glossary</title>\n"
        f"<style>{PAGE_STYLE}dt{{font-weight:600;margin-top:.8rem}}dd{{margin-left:1.5rem}}</style></head><body>\n"
        '<p><a rel="index" href="index.html">all chapters</a></p>\n' + glossary + "\n</body></html>\n")
    index = out_dir / "index.html"
    index.write_text(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>infusing_kit: the chapters</title>\n"
        f"<style>{PAGE_STYLE}li{{margin:.7rem 0}}span{{color:#444;font-size:.92rem}}</style></head><body>\n"
        "<h1>infusing_kit: knowledge-preserving fine-tuning of vision-language models</h1>\n"
        "<p>The executed chapters of the kit, in order. Each page opens without Jupyter. The words they use: "
        '<a href="glossary.html">glossary</a>.</p>\n<ol>\n'
        + "\n".join(items) + "\n</ol>\n</body></html>\n")
    return index


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


def _inline(text: str) -> str:
    """A line of markdown (with $...$ formulas) as inline HTML: formulas as MathML, `code`, **bold**, *italic*."""
    import mistune
    out = mistune.html(math_to_mathml(text)).strip()
    return out[3:-4] if out.startswith("<p>") and out.endswith("</p>") else out


def _nav(chapters: list[tuple], i: int) -> str:
    """The links of chapter i's page: the index, the previous and the next chapter."""
    link = lambda j, rel, arrow: (f'<a rel="{rel}" href="{chapters[j][1]}">{arrow} {html.escape(chapters[j][2])}</a>'
                                  if 0 <= j < len(chapters) else "")
    parts = [link(i - 1, "prev", "&larr;"), '<a rel="index" href="index.html">all chapters</a> &middot; '
             '<a href="glossary.html">glossary</a>', link(i + 1, "next", "")]
    if parts[2]:
        parts[2] = parts[2].replace("</a>", " &rarr;</a>")
    return ('<nav class="chapter-nav" style="display:flex;justify-content:space-between;gap:1rem;margin:1rem 2rem;'
            'font-family:system-ui,sans-serif">' + "".join(f"<span>{p}</span>" for p in parts) + "</nav>")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "build" / "notebooks"), help="folder for the executed copies")
    ap.add_argument("--smoke", action="store_true", help="SMOKE=True: tiny settings, as in CI")
    ap.add_argument("--only", nargs="*", help="notebook number prefixes to run, e.g. 02 03")
    ap.add_argument("--figures", help="FIGURES_DIR for the chapters (default: the notebooks' own, build/figures)")
    ap.add_argument("--results", help="RESULTS_DIR for the chapters (default: the notebooks' own, runs/notebooks)")
    ap.add_argument("--html", help="also render the executed chapters into a static site in this folder")
    args = ap.parse_args(argv)
    paths = notebook_paths(args.only)
    if not paths:
        print(f"no notebooks matched in {NOTEBOOKS}", file=sys.stderr)
        return 1
    total, executed = 0.0, []
    for p in paths:
        print(f"running {p.name} (SMOKE={args.smoke}) ...", flush=True)
        seconds = run_notebook(p, Path(args.out), args.smoke, results_dir=args.results, figures_dir=args.figures)
        total += seconds
        executed.append(Path(args.out) / p.name)
        print(f"  done in {seconds:.0f} s, {count_images(executed[-1])} figures -> {executed[-1]}", flush=True)
    print(f"{len(paths)} notebooks in {total:.0f} s")
    if args.html:
        index = render_site(executed, Path(args.html))
        size = sum(f.stat().st_size for f in Path(args.html).glob("*.html"))
        print(f"site: {index} ({len(executed)} chapters, {size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
