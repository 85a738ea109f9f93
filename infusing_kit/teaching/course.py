"""The course layer of the chapters: learning goals, questions with answers, exercises with worked solutions.

Every chapter notebook carries its teaching layer in tagged cells, so the notebook stays the one source a lecturer
edits (nothing here holds course text):

* ``kit-goals`` (markdown, right after the title cell): **You will learn** (a list), **Before you start** and
  **Time**;
* ``kit-questions`` (markdown): 3-5 numbered questions, each followed by ``<details><summary>Answer</summary> ...
  </details>`` (collapsed in JupyterLab and on the site: the answer and why the other answers are wrong);
* ``kit-exercise`` (markdown) followed by its ``kit-solution`` (code, input hidden in JupyterLab): a worked
  solution that runs, and asserts what it finds, whenever the chapter runs (so ``make test`` executes them all).

`link_terms` links the first use of each glossary term (docs/glossary.md) on a chapter's page to its entry.
`clean_copy` writes a chapter for self-testing (fastbook's "clean" notebooks): headings, code, questions and
exercise prompts only; no prose, no answers, no solutions, no outputs. `syllabus` is the course's one-page plan.

    python -m infusing_kit.teaching.course clean --out build/clean      # clean copies of every chapter
    python -m infusing_kit.teaching.course syllabus                      # the syllabus as markdown
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

GOALS, QUESTIONS, EXERCISE, SOLUTION = "kit-goals", "kit-questions", "kit-exercise", "kit-solution"
ANSWER = re.compile(r"<details>\s*<summary>\s*Answer\s*</summary>(.*?)</details>", re.S)
QUESTION = re.compile(r"^\d+\.\s", re.M)
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
GLOSSARY = NOTEBOOKS.parent / "docs" / "glossary.md"
# where a glossary link must not go: code, formulas, links, HTML tags, and lines that are headings or HTML blocks
KEEP = re.compile(r"`[^`]*`|\$\$?[^$]*\$?\$|\[[^\]]*\]\([^)]*\)|<[^>]*>")
# A two-week module (10 teaching days): the chapters of each day, in order
MODULE = {1: ["00", "01"], 2: ["02", "03"], 3: ["09"], 4: ["04"], 5: ["05"], 6: ["06"], 7: ["07"], 8: ["08"],
          9: ["10"], 10: ["11"]}


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _text(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _field(goals: str, name: str) -> str:
    """The text after '**name**' in a goals cell, up to the next bold field."""
    m = re.search(rf"\*\*{re.escape(name)}[:.]?\*\*:?\s*(.*?)(?=\n\*\*|\Z)", goals, re.S)
    return m.group(1).strip() if m else ""


def anchor(term: str) -> str:
    """The id of a glossary entry on the site: its term line, lower case, runs of other characters as '-'."""
    return "term-" + re.sub(r"[^a-z0-9]+", "-", term.lower()).strip("-")


def glossary_terms(path: str | Path = GLOSSARY) -> dict[str, str]:
    """Every word the glossary defines -> its entry's anchor (an entry "a / b" defines a and b)."""
    lines = Path(path).read_text().splitlines()
    return {word.strip(): anchor(line) for line, below in zip(lines, lines[1:])
            if line.strip() and not line.startswith((" ", ":", "#")) and below.startswith(": ")
            for word in line.split(" / ")}


def link_terms(markdown: str, terms: dict[str, str], seen: set[str], page: str = "glossary.html") -> str:
    """`markdown` with the first use of each term not in `seen` (updated) as a link to its entry: whole words, any
    case, never inside code, a formula, a link, a heading or a line of HTML (an answer's <details>)."""
    lines = markdown.split("\n")
    for term in sorted(terms, key=len, reverse=True):  # "gain kept" before "gain"
        if term in seen:
            continue
        word = re.compile(rf"(?<![\w@/#-]){re.escape(term)}(?![\w@-])", re.I)
        for i, line in enumerate(lines):
            if line.lstrip().startswith(("#", "<")) or "<details" in line:
                continue
            kept = [m.span() for m in KEEP.finditer(line)]
            hit = next((m for m in word.finditer(line) if not any(a <= m.start() < b for a, b in kept)), None)
            if hit:
                lines[i] = f"{line[:hit.start()]}[{hit.group(0)}]({page}#{terms[term]}){line[hit.end():]}"
                seen.add(term)
                break
    return "\n".join(lines)


def layer(path: str | Path) -> dict:
    """A chapter's teaching layer, read from its tagged cells: title, goals (list), prerequisites, time (text),
    minutes (the study time's number), questions and answers (counts), exercises (list of (prompt, solution
    source)), and words of teaching text (every markdown cell)."""
    nb = json.loads(Path(path).read_text())
    cells = nb["cells"]
    title = next((l.lstrip("# ").strip() for l in _text(cells[0]).splitlines() if l.startswith("#")), Path(path).stem)
    goals = "\n".join(_text(c) for c in cells if GOALS in _tags(c))
    questions = "\n".join(_text(c) for c in cells if QUESTIONS in _tags(c))
    exercises = []
    for i, c in enumerate(cells):
        if EXERCISE in _tags(c):
            nxt = cells[i + 1] if i + 1 < len(cells) else None
            exercises.append((_text(c), _text(nxt) if nxt is not None and SOLUTION in _tags(nxt) else None))
    learn = _field(goals, "You will learn")
    time = _field(goals, "Time")
    minutes = re.search(r"(\d+)\s*min", time)
    return {"title": title, "goals": [l.lstrip("-* ").strip() for l in learn.splitlines() if l.strip()],
            "prerequisites": _field(goals, "Before you start"), "time": time,
            "minutes": int(minutes.group(1)) if minutes else None,
            "questions": len(QUESTION.findall(ANSWER.sub("", questions))), "answers": len(ANSWER.findall(questions)),
            "exercises": exercises,
            "words": sum(len(_text(c).split()) for c in cells if c["cell_type"] == "markdown")}


def problems(path: str | Path) -> list[str]:
    """What a chapter's teaching layer lacks (empty when complete): goals right after the title, with learning
    goals, prerequisites and a time; 3-5 questions, each with its answer; 2 exercises, each followed by a solution
    that asserts what it finds; solutions hidden in JupyterLab; no solution before the chapter's own checks
    end (so a clean copy, which drops them, still runs)."""
    nb = json.loads(Path(path).read_text())
    cells, lay, out = nb["cells"], layer(path), []
    if len(cells) < 2 or GOALS not in _tags(cells[1]):
        out.append("the cell after the title is not the kit-goals cell")
    if not lay["goals"] or not lay["prerequisites"] or lay["minutes"] is None:
        out.append(f"goals cell lacks learning goals, prerequisites or a time in minutes: {lay}")
    if not 3 <= lay["questions"] <= 5 or lay["answers"] != lay["questions"]:
        out.append(f"{lay['questions']} questions and {lay['answers']} answers (want 3-5, each answered)")
    if len(lay["exercises"]) != 2:
        out.append(f"{len(lay['exercises'])} exercises (want 2)")
    for prompt, solution in lay["exercises"]:
        if solution is None:
            out.append(f"exercise without a kit-solution cell after it: {prompt[:60]!r}")
        elif not re.search(r"^\s*assert ", solution, re.M):
            out.append(f"solution asserts nothing: {prompt[:60]!r}")
    for c in cells:
        if SOLUTION in _tags(c) and not c.get("metadata", {}).get("jupyter", {}).get("source_hidden"):
            out.append("a solution cell is not hidden (metadata.jupyter.source_hidden)")
    first = next((i for i, c in enumerate(cells) if SOLUTION in _tags(c) or EXERCISE in _tags(c)), len(cells))
    if any(c["cell_type"] == "code" and not ({SOLUTION, EXERCISE} & set(_tags(c))) for c in cells[first:]):
        out.append("a chapter code cell comes after an exercise (the exercises close the chapter)")
    return out


def clean_copy(path: str | Path, out_dir: str | Path) -> Path:
    """The chapter for self-testing: headings of every markdown cell, every code cell without outputs, the goals,
    the questions without their answers, the exercise prompts, and an empty cell for each solution. Written to
    out_dir/<name>; the original is not touched."""
    nb = json.loads(Path(path).read_text())
    cells = []
    for c in nb["cells"]:
        c = copy.deepcopy(c)
        tags = _tags(c)
        if c["cell_type"] == "code":
            c["outputs"], c["execution_count"] = [], None
            if SOLUTION in tags:
                c["source"] = ["# Your solution here (the worked solution is in the full chapter)\n"]
                c["metadata"] = {"tags": [SOLUTION]}
            cells.append(c)
        elif GOALS in tags or EXERCISE in tags:
            cells.append(c)
        elif QUESTIONS in tags:
            c["source"] = ANSWER.sub("", _text(c))
            cells.append(c)
        else:
            heads = [l for l in _text(c).splitlines() if l.startswith("#")]
            if heads:
                c["source"] = "\n".join(heads)
                cells.append(c)
    nb["cells"] = cells
    out = Path(out_dir) / Path(path).name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return out


def chapters(notebooks: str | Path = NOTEBOOKS) -> list[Path]:
    """The numbered chapters, in order."""
    return sorted(p for p in Path(notebooks).glob("[0-9][0-9]_*.ipynb"))


def _exercise_title(prompt: str) -> str:
    """An exercise's name: its heading without the '#'s (e.g. 'Exercise 1 · Add'), else its first line."""
    lines = [l.strip() for l in prompt.splitlines() if l.strip()]
    head = next((l for l in lines if l.startswith("#")), lines[0] if lines else "Exercise")
    return head.lstrip("# ").strip()


def syllabus(paths: list[Path], seconds: dict[str, float] | None = None, links: dict[str, str] | None = None) -> str:
    """The course plan as markdown: the two-week module day by day (MODULE), then per chapter its goals,
    prerequisites, study time and what to assign (its questions and its two exercises, by name); seconds: measured
    run times per chapter file name (the site's build fills them in), shown next to the study time; links: a URL per
    chapter file name (the site's pages), which makes every chapter title a link."""
    by_number = {p.name[:2]: p for p in paths}
    named = lambda p, title: f"[{title}]({links[p.name]})" if links and p.name in links else title
    lines = ["# Syllabus", "",
             "Twelve chapters, each a notebook: read it, run it, answer its questions (answers are collapsed under "
             "each one), then do its two exercises (worked solutions, hidden, run with the chapter). "
             "`python -m infusing_kit.teaching.course clean` writes copies without prose and solutions for self-testing.",
             "", "## A two-week module", "", "| day | chapters | study time |", "|---|---|---|"]
    for day, numbers in MODULE.items():
        lays = [(by_number[n], layer(by_number[n])) for n in numbers if n in by_number]
        if lays:
            names = "; ".join(named(p, l["title"]) for p, l in lays)
            lines.append(f"| {day} | {names} | {sum(l['minutes'] or 0 for _, l in lays)} min |")
    lines += ["", "Chapter 09 (the protocol) comes on day 3, before the regularizers, which rely on "
              "validation-chosen strengths; chapter 04 opens with a short primer for readers who go in numbering "
              "order. Each day, assign the day's chapters and, after them, their questions and exercises (listed "
              "below with each chapter).", ""]
    for p in paths:
        lay = layer(p)
        ran = f"; runs in {seconds[p.name]:.0f} s on this build" if seconds and p.name in seconds else ""
        lines += [f"## {named(p, lay['title'])}", "", f"*{lay['time']}{ran}. {lay['questions']} questions, "
                  f"{len(lay['exercises'])} exercises.*", "", "You will learn:", ""]
        lines += [f"- {g}" for g in lay["goals"]] + ["", f"Before you start: {lay['prerequisites']}", ""]
        if lay["questions"] or lay["exercises"]:
            lines += [f"Assign: its {lay['questions']} questions (answers collapsed under each), then its "
                      "exercises (worked solutions run with the chapter):", ""]
            lines += [f"- {_exercise_title(prompt)}" for prompt, _ in lay["exercises"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("clean", help="write clean copies of the chapters")
    c.add_argument("--out", default="build/clean")
    sub.add_parser("syllabus", help="print the syllabus (markdown)")
    sub.add_parser("check", help="list what each chapter's teaching layer lacks (exit 1 if anything)")
    args = ap.parse_args(argv)
    paths = chapters()
    if args.cmd == "clean":
        for p in paths:
            print(clean_copy(p, args.out))
    elif args.cmd == "syllabus":
        print(syllabus(paths))
    else:
        bad = {p.name: problems(p) for p in paths}
        for name, issues in bad.items():
            for i in issues:
                print(f"{name}: {i}")
        return 1 if any(bad.values()) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
