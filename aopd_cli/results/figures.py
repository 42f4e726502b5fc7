"""The lab report's figures, one PNG each, from a `lab_runs.Sweep`: Pass@1 vs step per method shaded over
seeds (paper Fig. 6, one per warm-up), entropy and intervention ratio vs step (Fig. 5, 4c), the advantage
histogram (Fig. 2a), Table 2 as bars, and the ablations (Fig. 7, 8).

    aopd report --parent RUN_ID --out docs/lab.md
"""

from __future__ import annotations

from pathlib import Path

from aopd_cli import metrics as names
from aopd_cli.results.lab_runs import (
    MATH_BENCH,
    Sweep,
    ablation_finals,
    curve,
    mean_std,
    rows_by_block,
    table2_rows,
    training_stages,
)
from aopd_cli.results.plots import finish_figure, pyplot

COLORS = {"SeqKD": "#999999", "OPD": "#cc3311", "ExOPD": "#ee7733", "GKD": "#0077bb", "AOPD": "#009988"}


def _finish(fig, path: Path) -> Path:
    return finish_figure(fig, path, legend_size=8, dpi=110)


SMOOTH = 10  # steps in the running mean drawn over a noisy curve (the raw one stays, faint)


def running_mean(values: list[float], width: int = SMOOTH) -> list[float]:
    """The mean of each value and the `width - 1` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def _curves(ax, client, sweep: Sweep, block: str, key: str, scale: float = 1.0, smooth: bool = False) -> None:
    for method, stage in training_stages(sweep, block).items():
        steps, mean, std = curve(client, sweep.runs(stage), key)
        if not steps:
            continue
        color = COLORS.get(method)
        mean, std = [scale * m for m in mean], [scale * s for s in std]
        label = f"{method} (n={len(sweep.runs(stage))})"
        if smooth:  # the raw curve faint, its running mean drawn over it
            ax.plot(steps, mean, color=color, alpha=0.25, lw=0.8)
            ax.plot(steps, running_mean(mean), label=f"{label}, running mean of {SMOOTH}", color=color)
            continue
        ax.plot(steps, mean, label=label, color=color, marker="o" if len(steps) < 15 else None, ms=3)
        ax.fill_between(steps, [max(0.0, m - s) for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=color, alpha=0.15)


def pass_at_1_curves(client, sweep: Sweep, out: Path) -> list[Path]:
    """Paper Fig. 6: one PNG per warm-up block, Pass@1 on the held-out test split vs step."""
    written = []
    for block in rows_by_block(sweep):
        if not training_stages(sweep, block):
            continue
        fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
        _curves(ax, client, sweep, block, names.pass_at(MATH_BENCH, 1), scale=100)
        ax.set(title=f"Pass@1 during distillation, {block} warm-up (mean ± std over seeds)",
               xlabel="optimizer step", ylabel="Pass@1, % (lab_math test)")
        written.append(_finish(fig, out / f"fig6_pass_at_1_{block}.png"))
    return written


def training_curves(client, sweep: Sweep, out: Path) -> list[Path]:
    """Entropy (Fig. 5) and the intervention ratio (Fig. 4c) vs step, a panel per block."""
    blocks = [b for b in rows_by_block(sweep) if training_stages(sweep, b)]
    written = []
    for file_name, metric, ylabel, scale in (
            ("entropy_vs_step.png", names.train("entropy"), "mean student entropy (nats)", 1.0),
            ("intervention_ratio_vs_step.png", names.train("intervention_ratio"), "tokens with G_t = 1, %", 100.0)):
        fig, axes = pyplot().subplots(1, max(1, len(blocks)), figsize=(5.5 * max(1, len(blocks)), 4), squeeze=False)
        for ax, block in zip(axes[0], blocks):
            _curves(ax, client, sweep, block, metric, scale=scale, smooth=True)
            ax.set(title=f"{block} warm-up", xlabel="optimizer step", ylabel=ylabel)
        written.append(_finish(fig, out / file_name))
    return written


def advantage_histogram(client, sweep: Sweep, out: Path, block: str = "strong") -> Path:
    """Paper Fig. 2a: the K1 advantages log P_T - log P_S seen in training, per method, all seeds pooled."""
    import numpy as np

    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    for method, stage in training_stages(sweep, block).items():
        found = []
        for run in sweep.runs(stage):
            try:
                found.append(np.load(client.download_artifacts(run.info.run_id, "advantages.npy")))
            except Exception:  # noqa: BLE001 - SeqKD logs none
                continue
        if found and sum(len(f) for f in found):
            ax.hist(np.clip(np.concatenate(found), -10, 10), bins=80, histtype="step", density=True, label=method,
                    color=COLORS.get(method))
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set(title=f"Token advantages in training ({block} warm-up)", xlabel="A_t = log P_T - log P_S, clipped to ±10",
           ylabel="density (log scale)")
    return _finish(fig, out / "advantage_histogram.png")


def table2_bars(sweep: Sweep, out: Path) -> Path:
    rows = table2_rows(sweep)
    methods = list(rows)
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "success", "tool success after continual (lab_tools test)"),
                           (axes[1], "change", "math Pass@4 change through continual")):
        stats = [mean_std(rows[m][key]) for m in methods]
        ax.bar(methods, [100 * (m or 0) for m, _ in stats], yerr=[100 * (s or 0) for _, s in stats], capsize=4,
               color=[COLORS.get(m, "#4477aa") for m in methods])
        ax.axhline(0, color="black", lw=0.8)
        ax.set(title=title, ylabel="percentage points" if key == "change" else "tool success, %")
    return _finish(fig, out / "table2_continual.png")


def ablation_bars(client, name: str, sweep: Sweep, out: Path) -> list[Path]:
    """Final Pass@1 and greedy accuracy per setting (mean ± std); for top-K also the curves (Fig. 8b)."""
    finals = ablation_finals(sweep)
    fig, ax = pyplot().subplots(figsize=(6.5, 4))
    labels = [label.replace("objective.", "") for label, _, _ in finals]
    positions = range(len(labels))
    for offset, index, legend in ((-0.2, 1, "sampled Pass@1"), (0.2, 2, "greedy")):
        stats = [mean_std(row[index]) for row in finals]
        ax.bar([p + offset for p in positions], [100 * (m or 0) for m, _ in stats], 0.4,
               yerr=[100 * (s or 0) for _, s in stats], capsize=3, label=legend)
    ax.set_xticks(list(positions), labels, fontsize=8)
    ax.set(title=f"{name}: final math accuracy (mean ± std over seeds)", ylabel="accuracy, %")
    written = [_finish(fig, out / f"{name}.png")]
    if name == "ablation_topk":
        fig, ax = pyplot().subplots(figsize=(6.5, 4))
        for label, stage in sweep.experiment.table1.items():
            source = sweep.source(stage)
            steps, mean, std = curve(client, sweep.runs(source), names.pass_at(MATH_BENCH, 1)) if source else ([], [], [])
            mean, std = [100 * m for m in mean], [100 * v for v in std]
            if steps:
                ax.plot(steps, mean, label=label.replace("objective.", ""))
                ax.fill_between(steps, [max(0.0, m - s) for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                alpha=0.15)
        ax.set(title="Pass@1 during AOPD for each top-K", xlabel="optimizer step", ylabel="Pass@1, %")
        written.append(_finish(fig, out / "ablation_topk_curves.png"))
    return written
