"""The course layer of the chapters (`infusing_kit.teaching.course`): every chapter carries complete goals, questions with
answers and two exercises with asserting, hidden solutions; clean copies drop the answers and solutions and leave
the chapter untouched; the syllabus plans every chapter. Cheap: JSON only, no notebook is executed."""
import json
import re

import pytest

from infusing_kit.teaching import course
from infusing_kit.teaching.notebook_runner import notebook_paths

CHAPTERS = course.chapters()
IDS = [p.stem for p in CHAPTERS]


def _cells(path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _text(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_the_course_is_the_numbered_series():
    assert [p.name for p in CHAPTERS] == [p.name for p in notebook_paths()]
    assert CHAPTERS, "no chapter found"
    scheduled = [n for day in course.MODULE.values() for n in day]
    assert sorted(scheduled) == sorted(p.name[:2] for p in CHAPTERS), "every chapter on exactly one day"


@pytest.mark.parametrize("path", CHAPTERS, ids=IDS)
def test_every_chapter_has_its_whole_teaching_layer(path):
    assert course.problems(path) == []
    lay = course.layer(path)
    assert lay["title"].startswith(path.name[:2]), lay["title"]
    assert lay["goals"] and lay["prerequisites"] and lay["minutes"] > 0, lay
    assert 3 <= lay["questions"] == lay["answers"] <= 5, lay
    assert len(lay["exercises"]) == 2 and all(solution for _, solution in lay["exercises"]), lay["exercises"]


@pytest.mark.parametrize("path", CHAPTERS, ids=IDS)
def test_a_clean_copy_drops_answers_and_solutions_and_leaves_the_chapter_alone(path, tmp_path):
    before = path.read_bytes()
    out = course.clean_copy(path, tmp_path)
    assert path.read_bytes() == before, "clean_copy changed the chapter"
    assert out == tmp_path / path.name
    original, clean = _cells(path), _cells(out)

    code = [c for c in original if c["cell_type"] == "code"]
    kept = [c for c in clean if c["cell_type"] == "code"]
    assert len(kept) == len(code), "a code cell was dropped"
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in kept)
    solutions = [c for c in code if course.SOLUTION in _tags(c)]
    assert len(solutions) == 2
    for c, k in zip(code, kept):
        if course.SOLUTION in _tags(c):  # an empty exercise cell: none of the worked solution is left
            assert course.SOLUTION in _tags(k) and _text(k).strip().startswith("#"), _text(k)
            assert "assert" not in _text(k) and _text(c).strip() not in _text(k)
        else:
            assert _text(k) == _text(c), "a chapter code cell changed"

    text = "\n".join(_text(c) for c in clean)
    assert "<details>" not in text and "</details>" not in text and "Answer" not in text
    for tag in (course.GOALS, course.EXERCISE):  # goals and exercise prompts kept word for word
        assert [_text(c) for c in clean if tag in _tags(c)] == [_text(c) for c in original if tag in _tags(c)]
    questions = [c for c in clean if course.QUESTIONS in _tags(c)]
    assert len(questions) == 1
    assert len(course.QUESTION.findall(_text(questions[0]))) == course.layer(path)["questions"]
    title = next(l for l in _text(original[0]).splitlines() if l.startswith("#"))
    assert title in _text(clean[0]), "the title heading was dropped"
    prose = [c for c in original if c["cell_type"] == "markdown" and not _tags(c) and
             not any(l.startswith("#") for l in _text(c).splitlines())]
    assert all(_text(c) not in text for c in prose if _text(c).strip()), "prose without a heading was kept"


def test_the_syllabus_plans_every_chapter_and_every_day():
    text = course.syllabus(CHAPTERS)
    for path in CHAPTERS:
        lay = course.layer(path)
        assert f"## {lay['title']}" in text, lay["title"]
        assert lay["time"] in text
    by_number = {p.name[:2]: course.layer(p) for p in CHAPTERS}
    rows = {int(m.group(1)): (m.group(2), int(m.group(3)))
            for m in re.finditer(r"^\| (\d+) \| (.+) \| (\d+) min \|$", text, re.M)}
    assert sorted(rows) == sorted(course.MODULE), rows
    for day, numbers in course.MODULE.items():
        names, minutes = rows[day]
        assert all(by_number[n]["title"] in names for n in numbers), (day, names)
        assert minutes == sum(by_number[n]["minutes"] for n in numbers) > 0, (day, minutes)


def test_the_syllabus_links_every_chapter_and_names_what_to_assign():
    """With links (the site's pages), every chapter title is a link, in the day table and in its own heading; each
    chapter lists its exercises by name under "Assign"."""
    links = {p.name: p.stem + ".html" for p in CHAPTERS}
    text = course.syllabus(CHAPTERS, links=links)
    for path in CHAPTERS:
        lay = course.layer(path)
        assert f"## [{lay['title']}]({path.stem}.html)" in text, lay["title"]
        assert text.count(f"[{lay['title']}]({path.stem}.html)") == 2, "the heading and the day table"
        section = text.split(f"## [{lay['title']}]", 1)[1].split("\n## ", 1)[0]
        assert f"Assign: its {lay['questions']} questions" in section
        names = [course._exercise_title(prompt) for prompt, _ in lay["exercises"]]
        assert all(n.startswith("Exercise") and f"- {n}" in section for n in names), (names, section)
    rows = re.findall(r"^\| (\d+) \| (.+) \| (\d+) min \|$", text, re.M)
    assert sorted(int(day) for day, _, _ in rows) == sorted(course.MODULE)


def test_the_command_line_checks_cleans_and_prints(tmp_path, capsys):
    assert course.main(["check"]) == 0
    assert course.main(["clean", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.ipynb")) == [p.name for p in CHAPTERS]
    capsys.readouterr()
    assert course.main(["syllabus"]) == 0
    assert capsys.readouterr().out.startswith("# Syllabus")


# ---------------------------------------------------------------------------- what `problems` catches
def _md(text: str, *tags: str) -> dict:
    return {"cell_type": "markdown", "metadata": {"tags": list(tags)} if tags else {}, "source": text}


def _code(text: str, *tags: str, hidden: bool = False) -> dict:
    meta = {"tags": list(tags)} if tags else {}
    if hidden:
        meta["jupyter"] = {"source_hidden": True}
    return {"cell_type": "code", "metadata": meta, "source": text, "outputs": [], "execution_count": None}


def _chapter(**change) -> dict:
    """A small chapter with a complete teaching layer; `change` replaces named cells."""
    answer = "<details><summary>Answer</summary>Because.</details>"
    cells = {
        "title": _md("# 99 · A chapter\n\nSome prose."),
        "goals": _md("**You will learn**\n- one thing\n- another\n\n**Before you start:** chapter 00.\n\n"
                     "**Time:** about 20 min of study", course.GOALS),
        "code": _code("x = 1\nassert x == 1"),
        "questions": _md("## Check your understanding\n\n" + "\n".join(f"{i}. Why {i}?\n   {answer}" for i in (1, 2, 3)),
                         course.QUESTIONS),
        "exercise1": _md("### Exercise 1 · Add\nAdd one.", course.EXERCISE),
        "solution1": _code("y = x + 1\nassert y == 2", course.SOLUTION, hidden=True),
        "exercise2": _md("### Exercise 2 · Double\nDouble it.", course.EXERCISE),
        "solution2": _code("z = 2 * x\nassert z == 2", course.SOLUTION, hidden=True),
    }
    cells.update(change)
    return {"cells": [c for c in cells.values() if c is not None], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def _problems(tmp_path, nb: dict) -> list[str]:
    path = tmp_path / "99_chapter.ipynb"
    path.write_text(json.dumps(nb, indent=1))
    return course.problems(path)


def test_a_complete_small_chapter_has_no_problems(tmp_path):
    assert _problems(tmp_path, _chapter()) == []


@pytest.mark.parametrize("change, expected", [
    ({"solution2": _code("z = 2 * x\nprint(z)", course.SOLUTION, hidden=True)}, "solution asserts nothing"),
    ({"questions": _md("## Check your understanding\n\n1. Why?\n   <details><summary>Answer</summary>Because."
                       "</details>\n2. Why not?\n3. And why?\n   <details><summary>Answer</summary>So.</details>",
                       course.QUESTIONS)}, "3 questions and 2 answers"),
    ({"questions": _md("## Check your understanding\n\n1. Why?\n   <details><summary>Answer</summary>Because."
                       "</details>", course.QUESTIONS)}, "1 questions and 1 answers"),
    ({"solution1": None}, "exercise without a kit-solution cell"),
    ({"solution1": _code("y = x + 1\nassert y == 2", course.SOLUTION)}, "not hidden"),
    ({"exercise2": None, "solution2": None}, "1 exercises (want 2)"),
    ({"goals": None}, "the cell after the title is not the kit-goals cell"),
    ({"goals": _md("**You will learn**\n- one thing\n\n**Before you start:** chapter 00.", course.GOALS)},
     "time in minutes"),
])
def test_problems_names_what_a_chapter_lacks(tmp_path, change, expected):
    found = _problems(tmp_path, _chapter(**change))
    assert any(expected in p for p in found), found


def test_problems_catches_chapter_code_after_the_exercises(tmp_path):
    nb = _chapter()
    nb["cells"].append(_code("assert True"))
    assert any("comes after an exercise" in p for p in _problems(tmp_path, nb))
