"""The plots of `aopd compare`, one PNG each, with titles, axis labels and legends: Pass@1 vs step
(paper Fig. 6), intervention ratio (Fig. 4c), entropy (Fig. 5), gradient norm (Fig. 4a), the
advantage histogram (Fig. 2a), final Pass@1/Pass@4 per benchmark, and the Table 2 columns.

    aopd compare --out outputs/compare
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path


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
    names = sorted(k.split("/")[1] for k in run.data.metrics if k.endswith("/pass_at_1") and "math_avg" not in k)
    return names[0] if names else None


def write_plots(runs, groups: dict[str, list], out: Path, tracking_uri) -> list[Path]:
    from aopd_cli.compare import CURVES
    from aopd_cli.tracking import connect, metric_history

    plt, written, client = _pyplot(), [], connect(tracking_uri)
    training = {label: members for label, members in groups.items()
                if members[0].data.tags.get("stage") in ("distill", "continual")}
    distill = {label: members for label, members in training.items() if members[0].data.tags["stage"] == "distill"}
    for file_name, (metric, title, ylabel) in CURVES.items():  # the paper's curves are of distillation
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, members in sorted(distill.items()):
            key = metric.format(bench=_benchmark(members[0]) or "math_avg")
            steps, values = _mean_curve([metric_history(client, r.info.run_id, key) for r in members])
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 15 else None, label=f"{label} (n={len(members)})")
        written.append(_save(fig, ax, out / file_name, title, "optimizer step", ylabel))
    written.append(_advantage_histogram(training, out, client))
    written.append(_final_bars(groups, out))
    continual = {label: m for label, m in training.items() if m[0].data.tags.get("stage") == "continual"}
    if continual:
        written.append(_table2(continual, out))
    return written


def _advantage_histogram(training: dict, out: Path, client) -> Path:
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, members in sorted(training.items()):
        samples = []
        for run in members:
            try:
                samples.append(np.load(client.download_artifacts(run.info.run_id, "advantages.npy")))
            except Exception:  # noqa: BLE001 - a run without the artifact (seqkd) just has no curve
                continue
        if samples:
            values = np.clip(np.concatenate(samples), -10, 10)
            ax.hist(values, bins=80, histtype="step", density=True, label=label)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yscale("log")  # the mass sits near 0; the tails are what tell the objectives apart
    return _save(fig, ax, out / "advantage_histogram.png", "Token advantages in training (paper Fig. 2a)",
                 "A_t = log P_T(y_t) - log P_S(y_t), clipped to ±10", "density (log scale)")


def _final_bars(groups: dict[str, list], out: Path) -> Path:
    """Pass@1 and the largest Pass@k per benchmark, from the eval stages (else the distill stages)."""
    plt = _pyplot()
    stage = "eval" if any(m[0].data.tags.get("stage") == "eval" for m in groups.values()) else "distill"
    groups = {label: m for label, m in groups.items() if m[0].data.tags.get("stage") == stage}
    keys = {k for m in groups.values() for r in m for k in r.data.metrics if k.startswith("eval/")}
    benches = sorted({k.split("/")[1] for k in keys if k.endswith("/pass_at_1")})
    top_k = max([int(k.rsplit("_", 1)[1]) for k in keys if "/pass_at_" in k] or [1])
    labels = sorted(label for label, m in groups.items()
                    if any(k.endswith("/pass_at_1") for r in m for k in r.data.metrics))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    width = 0.8 / max(1, len(labels))
    for ax, k in zip(axes, (1, top_k)):
        for i, label in enumerate(labels):
            values = [statistics.fmean([r.data.metrics[f"eval/{b}/pass_at_{k}"] for r in groups[label]
                                        if f"eval/{b}/pass_at_{k}" in r.data.metrics] or [0.0]) for b in benches]
            ax.bar([x + i * width for x in range(len(benches))], values, width, label=label)
        ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(benches))], benches)
        ax.set(title=f"Final Pass@{k} ({stage} runs)", xlabel="benchmark", ylabel=f"Pass@{k}")
        ax.grid(alpha=0.3, axis="y")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "final_pass_at_k.png", dpi=120)
    plt.close(fig)
    return out / "final_pass_at_k.png"


def _table2(continual: dict, out: Path) -> Path:
    plt = _pyplot()
    labels = sorted(continual)
    tool = [statistics.fmean([v for r in continual[l] for k, v in r.data.metrics.items() if k.endswith("/success")]
                             or [0.0]) for l in labels]
    change = [statistics.fmean([r.data.metrics.get("retention/math_pass_at_4_change", 0.0) for r in continual[l]])
              for l in labels]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    axes[0].bar(labels, tool, color="#4477aa")
    axes[0].set(title="Tool-call success after continual learning", ylabel="success rate", xlabel="run")
    axes[1].bar(labels, change, color=["#228833" if c >= 0 else "#cc3311" for c in change])
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].set(title="Math Pass@4 change through continual learning (Table 2)", ylabel="after - before",
                xlabel="run")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20, labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "table2_continual.png", dpi=120)
    plt.close(fig)
    return out / "table2_continual.png"
