"""The report's figures (matplotlib, Agg backend), one PNG each, from the ok runs:

    acc_vs_params.png   test accuracy vs parameters, per epoch, one colour per group
    acc_vs_time.png     test accuracy vs wall time (total_seconds), per epoch
    widths.png          width of every growth site over epochs, one panel per group
    psi.png             bottleneck Psi of every site at each growth event (growth.csv), per group

Every run of a group is drawn in the group's colour (seeds are not averaged). A figure
without data (e.g. no growth.csv anywhere) is skipped and the reason returned.
Each function returns a Figure or None; build_plots renders them to PNG bytes.
"""
from __future__ import annotations

import io
import math
import textwrap

from growrun.report.render import si as _si
from growrun.report.table import Group

WIDTH_PREFIX = "width:"
MARKERS = "os^Dvx+*"  # one marker per run (seed) of a group; the colour is the group's (or the site's)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colour(i: int):
    import matplotlib

    return matplotlib.colormaps["tab10"](i % 10)


def _curves(groups: list[Group], x_key: str, title: str, xlabel: str, log_x: bool):
    lines = []
    for i, g in enumerate(groups):
        for j, run in enumerate(g.runs):
            pts = [(r[x_key], 100 * r["test_acc"]) for r in run.metrics
                   if r.get(x_key) is not None and r.get("test_acc") is not None]
            if pts:
                lines.append((i, j, g, pts))
    if not lines:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, j, g, pts in lines:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker=MARKERS[j % len(MARKERS)], markersize=4, color=_colour(i), alpha=0.85,
                label=f"{g.short_label} (n={len(g.runs)})" if j == 0 else None)
    if log_x and all(x > 0 for *_, pts in lines for x, _ in pts):
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis, [x for *_, pts in lines for x, _ in pts])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title="group (one line per seed, marker = seed)", title_fontsize=8,
              loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    return fig  # no tight_layout: it would shrink the axes for the legend; savefig extends the canvas


def acc_vs_params(groups: list[Group]):
    return _curves(groups, "params", "Test accuracy vs parameters (one point per epoch)", "parameters", True)


def acc_vs_time(groups: list[Group]):
    return _curves(groups, "total_seconds", "Test accuracy vs wall time (one point per epoch)",
                   "wall time (s, cumulative total_seconds)", False)


def acc_vs_compute(groups: list[Group]):
    """Mean curve per group (mean compute and accuracy per epoch over its seeds), bold; each
    seed faint behind it; a group of fixed runs at equal compute (growrun.report.equal) as stars at
    each run's end; log compute axis."""
    from growrun.report.compute import mean_curve
    from growrun.report.equal import final_compute
    from growrun.report.runs import is_equal_compute

    curves = [(i, g, mean_curve(g)) for i, g in enumerate(groups)]
    curves = [(i, g, pts) for i, g, pts in curves if pts]
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, g, pts in curves:
        if all(is_equal_compute(r) for r in g.runs):  # fixed runs at a grown run's compute: their end points
            ends = [(final_compute(r), 100 * r.metrics[-1]["test_acc"]) for r in g.runs]
            ax.scatter(*zip(*ends), color=_colour(i), marker="*", s=90, zorder=3,
                       label=f"{g.short_label} (end of each of {len(g.runs)})")
            continue
        for run in g.runs:
            seed = [(r["compute"], 100 * r["test_acc"]) for r in run.metrics
                    if r.get("compute") is not None and r.get("test_acc") is not None]
            if seed:
                ax.plot(*zip(*seed), color=_colour(i), alpha=0.25, linewidth=0.8)
        xs, ys = zip(*pts)
        ax.plot(xs, [100 * y for y in ys], color=_colour(i), marker="o", markersize=3, linewidth=1.8,
                label=f"{g.short_label} (mean of {len(g.runs)})")
    if all(x > 0 for *_, pts in curves for x, _ in pts):
        ax.set_xscale("log")
    ax.set_xlabel("compute (FLOPs: training + growth, cumulative)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy vs compute (one point per epoch; faint: single seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    return fig


def _panels(n: int, title: str):
    plt = _plt()
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols + 1.8, 3.6 * rows + 0.6), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes.flat[:n])


def _finish(fig, sites: list[str], legend_title: str):
    import matplotlib.lines as mlines

    handles = [mlines.Line2D([], [], color=_colour(k), marker="o", markersize=3, label=s)
               for k, s in enumerate(sites)]
    fig.legend(handles=handles, loc="center right", fontsize=8, title=legend_title, title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    return fig


def widths(groups: list[Group]):
    data = []
    for g in groups:
        sites = [k[len(WIDTH_PREFIX):] for k in (g.runs[0].metrics[0] if g.runs[0].metrics else {})
                 if k.startswith(WIDTH_PREFIX)]
        if sites:
            data.append((g, sites))
    if not data:
        return None
    all_sites = list(dict.fromkeys(s for _, sites in data for s in sites))
    fig, axes = _panels(len(data), "Width of every growth site over epochs")
    for ax, (g, sites) in zip(axes, data):
        for j, run in enumerate(g.runs):
            for s in sites:
                pts = [(r["epoch"], r[WIDTH_PREFIX + s]) for r in run.metrics
                       if r.get("epoch") is not None and r.get(WIDTH_PREFIX + s) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker=MARKERS[j % len(MARKERS)], markersize=3,
                            color=_colour(all_sites.index(s)), alpha=0.8)
        ax.set_yscale("symlog", base=2, linthresh=1)
        ax.yaxis.set_major_formatter(_plain_ticks())
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_title(_wrapped(g.short_label), fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("site width (channels / units)")
        ax.grid(True, alpha=0.3)
    return _finish(fig, all_sites, "site (marker = seed)")


def psi(groups: list[Group]):
    data = [(g, [row for run in g.runs for row in (run.growth or [])]) for g in groups]
    data = [(g, rows) for g, rows in data if any(r.get("psi") is not None for r in rows)]
    if not data:
        return None
    all_sites = list(dict.fromkeys(str(r["site"]) for _, rows in data for r in rows))
    fig, axes = _panels(len(data), "Expressivity bottleneck Psi per site at each growth event")
    for ax, (g, _) in zip(axes, data):
        positive, ys_all = True, []
        for j, run in enumerate(g.runs):
            for s in all_sites:
                pts = [(r["epoch"], r["psi"]) for r in (run.growth or [])
                       if r.get("site") == s and r.get("epoch") is not None and r.get("psi") is not None]
                if pts:
                    xs, ys = zip(*pts)
                    positive &= all(y > 0 for y in ys)
                    ys_all += ys
                    ax.plot(xs, ys, marker=MARKERS[j % len(MARKERS)], markersize=3,
                            color=_colour(all_sites.index(s)), alpha=0.8)
        if positive:
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis, ys_all)
        ax.set_title(_wrapped(g.short_label), fontsize=9)
        ax.set_xlabel("epoch of the growth event")
        ax.set_ylabel("Psi (bottleneck norm)")
        ax.grid(True, which="both", alpha=0.3)
    return _finish(fig, all_sites, "site (marker = seed)")


def _plain_ticks():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _plain_log_ticks(axis, values: list[float]) -> None:
    """Log-axis labels as plain numbers (45k, 0.3). Minor ticks: all labelled within one
    decade, those at 2 and 5 x 10^k within two decades, none beyond."""
    from matplotlib.ticker import FuncFormatter

    def text(v: float) -> str:
        return _si(v) if v >= 1000 else f"{v:.3g}"

    decades = math.log10(max(values) / min(values)) if values else 0.0

    def minor(v: float, _) -> str:
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)
        keep = decades < 1 or (decades < 2 and mantissa in (2.0, 5.0))
        return text(v) if keep else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _: text(v)))
    axis.set_minor_formatter(FuncFormatter(minor))


def _wrapped(text: str, width: int = 55) -> str:
    return textwrap.fill(text, width, break_long_words=False)


PLOTS = [  # (file name, description, builder, why it may be skipped)
    ("acc_vs_params.png", "test accuracy vs parameters", acc_vs_params, "no run has params and test_acc"),
    ("acc_vs_time.png", "test accuracy vs wall time", acc_vs_time, "no run has total_seconds and test_acc"),
    ("acc_vs_compute.png", "test accuracy vs compute (training + growth FLOPs)", acc_vs_compute,
     "no run has train_flops and growth_flops (an older growrun)"),
    ("widths.png", "growth-site widths over epochs", widths, "no run has width:<site> columns in metrics.csv"),
    ("psi.png", "bottleneck Psi per site over growth events", psi,
     "no run has a growth.csv with psi values (growth.method=none, or no growth event yet)"),
]


def build_plots(groups: list[Group]) -> tuple[dict[str, bytes], list[tuple[str, str]], list[str]]:
    """({file name: PNG bytes}, [(file name, description)], [skip notes])."""
    try:
        plt = _plt()
    except ImportError:
        return {}, [], ["all plots: matplotlib is not installed (pip install -e '.[plots]')"]
    images, written, skipped = {}, [], []
    for name, what, build, why in PLOTS:
        fig = build(groups) if groups else None
        if fig is None:
            skipped.append(f"`{name}` ({what}): {why if groups else 'no ok run'}")
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # legends outside the axes
        plt.close(fig)
        images[name] = buf.getvalue()
        written.append((name, what))
    return images, written, skipped
