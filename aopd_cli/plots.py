"""The plots of `aopd compare`, one PNG each, with titles, axis labels and legends: Pass@1 vs step
(paper Fig. 6), intervention ratio (Fig. 4c), entropy (Fig. 5), gradient norm (Fig. 4a), the
advantage histogram (Fig. 2a, also each training run's own artifact), final Pass@1/Pass@k per
benchmark, and the Table 2 columns.

    aopd compare --out outputs/compare
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from aopd_cli import metrics as names

CURVES = {  # file name -> (metric, title, y label); "{bench}" is the run's first math benchmark
    "pass_at_1_vs_step.png": (names.pass_at("{bench}", 1), "Pass@1 during distillation (paper Fig. 6)", "Pass@1"),
    "intervention_ratio_vs_step.png": (names.train("intervention_ratio"), "AOPD intervention ratio (paper Fig. 4c)",
                                       "share of tokens with G_t = 1"),
    "entropy_vs_step.png": (names.train("entropy"), "Student entropy on its rollouts (paper Fig. 5)",
                            "mean entropy (nats)"),
    "grad_norm_vs_step.png": (names.train("grad_norm"), "Gradient norm (paper Fig. 4a)",
                              "gradient norm (before clipping)"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(histories: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    by_step = defaultdict(list)
    for history in histories:
        for step, value in history:
            by_step[step].append(value)
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def _save(fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _benchmark(run) -> str | None:
    benches = names.math_benchmarks(run.data.metrics)
    return benches[0] if benches else None


def write_plots(runs, groups: dict[str, list], out: Path, tracking_uri) -> list[Path]:
    from aopd_cli.tracking import connect, metric_history

    plt, written, client = _pyplot(), [], connect(tracking_uri)
    training = {label: members for label, members in groups.items()
                if members[0].data.tags.get("stage") in ("distill", "continual")}
    distill = {label: members for label, members in training.items() if members[0].data.tags["stage"] == "distill"}
    for file_name, (metric, title, ylabel) in CURVES.items():  # the paper's curves are of distillation
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, members in sorted(distill.items()):
            key = metric.format(bench=_benchmark(members[0]) or names.MATH_AVG)
            steps, values = _mean_curve([metric_history(client, r.info.run_id, key) for r in members])
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 15 else None, label=f"{label} (n={len(members)})")
        written.append(_save(fig, ax, out / file_name, title, "optimizer step", ylabel))
    written.append(advantage_histogram(_advantage_samples(training, client), out / "advantage_histogram.png",
                                       "Token advantages in training (paper Fig. 2a)"))
    written.append(_final_bars(groups, out))
    continual = {label: m for label, m in training.items() if m[0].data.tags.get("stage") == "continual"}
    if continual:
        written.append(_table2(continual, out))
    return written


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
        if found:
            samples[label] = np.concatenate(found)
    return samples


def advantage_histogram(samples: dict, path: Path, title: str) -> Path:
    """One step-histogram per label of advantage samples (numpy arrays), on a log scale."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in samples.items():
        if len(values):
            ax.hist(np.clip(values, -10, 10), bins=80, histtype="step", density=True, label=label)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yscale("log")  # the mass sits near 0; the tails are what tell the objectives apart
    return _save(fig, ax, path, title, "A_t = log P_T(y_t) - log P_S(y_t), clipped to ±10", "density (log scale)")


def _final_bars(groups: dict[str, list], out: Path) -> Path:
    """Pass@1 and the largest Pass@k per benchmark, from the eval stages (else the distill stages)."""
    plt = _pyplot()
    stage = "eval" if any(m[0].data.tags.get("stage") == "eval" for m in groups.values()) else "distill"
    groups = {label: m for label, m in groups.items() if m[0].data.tags.get("stage") == stage}
    keys = {k for m in groups.values() for r in m for k in r.data.metrics}
    benches = [b for b in names.math_benchmarks(keys) if names.pass_at(b, 1) in keys]
    top_k = names.largest_k(keys) or 1
    labels = sorted(label for label, m in groups.items()
                    if any(names.pass_at(b, 1) in r.data.metrics for r in m for b in benches))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    width = 0.8 / max(1, len(labels))
    for ax, k in zip(axes, (1, top_k)):
        for i, label in enumerate(labels):
            values = [statistics.fmean([r.data.metrics[names.pass_at(b, k)] for r in groups[label]
                                        if names.pass_at(b, k) in r.data.metrics] or [0.0]) for b in benches]
            ax.bar([x + i * width for x in range(len(benches))], values, width, label=label)
        ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(benches))], benches)
        ax.set(title=f"Final Pass@{k} ({stage} runs)", xlabel="benchmark", ylabel=f"Pass@{k}")
        ax.grid(alpha=0.3, axis="y")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
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
    plt = _pyplot()
    k, labels, tool, change = table2_data(continual)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    axes[0].bar(labels, [t or 0.0 for t in tool], color="#4477aa")
    axes[0].set(title="Tool-call success after continual learning", ylabel="success rate", xlabel="run")
    if k is None:
        axes[1].text(0.5, 0.5, "no math retention logged\n(the continual runs evaluated no math benchmark)",
                     ha="center", va="center", transform=axes[1].transAxes)
        axes[1].set(title="Math Pass@k change through continual learning (Table 2)")
    else:
        values = [c if c is not None else 0.0 for c in change]
        axes[1].bar(labels, values, color=["#228833" if c >= 0 else "#cc3311" for c in values])
        axes[1].axhline(0, color="black", lw=0.8)
        axes[1].set(title=f"Math Pass@{k} change through continual learning (Table 2)", ylabel="after - before",
                    xlabel="run")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20, labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "table2_continual.png", dpi=120)
    plt.close(fig)
    return out / "table2_continual.png"
