"""Every notebook runs headless with papermill in SMOKE mode (fresh kernel, shared results folder), shows its
figures, and the executed chapters render into a course site that a real browser displays.

A failing cell, including a chapter's assertion that its phenomenon shows, fails the test with the cell's
traceback (papermill's PapermillExecutionError). A drawing chapter whose executed copy holds fewer figures than
it draws fails too (the figures a reader sees, not files written on the side). The runs the chapters share are
computed once per session."""
import pytest

from conftest import ARTIFACTS
from infusing_kit.teaching.notebook_runner import count_images, notebook_paths, render_site, run_notebook
from infusing_kit.protocol.results import current

PATHS = notebook_paths()
# figures each chapter shows in SMOKE mode (its executed copy's image outputs), counted from the code: a chapter
# that loses one (a backend that draws nothing, a figure no longer displayed) fails
MIN_FIGURES = {"00": 3, "01": 0, "02": 3, "03": 4, "04": 4, "05": 4, "06": 2, "07": 4, "08": 3, "09": 1, "10": 3,
               "11": 1}
# ... and those drawn from the near world's current comparison (sweeps, the protocol, validation against test, every
# method's trade-off), shown in SMOKE mode too once results/current.json names one
FROM_REGISTRY = {"04": 1, "05": 1, "06": 1, "07": 1, "09": 3, "10": 1}
if current("near", "comparison") is not None:
    MIN_FIGURES = {k: v + FROM_REGISTRY.get(k, 0) for k, v in MIN_FIGURES.items()}


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebooks")
    return {"results": root / "results", "figures": root / "figures", "executed": root / "executed"}


def test_there_is_a_numbered_series():
    names = [p.name[:2] for p in PATHS]
    assert names == sorted(names) and {"00", "01", "02", "03", "10"} <= set(names), names
    assert set(MIN_FIGURES) == set(names), "every chapter needs its expected figure count"


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs_in_smoke_mode_and_shows_its_figures(path, shared):
    seconds = run_notebook(path, shared["executed"], smoke=True, results_dir=shared["results"],
                           figures_dir=shared["figures"], timeout=900)
    figures = count_images(shared["executed"] / path.name)
    print(f"{path.name}: {seconds:.0f} s, {figures} figures")
    assert figures >= MIN_FIGURES[path.name[:2]], f"{path.name} shows {figures} figures, expected {MIN_FIGURES[path.name[:2]]}"


@pytest.mark.slow
def test_the_course_site_renders_in_a_real_browser(shared, browser):
    """The site walked by its own links in Chromium: index -> syllabus ("start here") -> every chapter from the
    syllabus (and back by the chapter's own syllabus link), then first to last by "next", back by "prev", and the
    reference pages from the contents sidebar. Every page shows the sidebar with its own entry marked; no request
    leaves the machine."""
    executed = sorted(shared["executed"].glob("*.ipynb"))
    if not executed:  # run alone: execute one drawing chapter first
        run_notebook(PATHS[2], shared["executed"], smoke=True, results_dir=shared["results"],
                     figures_dir=shared["figures"], timeout=900)
        executed = sorted(shared["executed"].glob("*.ipynb"))
    site = ARTIFACTS / "html"
    index = render_site(executed, site)
    pages = [p.stem + ".html" for p in executed]
    page = browser.new_page()
    errors, fetched = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: fetched.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    page.goto(index.as_uri())
    chapters = page.locator("ol.chapters > li > a.chapter")
    assert [chapters.nth(i).get_attribute("href") for i in range(chapters.count())] == pages
    summaries = page.locator("ol.chapters").inner_text()
    assert "$" not in summaries and "*" not in summaries, "an index summary shows raw TeX or markdown"
    drawing = next(p for p in executed if count_images(p) > 0)
    page.goto((site / (drawing.stem + ".html")).as_uri())
    page.wait_for_load_state("load")
    images = page.evaluate("""() => Array.from(document.images).map(i => ({w: i.naturalWidth, ok: i.complete}))""")
    assert len(images) >= count_images(drawing) and all(i["ok"] and i["w"] > 0 for i in images), images
    page.screenshot(path=str(ARTIFACTS / f"site-{drawing.stem}.png"), full_page=False)
    assert not errors, errors
    assert not fetched, f"the site must open offline; it fetched {fetched}"
    with_math = next((p for p in executed if p.stem.startswith("01")), None)
    if with_math is not None:  # formulas arrive as MathML the browser lays out, not as raw TeX
        page.goto((site / (with_math.stem + ".html")).as_uri())
        assert page.locator("math").count() >= 5
        assert page.evaluate("() => document.querySelector('math').getBoundingClientRect().width") > 0

    def arrived(name: str) -> None:
        page.wait_for_load_state("load")
        assert page.url.rsplit("/", 1)[-1] == name, (page.url, name)
        sidebar = page.locator("nav.kit-sidebar")  # the contents, every chapter listed, this page marked
        assert sidebar.is_visible() and sidebar.locator("ul.kit-chapters a").count() == len(pages), name
        current = sidebar.locator('a[aria-current="page"]')
        assert current.count() == 1 and current.get_attribute("href") == name, name

    # index -> syllabus -> each chapter, by links; no page shows the building machine's paths or a parameters cell
    page.goto(index.as_uri())
    arrived("index.html")
    assert "Start here" in page.inner_text("body")
    page.locator('#start-here a[href="syllabus.html"]').click()
    arrived("syllabus.html")
    headings = page.locator("main h2 a")  # each chapter's section links its page
    assert [headings.nth(i).get_attribute("href") for i in range(headings.count())] == pages
    collapsed = 0
    for name in pages:
        page.locator(f'main h2 a[href="{name}"]').click()
        arrived(name)
        assert str(shared["results"].parent) not in page.content(), name
        assert "SMOKE = True" in page.locator("p.kit-run").first.inner_text(), name  # the values it ran with
        assert page.locator(".celltag_parameters, .celltag_injected-parameters").count() == 0, name
        checks = page.locator("details.kit-check")  # pure checks only, collapsed behind their verdict
        assert all(checks.nth(j).get_attribute("open") is None for j in range(checks.count())), name
        if checks.count():
            assert "Check passed" in checks.first.locator("summary").inner_text()
        collapsed += checks.count()
        assert page.locator('nav.chapter-nav a[rel="index"]').count() == 2, name
        page.locator('nav.chapter-nav a[href="syllabus.html"]').first.click()
        arrived("syllabus.html")
    assert collapsed >= 1, "no pure check cell collapsed on any page"
    # first to last by "next", back by "prev"
    page.locator(f'main h2 a[href="{pages[0]}"]').click()
    arrived(pages[0])
    walked = [pages[0]]
    while page.locator('nav.chapter-nav a[rel="next"]').count():
        page.locator('nav.chapter-nav a[rel="next"]').first.click()
        page.wait_for_load_state("load")
        walked.append(page.url.rsplit("/", 1)[-1])
        arrived(walked[-1])
    assert walked == pages, walked
    if len(pages) > 1:
        page.locator('nav.chapter-nav a[rel="prev"]').first.click()
        arrived(pages[-2])
    # the reference pages, from the contents sidebar, and back to the index
    for name, shows in (("method.html", "The method"), ("glossary.html", "gain kept"),
                        ("explorer.html", "make explorer")):
        page.locator(f'nav.kit-sidebar a[href="{name}"]').click()
        arrived(name)
        assert shows in page.inner_text("body"), name
        if name == "glossary.html":
            assert page.locator("dt").count() >= 15
        if name == "method.html":
            assert page.locator("main table").count() >= 2
    page.locator('nav.kit-sidebar a[href="index.html"]').click()
    arrived("index.html")
    page.screenshot(path=str(ARTIFACTS / "site-index.png"), full_page=False)
    assert not errors, errors
    assert not fetched, f"the site must open offline; it fetched {fetched}"


# figures each chapter shows on an exported world's study file (no committed comparison to draw on there, so no
# sweeps in 04-07: those are the built-in world's searches)
CONFIG_FIGURES = {"02": 3, "03": 4, "04": 5, "05": 5, "06": 3, "07": 4, "08": 3, "09": 1, "10": 3, "11": 1}


@pytest.mark.slow
def test_the_chapters_tell_the_same_story_on_a_study_file(smoke_study, tmp_path):
    """Every chapter that trains (02-10) with CONFIG = a study file (the built-in world exported as files: a user's
    own model and data look the same to them), then the explorer on the runs they made. Each chapter's assertions of
    its phenomenon run on the files (04-07 compare the study's methods that play their presets' parts, trained here);
    its figures show, and none overwrites a built-in world's figure."""
    chapters = [p for p in PATHS if p.name[:2] in CONFIG_FIGURES]
    assert [p.name[:2] for p in chapters] == sorted(CONFIG_FIGURES)
    executed, figures = tmp_path / "executed", tmp_path / "figures"
    for path in chapters:
        params = {} if path.name.startswith("11") else {"CONFIG": str(smoke_study)}
        seconds = run_notebook(path, executed, smoke=True, results_dir=tmp_path / "results", figures_dir=figures,
                               timeout=900, parameters=params)
        shown = count_images(executed / path.name)
        print(f"{path.name} on {smoke_study.name}: {seconds:.0f} s, {shown} figures")
        assert shown >= CONFIG_FIGURES[path.name[:2]], f"{path.name} shows {shown} figures on a study file"
    saved = sorted(p.name for p in figures.rglob("*.png") if not p.name.startswith("11-"))  # (11 reads registries)
    assert saved and all(smoke_study.stem in name for name in saved), saved
    runs = sorted(p.name for p in (tmp_path / "results").iterdir() if (p / "metrics.json").exists())
    assert runs and all(name.startswith(smoke_study.stem) for name in runs), runs  # nothing ran on the built-in world


def test_the_site_shows_no_folder_of_the_building_machine(tmp_path):
    """A chapter page hides papermill's injected parameters cell but says which SMOKE it ran with, and cuts the
    building machine's folders to their last part in every output that prints them; its pure check cell is
    collapsed behind a verdict, a cell that prints what it checks stays open."""
    import nbformat
    from infusing_kit.teaching.notebook_runner import render_site
    root = tmp_path / "build" / "results"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 99 · A chapter\n\nIt has $x^2$ in its summary."),
                nbformat.v4.new_code_cell(f'SMOKE = True\nRESULTS_DIR = "{root}"', metadata={"tags": ["injected-parameters"]}),
                nbformat.v4.new_code_cell("print(RESULTS_DIR)\nassert SMOKE", outputs=[
                    nbformat.v4.new_output("stream", name="stdout", text=f"{root}/toy-naive-s0\n")]),
                nbformat.v4.new_code_cell("assert SMOKE  # the pure check")]
    nbformat.write(nb, tmp_path / "99_chapter.ipynb")
    index = render_site([tmp_path / "99_chapter.ipynb"], tmp_path / "site")
    page = (tmp_path / "site" / "99_chapter.html").read_text()
    assert str(tmp_path) not in page and ".../results/toy-naive-s0" in page
    assert "celltag_injected-parameters" not in page and "<code>SMOKE = True</code>" in page
    checks = page.split('<details class="kit-check">')
    assert len(checks) == 2 and "the pure check" in checks[1] and "toy-naive-s0" in checks[0]
    assert "<math" in index.read_text()


def test_a_chapters_kernel_waits_passively_unless_the_user_says_otherwise(tmp_path, monkeypatch):
    # threads that spin at barriers crawl on a shared machine (benchmarks/bench_load.py): the runner's kernels
    # start with OMP_WAIT_POLICY=PASSIVE, and a value the user exported wins
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("SMOKE = True\nWANT = None", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import os\nassert os.environ.get('OMP_WAIT_POLICY') == WANT, "
                                          "os.environ.get('OMP_WAIT_POLICY')")]
    nbformat.write(nb, tmp_path / "99_env.ipynb")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    run_notebook(tmp_path / "99_env.ipynb", tmp_path / "out", True, parameters={"WANT": "PASSIVE"})
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    run_notebook(tmp_path / "99_env.ipynb", tmp_path / "out", True, parameters={"WANT": "ACTIVE"})
