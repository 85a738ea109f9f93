"""One figure style (figures.py): every function that draws methods takes its colours from figures.STYLE, keeps its
legend off the data, starts value axes at 0 or marks them cut, and trade-off plots point to the better corner.

The colour checks draw under a patched table (colours no function could pick by itself), so a function that
chooses its own colours fails even when they happen to equal the table's."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex, to_rgb  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402

from infusing_kit.teaching import figures  # noqa: E402
from infusing_kit.metrics import FINE, GENERIC  # noqa: E402
from infusing_kit.protocol.presets import FAMILIES, PRESETS  # noqa: E402

METHODS = ("toy-naive", "toy-paper", "toy-l2sp", "toy-wise-ft")


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def summary(methods=METHODS):
    rng = np.random.default_rng(0)
    rows = []
    for m in methods:
        row = {"method": m, "seeds": 3}
        for a, centre in (("fine", 0.3), ("generic", -0.05), ("i2t", -0.1)):
            row[f"{a}_mean"], row[f"{a}_std"] = centre + 0.05 * rng.normal(), 0.01
        rows.append(row)
    return rows


def history(agreement=(0.99, 0.96, 0.94)):
    return [{"target_step": s, f"val/{FINE}": 0.2 + 0.1 * i, f"val/{GENERIC}": 0.6 - 0.1 * i,
             "val/generic_agreement": a} for i, (s, a) in enumerate(zip((0, 50, 100), agreement))]


def trials(method="toy-l2sp"):
    return [{"method": method, "params": {"l2sp": v}, "val": {FINE: 0.5 - 0.01 * i, GENERIC: 0.3 + 0.02 * i}}
            for i, v in enumerate((0.1, 1.0, 10.0, 100.0))]


def drifts(methods=METHODS):
    parts = ["patch", "block0", "block1"]
    return {m: {"groups": parts, "weight": {g: 0.01 * (i + 1) * (j + 1) for j, g in enumerate(parts)},
                "cka": {"generic": {g: 0.9 - 0.1 * j for j, g in enumerate(parts)},
                        "fine-grained": {g: 0.8 - 0.1 * j for j, g in enumerate(parts)}}}
            for i, m in enumerate(methods)}


def hexes(colours):
    """The colours of an artist as hex strings (a colour name, one RGBA or an array of them)."""
    return {to_hex(colours)} if isinstance(colours, str) else {to_hex(c) for c in np.atleast_2d(colours)}


def method_of(label):
    """The preset a legend label names ("l2sp (3)", "naive (generic)" -> toy-l2sp, toy-naive)."""
    name = label.split(" (")[0]
    return name if name.startswith("toy-") else f"toy-{name}"


# Each case draws with several methods and returns [(method, colours drawn for it, marker or None)].
def case_figure1():
    fig = figures.figure1(summary(), methods=METHODS)
    return fig, [(method_of(c.get_label()), hexes([p.get_facecolor() for p in c]), None)
                 for c in fig.axes[0].containers if isinstance(c, BarContainer)]


def case_tradeoff():
    fig = figures.tradeoff(summary())
    return fig, [(method_of(c.get_label()), hexes(c.lines[0].get_color()), c.lines[0].get_marker())
                 for c in fig.axes[0].containers]


def case_run_points():
    pts = {m: np.random.default_rng(i).normal(size=(3, 2)) / 20 for i, m in enumerate(METHODS)}
    fig = figures.run_points(pts, "i2t", "fine")
    return fig, [(method_of(c.get_label()), hexes(c.get_facecolor()), None) for c in fig.axes[0].collections
                 if not c.get_label().startswith(("_", "pretrained"))]


def case_sweep():
    fig = figures.sweep(trials(), "l2sp")
    return fig, [("toy-l2sp", hexes(line.get_color()), line.get_marker()) for line in fig.axes[0].lines
                 if line.get_label() in ("fine-grained val", "generic val")]


def case_curves():
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for label in ("naive", "combination", "l2sp"):  # the labels chapters 04-10 pass
        figures.curves(history(), label, axes=axes)
    figures.curves(history(), "WiSE-FT", axes=axes, method="toy-wise-ft")
    names = {"naive": "toy-naive", "combination": "toy-paper", "l2sp": "toy-l2sp", "WiSE-FT": "toy-wise-ft"}
    return fig, [(names[line.get_label()], hexes(line.get_color()), line.get_marker())
                 for ax in axes for line in ax.lines]


def case_drift():
    fig = figures.drift(drifts())
    return fig, [(method_of(line.get_label()), hexes(line.get_color()), line.get_marker())
                 for ax in fig.axes for line in ax.lines if line.get_label() and not line.get_label().startswith("_")]


def case_agreement():
    fig = figures.agreement({m: history() for m in METHODS})
    return fig, [(method_of(line.get_label()), hexes(line.get_color()), line.get_marker())
                 for line in fig.axes[0].lines if line.get_label() and not line.get_label().startswith("_")]


CASES = [case_figure1, case_tradeoff, case_run_points, case_sweep, case_curves, case_drift, case_agreement]


def test_style_gives_each_family_one_readable_colour_and_each_member_its_own_marker():
    assert set(FAMILIES) <= set(figures.STYLE), "a preset family has no row in figures.STYLE"
    for name, preset in PRESETS.items():
        fam = "paper" if "toy-paper" in (name, preset.ablation_of) else preset.family
        assert figures.family(name) == fam
        assert figures.style(name)["color"] == figures.STYLE[fam][0]
        assert figures.style(name.removeprefix("toy-")) == figures.style(name)  # the labels notebooks pass
    for fam, (colour, markers) in figures.STYLE.items():
        members = [m for m in PRESETS if figures.family(m) == fam]
        if 0 < len(members) <= len(markers):
            assert len({figures.style(m)["marker"] for m in members}) == len(members), fam
        r, g, b = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(colour)]
        assert 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5, f"{fam}'s {colour} is too light on white (yellow?)"
    colours = [c for c, _ in figures.STYLE.values()]
    assert len(set(colours)) == len(colours), "two families share a colour"
    assert figures.style("toy-paper [constraint rule]") == figures.style("toy-paper")
    unknown = figures.style("someone-elses-method")
    assert unknown == figures.style("someone-elses-method") and unknown["color"] == figures.STYLE["other"][0]
    assert unknown["marker"] in figures.STYLE["other"][1]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.removeprefix("case_"))
def test_every_method_plot_takes_its_colours_and_markers_from_the_table(case, monkeypatch):
    odd = ["#123456", "#654321", "#2468ac", "#13579b", "#abcdef", "#fedcba", "#0a0b0c", "#c0b0a0", "#111111",
           "#a1b2c3"]
    for (fam, (_, markers)), colour in zip(list(figures.STYLE.items()), odd):
        monkeypatch.setitem(figures.STYLE, fam, (colour, markers))
    fig, drawn = case()
    assert {m for m, _, _ in drawn} >= {"toy-naive", "toy-l2sp"} or case is case_sweep, drawn
    for method, colours, marker in drawn:
        st = figures.style(method)
        assert colours == {st["color"]}, f"{case.__name__}: {method} drawn in {colours}, the table says {st['color']}"
        assert marker is None or marker == st["marker"], f"{case.__name__}: {method}'s marker {marker}"
    for ax in fig.axes:  # no colour scale without a labelled colour bar
        for c in ax.collections:
            if c.get_array() is not None:
                assert c.colorbar is not None and c.colorbar.ax.get_ylabel(), f"{case.__name__}: unlabelled scale"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.removeprefix("case_"))
def test_legends_sit_outside_the_data(case):
    fig, _ = case()
    fig.canvas.draw()
    legends = [(ax, ax.get_legend()) for ax in fig.axes if ax.get_legend() is not None]
    assert legends, f"{case.__name__} draws no legend"
    for ax, legend in legends:
        assert not legend.get_window_extent().overlaps(ax.get_window_extent()), f"{case.__name__}: legend on the data"


def test_a_panel_with_a_neighbour_on_its_right_puts_its_legend_below_the_tick_labels():
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))  # chapter 10's two trade-offs
    figures.tradeoff(summary(), "i2t", ax=axes[0]), figures.tradeoff(summary(), "generic", ax=axes[1])
    fig.canvas.draw()
    left, right = axes[0].get_legend().get_window_extent(), axes[1].get_legend().get_window_extent()
    assert left.y1 <= axes[0].xaxis.label.get_window_extent().y0 + 1  # below the axis label
    assert not left.overlaps(axes[1].get_window_extent()) and right.x0 >= axes[1].get_window_extent().x1
    assert figures.tradeoff(summary(), ax=plt.subplots()[1], legend=False).axes[0].get_legend() is None


@pytest.mark.parametrize("case", [case_tradeoff, case_run_points], ids=["tradeoff", "run_points"])
def test_trade_off_plots_point_to_the_better_corner_and_show_the_pretrained_origin(case):
    fig, _ = case()
    ax = fig.axes[0]
    arrows = [t for t in ax.texts if "better" in t.get_text()]
    assert len(arrows) == 1
    (x0, y0), (x1, y1) = arrows[0].xyann, arrows[0].xy
    assert x1 > x0 and y1 > y0, "the arrow should point up and right (more gain, less forgetting)"
    assert ax.get_xlim()[0] <= 0 <= ax.get_xlim()[1] and ax.get_ylim()[0] <= 0 <= ax.get_ylim()[1]
    assert any(c.get_label().startswith("pretrained") for c in ax.collections)


def test_value_axes_start_at_zero_or_are_marked_cut():
    fig, _ = case_curves()
    assert all(ax.get_ylim()[0] == 0 and ax.get_xlim()[0] == 0 for ax in fig.axes)
    assert figures.drift(drifts()).axes[0].get_ylim()[0] == 0
    near_one = figures.agreement({"toy-distill": history((0.99, 0.97, 0.95))}).axes[0]
    assert near_one.get_ylim()[0] > 0 and "(axis cut)" in near_one.get_ylabel()
    assert any(a.get_gid() == "axis-cut" for a in near_one.get_children())
    spread = figures.agreement({"toy-distill": history((0.9, 0.5, 0.2))}).axes[0]
    assert spread.get_ylim()[0] == 0 and "cut" not in spread.get_ylabel()


def test_figure1_speaks_of_points_not_x100_and_curves_keep_chapter_10s_colours():
    fig = figures.figure1(summary(("toy-naive", "toy-paper")))
    texts = [fig.axes[0].get_ylabel(), fig.axes[0].get_title()] + [t.get_text() for t in fig.axes[0].texts]
    assert "percentage points" in fig.axes[0].get_ylabel() and not any("x100" in t for t in texts)
    bars = {c.get_label().split(" (")[0]: to_hex(c[0].get_facecolor()) for c in fig.axes[0].containers
            if isinstance(c, BarContainer)}
    _, axes = plt.subplots(1, 2)
    figures.curves(history(), "naive", axes=axes), figures.curves(history(), "combination", axes=axes)
    lines = {line.get_label(): to_hex(line.get_color()) for line in axes[0].lines}
    assert lines == {"naive": bars["toy-naive"], "combination": bars["toy-paper"]}


def test_a_colour_scale_comes_with_a_labelled_colour_bar():
    _, ax = plt.subplots()
    sc = figures.scored(ax, [1, 2, 3], [3, 1, 2], [0.1, 0.5, 0.9], "mean val mAP@20")
    assert sc.colorbar is not None and sc.colorbar.ax.get_ylabel() == "mean val mAP@20"
