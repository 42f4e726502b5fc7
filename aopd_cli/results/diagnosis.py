"""Why a setting of the tau ablation falls apart, read from its runs: per tau, how Pass@1, the loss, the
gradient norm, the intervention ratio and the entropy move from the first quarter of training to the last
(each seed's value), the curves, and what they say about tau = -0.2.

At tau = -0.2 the gate G_t = 1[P_T - P_S <= -0.2] takes forward-KL guidance (divided by K) only where the
student is at least 20 points more confident than the teacher in the token it sampled, and OPD's policy
gradient everywhere else: it is OPD with the push-downs of its most confident mistakes replaced by a
gentle pull. The numbers below test that reading against the runs.

    aopd report --parent RUN_ID --out docs/lab.md
"""

from __future__ import annotations

import statistics
from pathlib import Path

from aopd_cli import metrics as names
from aopd_cli.results.lab_runs import MATH_BENCH, Sweep

KEYS = {"Pass@1": names.pass_at(MATH_BENCH, 1), "loss": names.train("loss"), "grad norm": names.train("grad_norm"),
        "intervention ratio": names.train("intervention_ratio"), "entropy": names.train("entropy"),
        "skipped": names.train("skipped_steps")}
PERCENT = {"Pass@1", "intervention ratio"}
SHOWN = ("Pass@1", "loss", "grad norm", "intervention ratio", "entropy")


def _histories(client, sweep: Sweep) -> dict[str, dict[str, list[list[float]]]]:
    """{setting: {quantity: [values by step, per seed]}} of the ablation's training stages."""
    from aopd_cli.tracking.store import metric_history

    found = {}
    for label, stage in sweep.experiment.table1.items():
        source = sweep.source(stage)
        if source:
            found[label.removeprefix("objective.")] = {
                quantity: [[v for _, v in metric_history(client, run.info.run_id, key)] for run in sweep.runs(source)]
                for quantity, key in KEYS.items()}
    return found


def _quarters(values: list[float]) -> tuple[float, float] | None:
    if len(values) < 2:
        return None
    quarter = max(1, len(values) // 4)
    return statistics.fmean(values[:quarter]), statistics.fmean(values[-quarter:])


def _cell(seeds: list[list[float]], quantity: str) -> str:
    scale, form = (100, "{:.1f}") if quantity in PERCENT else (1, "{:.3g}")
    moves = [q for q in map(_quarters, seeds) if q]
    return "; ".join(f"{form.format(scale * a)} → {form.format(scale * b)}" for a, b in moves) or "-"


def _mean_change(seeds: list[list[float]]) -> float | None:
    moves = [q for q in map(_quarters, seeds) if q]
    return statistics.fmean(b - a for a, b in moves) if moves else None


def _level(seeds: list[list[float]]) -> float | None:
    values = [v for s in seeds for v in s]
    return statistics.fmean(values) if values else None


def reading(history: dict) -> list[str]:
    """What the runs say of tau = -0.2 against OPD (tau = -1) and tau = 0, from their numbers."""
    low, opd, zero = history.get("tau=-0.2"), history.get("tau=-1"), history.get("tau=0")
    if not (low and opd and zero):
        return []
    grad = {name: _level(h["grad norm"]) for name, h in (("low", low), ("opd", opd), ("zero", zero))}
    ratio = _level(low["intervention ratio"])
    entropy = {name: _mean_change(h["entropy"]) for name, h in (("low", low), ("opd", opd))}
    pass1 = {name: _mean_change(h["Pass@1"]) for name, h in (("low", low), ("opd", opd), ("zero", zero))}
    if None in (*grad.values(), ratio, *entropy.values(), *pass1.values()):
        return []
    skipped = sum(int(seed[-1]) for seed in low["skipped"] if seed)
    spike = max(max(seed) / statistics.fmean(seed) for seed in low["grad norm"] if seed)
    lines = [f"tau = -0.2 guides {100 * ratio:.1f}% of the tokens. Its gradient norm ({grad['low']:.2f} on average) is "
             f"close to OPD's ({grad['opd']:.2f}) and {grad['low'] / grad['zero']:.0f} times tau = 0's "
             f"({grad['zero']:.2f}): its update is OPD's policy gradient, less the tokens it guides."]
    if entropy["low"] < 0 <= entropy["opd"] or entropy["low"] < entropy["opd"]:
        lines.append(f"Its entropy falls ({entropy['low']:+.3f} nats from the first quarter to the last) where OPD's "
                     f"does not ({entropy['opd']:+.3f}), and its Pass@1 curve falls by {100 * -pass1['low']:.1f} points "
                     f"(OPD {100 * pass1['opd']:+.1f}, tau = 0 {100 * pass1['zero']:+.1f}).")
        steady = "no skipped step and no gradient spike" if skipped == 0 and spike < 3 else \
            f"{skipped} skipped steps, gradient peaks {spike:.1f} times its mean"
        lines.append(f"So the collapse is not an instability ({steady}) nor a bug of the gate: "
                     "the guided tokens are exactly those the student samples with the most unearned confidence, the "
                     "ones where OPD's negative advantage pushes hardest. Replacing that push by a forward-KL pull "
                     "divided by K leaves the student's most confident mistakes nearly unpunished, while OPD keeps "
                     "pushing down its milder ones: the distribution sharpens on its own errors. tau = 0 guides every "
                     "negative-advantage token, so no OPD push-down is left to unbalance it; OPD keeps all of them.")
    return lines


def tau_section(client, sweep: Sweep, fig_dir: Path, out: Path) -> list[str]:
    """The report's section on the tau ablation's runs (a table, a figure, the reading)."""
    from aopd_cli.results.plots import finish_figure, pyplot

    history = _histories(client, sweep)
    if not history:
        return []
    lines = ["## Why tau = -0.2 falls apart", "",
             "First quarter of training → last quarter, each seed (Pass@1 on the test split during training, and "
             "the training diagnostics):", "",
             "| tau | " + " | ".join(SHOWN) + " |", "|---" * (len(SHOWN) + 1) + "|"]
    lines += [f"| {setting.removeprefix('tau=')} | " + " | ".join(_cell(h[q], q) for q in SHOWN) + " |"
              for setting, h in history.items()]
    fig, axes = pyplot().subplots(1, 4, figsize=(18, 3.8))
    for ax, quantity in zip(axes, ("Pass@1", "grad norm", "intervention ratio", "entropy")):
        scale = 100 if quantity in PERCENT else 1
        for setting, h in history.items():
            runs = [s for s in h[quantity] if s]
            if not runs:
                continue
            steps = min(len(s) for s in runs)
            mean = [scale * statistics.fmean(s[i] for s in runs) for i in range(steps)]
            ax.plot(range(1, steps + 1) if quantity != "Pass@1" else range(steps), mean, label=setting)
        ax.set(title=quantity, xlabel="evaluation" if quantity == "Pass@1" else "optimizer step",
               ylabel="%" if quantity in PERCENT else "")
    path = finish_figure(fig, fig_dir / "tau_diagnosis.png", legend_size=8, dpi=110)
    link = path.relative_to(out.parent) if path.is_relative_to(out.parent) else path
    return lines + ["", f"![tau diagnosis]({link})", ""] + [" ".join(reading(history)), ""]
