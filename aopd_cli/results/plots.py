"""The plots of `aopd compare`, one PNG each: Pass@1 vs step (paper Fig. 6), intervention ratio (Fig.
4c), entropy (Fig. 5), gradient norm (Fig. 4a), the advantage histogram (Fig. 2a, also each training
run's own artifact), final Pass@1/Pass@k per benchmark, and the Table 2 columns.

None of them may mislead: a metric a run did not log is named in a note on the plot, never drawn as 0;
rates keep a [0, 1] axis; every bar carries its value; each configuration has its own line style and
marker, and a line that coincides with another says "identical to ..."; steps have integer ticks; the
legend says over how many seeds a line is averaged (the band is ± one std).

    aopd compare --out outputs/compare
"""

from __future__ import annotations

import statistics
import textwrap
from collections import defaultdict
from itertools import cycle
from pathlib import Path

from aopd_cli import metrics as names

CURVES = {  # file name -> (metric, title, y label, is a rate); "{bench}" is the run's first math benchmark
    "pass_at_1_vs_step.png": (names.pass_at("{bench}", 1), "Pass@1 during distillation (paper Fig. 6)",
                              "Pass@1 on {bench}", True),
    "intervention_ratio_vs_step.png": (names.train("intervention_ratio"), "AOPD intervention ratio (paper Fig. 4c)",
                                       "share of tokens with G_t = 1", True),
    "entropy_vs_step.png": (names.train("entropy"), "Student entropy on its rollouts (paper Fig. 5)",
                            "mean entropy (nats)", False),
    "grad_norm_vs_step.png": (names.train("grad_norm"), "Gradient norm (paper Fig. 4a)",
                              "gradient norm (before clipping)", False),
}
LINE_STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _styles():
    """A distinct (line style, marker) per configuration, so coinciding lines stay visible."""
    return cycle([(LINE_STYLES[i % len(LINE_STYLES)], MARKERS[i % len(MARKERS)]) for i in range(len(MARKERS))])


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def _mean_curve(histories: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and std (0 with one seed) over the seeds' histories."""
    by_step = defaultdict(list)
    for history in histories:
        for step, value in history:
            by_step[step].append(value)
    steps = sorted(by_step)
    return (steps, [statistics.fmean(by_step[s]) for s in steps],
            [statistics.stdev(by_step[s]) if len(by_step[s]) > 1 else 0.0 for s in steps])


def _same(a, b) -> bool:
    import numpy as np

    return len(a) == len(b) and bool(np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-6, atol=1e-9))


def _note(ax, text: str, where: str = "legend") -> None:
    """What is not drawn, and why: in the middle of empty axes, else as a legend entry (the legend is
    placed where it hides no data)."""
    if where == "center":
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="#555555")
    else:  # wrapped: a long list of runs would push the legend, and the plot, off the figure
        ax.plot([], [], " ", label=textwrap.fill(text, 60))


def _listed(names: list[str], most: int = 4) -> str:
    """`a, b, c and 5 more`: runs named in a note, a few of them."""
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


def _rate_axis(ax) -> None:
    ax.set_ylim(0, 1)  # a rate: 0 and 1 are its bounds, whatever the values


def _save(fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return finish_figure(fig, path)


def finish_figure(fig, path: Path, legend_size: int = 7, dpi: int = 120) -> Path:
    """Grid and legend on every axis, then the PNG; the figure is closed."""
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def _benchmark(run) -> str | None:
    benches = names.math_benchmarks(run.data.metrics)
    return benches[0] if benches else None


def write_plots(runs, groups: dict[str, list], out: Path, tracking_uri) -> list[Path]:
    """`groups`: label -> the runs of one configuration, one per seed."""
    from aopd_cli.tracking.store import connect, metric_history

    client, written = connect(tracking_uri), []
    training = {label: members for label, members in groups.items()
                if members[0].data.tags.get("stage") in ("distill", "continual")}
    distill = {label: members for label, members in training.items() if members[0].data.tags["stage"] == "distill"}
    for file_name, (metric, title, ylabel, rate) in CURVES.items():  # the paper's curves are of distillation
        curves = {}
        for label, members in sorted(distill.items()):
            bench = _benchmark(members[0]) or names.MATH_AVG
            curves[label] = (len(members), _mean_curve([metric_history(client, r.info.run_id, metric.format(bench=bench))
                                                        for r in members]))
        bench = next((_benchmark(m[0]) for m in distill.values() if _benchmark(m[0])), names.MATH_AVG)
        written.append(line_plot(curves, out / file_name, title, ylabel.format(bench=bench), rate,
                                 metric.format(bench=bench)))
    written.append(advantage_histogram(_advantage_samples(training, client), out / "advantage_histogram.png",
                                       "Token advantages in training (paper Fig. 2a)"))
    written.append(_final_bars(groups, out))
    continual = {label: m for label, m in training.items() if m[0].data.tags.get("stage") == "continual"}
    if continual:
        written.append(_table2(continual, out))
    return written


def line_plot(curves: dict, path: Path, title: str, ylabel: str, rate: bool, metric: str) -> Path:
    """`curves`: label -> (seeds, (steps, means, stds)); labels without steps are named in a note."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn: dict[str, tuple] = {}
    missing = []
    for (label, (seeds, (steps, means, stds))), (style, marker) in zip(curves.items(), _styles()):
        if not steps:
            missing.append(label)
            continue
        twin = next((other for other, (s, m) in drawn.items() if s == steps and _same(m, means)), None)
        spread = f"mean of {seeds} seeds ± std" if seeds > 1 else "1 seed"
        name = f"{label} ({spread})" + (f", identical to {twin}" if twin else "")
        line, = ax.plot(steps, means, linestyle=style, marker=marker, markersize=4 if twin is None else 8,
                        fillstyle="full" if twin is None else "none", label=name, clip_on=False)
        if seeds > 1:
            low, high = [max(0.0, m - s) for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)]
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)  # none of these goes below 0
        drawn[label] = (steps, means)
    if not drawn:
        _note(ax, f"no run logged {metric}", "center")
    elif missing:
        _note(ax, f"not logged (not drawn): {_listed(missing)}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rate:
        _rate_axis(ax)
    return _save(fig, ax, path, title, "optimizer step", ylabel)


def _advantage_samples(training: dict, client) -> dict:
    import numpy as np

    samples = {}
    for label, members in sorted(training.items()):
        found = []
        for run in members:
            try:
                found.append(np.load(client.download_artifacts(run.info.run_id, "advantages.npy")))
            except Exception:  # noqa: BLE001 - a run without the artifact (seqkd) just has no curve
                continue
        samples[label] = np.concatenate(found) if found else np.array([])
    return samples


def advantage_histogram(samples: dict, path: Path, title: str) -> Path:
    """One step-histogram per label of advantage samples (numpy arrays), on a log scale."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn: dict[str, object] = {}
    for (label, values), (style, _) in zip(samples.items(), _styles()):
        if not len(values):
            continue
        twin = next((other for other, v in drawn.items() if _same(np.sort(v), np.sort(values))), None)
        ax.hist(np.clip(values, -10, 10), bins=80, histtype="step", density=True, linestyle=style,
                linewidth=1.2 if twin is None else 2.2, label=label + (f" (identical to {twin})" if twin else ""))
        drawn[label] = values
    missing = [label for label, values in samples.items() if not len(values)]
    if not drawn:
        _note(ax, "no run logged advantages.npy", "center")
    elif missing:
        _note(ax, f"no advantages logged (not drawn): {_listed(missing)}")
    ax.axvline(0, color="black", lw=0.8)
    if drawn:
        ax.set_yscale("log")  # the mass sits near 0; the tails are what tell the objectives apart
    return _save(fig, ax, path, title, "A_t = log P_T(y_t) - log P_S(y_t), clipped to ±10", "density (log scale)")


def _bars(ax, values: list[float | None], stds: list[float | None], x0: float, width: float, **style) -> None:
    """Bars at x0, x0 + 1, ... with their value written on them; a missing value is a 'not logged' mark,
    not a 0 bar (a 0 bar has no height, but its '0.00' shows)."""
    for i, (value, std) in enumerate(zip(values, stds)):
        x = x0 + i
        if value is None:
            ax.annotate("not\nlogged", (x, 0), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=6, color="#888888")
            continue
        bar = ax.bar(x, value, width, yerr=std if std else None, capsize=3, **style)[0]
        if not style.get("hatch"):  # an edge in the bar's colour: a bar at 0 still shows whose it is
            bar.set(edgecolor=bar.get_facecolor(), linewidth=2, clip_on=False)
        up = value >= 0
        ax.annotate(f"{value:.3f}", (x, value + (std or 0) * (1 if up else -1)), xytext=(0, 2 if up else -2),
                    textcoords="offset points", ha="center", va="bottom" if up else "top", fontsize=6)


def _mean_std(runs, key: str) -> tuple[float | None, float | None]:
    values = [r.data.metrics[key] for r in runs if key in r.data.metrics]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _final_bars(groups: dict[str, list], out: Path) -> Path:
    """Pass@1 and the largest Pass@k per benchmark, from the eval stages (else the distill stages)."""
    plt = pyplot()
    stage = "eval" if any(m[0].data.tags.get("stage") == "eval" for m in groups.values()) else "distill"
    groups = {label: m for label, m in groups.items() if m[0].data.tags.get("stage") == stage}
    keys = {k for m in groups.values() for r in m for k in r.data.metrics}
    benches = names.math_benchmarks(keys)
    top_k = names.largest_k(keys) or 1
    labels = sorted(groups)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    width = 0.8 / max(1, len(labels))
    for ax, k in zip(axes, [1, top_k] if top_k > 1 else [1]):
        for i, label in enumerate(labels):
            stats = [_mean_std(groups[label], names.pass_at(b, k)) for b in benches]
            hatch = ["", "//", "..", "xx", "oo"][i // 10 % 5]  # past ten colours, a hatch tells bars apart
            _bars(ax, [s[0] for s in stats], [s[1] for s in stats], i * width, width,
                  label=f"{label} ({_seeds(len(groups[label]))})", hatch=hatch)
        ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(benches))], benches)
        ax.set(title=f"Final Pass@{k} ({stage} runs, mean over seeds)", xlabel="benchmark", ylabel=f"Pass@{k}")
        _rate_axis(ax)
        ax.grid(alpha=0.3, axis="y")
    if top_k == 1:
        _note(axes[1], "only Pass@1 was evaluated", "center")
    if not benches:
        _note(axes[0], f"no {stage} run logged a math Pass@k", "center")
    elif axes[0].get_legend_handles_labels()[0]:
        fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="lower center",
                   ncol=min(3, len(labels)))
    fig.tight_layout(rect=(0, 0.06 * ((len(labels) + 2) // 3), 1, 1))
    fig.savefig(out / "final_pass_at_k.png", dpi=120)
    plt.close(fig)
    return out / "final_pass_at_k.png"


def table2_data(continual: dict) -> tuple[int | None, list[str], list[float | None], list[float | None]]:
    """(k, labels, tool success, math Pass@k change) for the Table 2 plot: k is the largest k whose
    retention every run logged (None when no run has one); a value a run did not log is None, never 0."""
    labels = sorted(continual)
    shared = None
    for members in continual.values():
        for run in members:
            ks = set(names.retention_ks(run.data.metrics))
            shared = ks if shared is None else shared & ks
    k = max(shared) if shared else None

    def mean(values):
        return statistics.fmean(values) if values else None

    tool = [mean([v for r in continual[label] for key, v in r.data.metrics.items()
                  if (p := names.parse_eval(key)) is not None and p.kind == "success"]) for label in labels]
    change = [mean([r.data.metrics[names.retention(k, "change")] for r in continual[label]
                    if k is not None and names.retention(k, "change") in r.data.metrics]) for label in labels]
    return k, labels, tool, change


def _table2(continual: dict, out: Path) -> Path:
    plt = pyplot()
    k, labels, tool, change = table2_data(continual)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    _bars(axes[0], tool, [None] * len(labels), 0, 0.6, color="#4477aa")
    axes[0].set(title="Tool-call success after continual learning", ylabel="success rate", xlabel="run")
    _rate_axis(axes[0])
    if all(t is None for t in tool):
        _note(axes[0], "no tool benchmark logged by the continual runs", "center")
    if k is None:
        _note(axes[1], "no math retention logged\n(the continual runs evaluated no math benchmark)", "center")
        axes[1].set(title="Math Pass@k change through continual learning (Table 2)")
    else:
        for i, value in enumerate(change):
            color = "#228833" if value is not None and value >= 0 else "#cc3311"
            _bars(axes[1], [value], [None], i, 0.6, color=color)
        axes[1].axhline(0, color="black", lw=0.8)
        # a change of a rate lies in [-1, 1]: symmetric, wide enough to see, never past the bounds
        span = min(1.0, max([0.05] + [abs(c) * 1.3 for c in change if c is not None]))
        axes[1].set_ylim(-span, span)
        axes[1].set(title=f"Math Pass@{k} change through continual learning (Table 2)", ylabel="after - before",
                    xlabel="run")
    for ax in axes:
        ax.set_xticks(range(len(labels)), labels)
        ax.tick_params(axis="x", labelrotation=20, labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "table2_continual.png", dpi=120)
    plt.close(fig)
    return out / "table2_continual.png"
