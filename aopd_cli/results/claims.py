"""The lab report's verdicts on the paper's claims C1-C6 (issue 13), computed from a `lab_runs.Sweep` with
rules written down here: a gap under `NOISE` (2 points of Pass@1, about one standard error of the
lab's 200 test problems x 8 samples) is a tie; a claim with every part holding is "reproduced", with some "partly".

    aopd report --parent RUN_ID --out docs/lab.md
"""

from __future__ import annotations

import statistics

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

NOISE = 0.02  # 2 points of Pass@1: about one standard error over seeds and problems; smaller gaps are ties
RELATIVE = 0.1  # entropy and intervention ratio: a change under 10% of the value is a tie


def _final(sweep: Sweep, stage: str, key: str) -> float | None:
    return mean_std(sweep.finals(stage, key))[0]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _block_summary(sweep: Sweep, client, block: str) -> dict[str, dict]:
    """Per method of a block: start, final, lowest point of the curve's first half, mean entropy, and the
    intervention ratio's first and last quarter (where logged)."""
    pass1 = names.pass_at(names.MATH_AVG, 1)
    rows = rows_by_block(sweep).get(block, {})
    sft = next((stage for method, stage in rows.items() if "SFT" in method), None)
    start = _final(sweep, sft, pass1) if sft else None
    summary = {}
    for method, stage in training_stages(sweep, block).items():
        runs = sweep.runs(stage)
        steps, values, _ = curve(client, runs, names.pass_at(MATH_BENCH, 1))
        early = [v for s, v in zip(steps, values) if 0 < s <= max(steps or [0]) / 2]
        _, entropy, _ = curve(client, runs, names.train("entropy"))
        _, ratio, _ = curve(client, runs, names.train("intervention_ratio"))
        quarter = max(1, len(ratio) // 4)
        summary[method] = {"start": start, "final": _final(sweep, rows[method], pass1),
                           "final_std": mean_std(sweep.finals(rows[method], pass1))[1],
                           "early_min": min(early) if early else None,
                           "entropy": statistics.fmean(entropy) if entropy else None,
                           "ratio_first": statistics.fmean(ratio[:quarter]) if ratio else None,
                           "ratio_last": statistics.fmean(ratio[-quarter:]) if ratio else None}
    return summary


def _below(a: float | None, b: float | None, margin: float = 0.0) -> bool:
    """a < b - margin, False where either is missing (a missing number supports no claim)."""
    return a is not None and b is not None and a < b - margin


def _verdict(parts: list[bool]) -> str:
    return "reproduced" if all(parts) else "partly" if any(parts) else "not reproduced"


def _ends_best(summary: dict, method: str, among: list[str]) -> bool:
    finals = [summary[m]["final"] for m in among if m in summary and summary[m]["final"] is not None]
    mine = summary.get(method, {}).get("final")
    return mine is not None and bool(finals) and mine >= max(finals) - NOISE


def claims(sweep: Sweep, client, ablations: dict[str, Sweep]) -> list[str]:
    onpolicy = ["OPD", "ExOPD", "GKD", "AOPD"]
    lines = []
    weak, strong = _block_summary(sweep, client, "weak"), _block_summary(sweep, client, "strong")

    def describe(summary, methods):
        return "; ".join(f"{m} {_pct(summary[m]['start'])} -> min {_pct(summary[m]['early_min'])} -> "
                         f"{_pct(summary[m]['final'])}" for m in methods if m in summary)

    if weak:
        drops = [_below(weak[m]["early_min"], weak[m]["start"], NOISE) for m in ("OPD", "ExOPD") if m in weak]
        aopd = weak.get("AOPD", {})
        steady = not _below(aopd.get("early_min"), aopd.get("start"), NOISE) and aopd.get("early_min") is not None \
            and _below(aopd.get("start"), aopd.get("final"), NOISE)
        best = _ends_best(weak, "AOPD", onpolicy)
        lines.append(f"**C1** (weak warm-up: OPD/ExOPD drop early, AOPD improves steadily and ends best): "
                     f"**{_verdict([all(drops) and bool(drops), steady, best])}**. Pass@1 start -> lowest point in "
                     f"the first half -> end: {describe(weak, onpolicy)}.")
    if strong:
        improve = [_below(strong[m]["start"], strong[m]["final"], NOISE) for m in onpolicy if m in strong]
        best = _ends_best(strong, "AOPD", onpolicy)
        lines.append(f"**C2** (strong warm-up: every on-policy method improves, AOPD best or near): "
                     f"**{_verdict([all(improve) and bool(improve), best])}**. {describe(strong, onpolicy)}.")
    seqkd = [(block, s["SeqKD"]) for block, s in (("weak", weak), ("strong", strong)) if "SeqKD" in s]
    if seqkd:
        below = [_below(s["final"], s["start"], NOISE) for _, s in seqkd]
        lines.append(f"**C3** (SeqKD falls below its start): **{_verdict(below)}**. " + "; ".join(
            f"{block}: {_pct(s['start'])} -> {_pct(s['final'])}" for block, s in seqkd) + ".")
    rows = table2_rows(sweep)
    if rows:
        change = {m: mean_std(r["change"])[0] for m, r in rows.items()}
        success = {m: mean_std(r["success"])[0] for m, r in rows.items()}
        known = {m: c for m, c in change.items() if c is not None}
        kept = "AOPD" in known and known["AOPD"] >= max(known.values()) - NOISE and known["AOPD"] >= -NOISE
        # OPD "loses the most": a real loss, clearly more than AOPD's, and the lowest within noise
        opd_worst = "OPD" in known and "AOPD" in known and _below(known["OPD"], -NOISE) \
            and _below(known["OPD"], known["AOPD"], NOISE) and known["OPD"] <= min(known.values()) + NOISE
        learned = all((v or 0) > 0.2 for v in success.values())
        lines.append(f"**C4** (after continual learning AOPD keeps its math, OPD loses most, all learn tools): "
                     f"**{_verdict([kept, opd_worst, learned])}**. Math Pass@4 change: " + ", ".join(
                         f"{m} {_pct(c)}" for m, c in change.items()) + "; tool success: " + ", ".join(
                         f"{m} {_pct(s)}" for m, s in success.items()) + ".")
    entropy = [(block, s) for block, s in (("weak", weak), ("strong", strong)) if "AOPD" in s and "OPD" in s]
    if entropy:
        # margins: AOPD's mean entropy above OPD's by more than RELATIVE, its ratio falling by more than it
        higher = [_below(s["OPD"]["entropy"] and s["OPD"]["entropy"] * (1 + RELATIVE), s["AOPD"]["entropy"])
                  for _, s in entropy]
        falls = [_below(s["AOPD"]["ratio_last"], s["AOPD"]["ratio_first"] and s["AOPD"]["ratio_first"] * (1 - RELATIVE))
                 for _, s in entropy]
        lines.append(f"**C5** (AOPD keeps higher entropy than OPD; its intervention ratio falls): "
                     f"**{_verdict([all(higher), all(falls)])}**. " + "; ".join(
                         f"{block}: mean entropy AOPD {s['AOPD']['entropy']:.3f} vs OPD {s['OPD']['entropy']:.3f}, "
                         f"intervention ratio first quarter {s['AOPD']['ratio_first']:.3f} -> last "
                         f"{s['AOPD']['ratio_last']:.3f}" for block, s in entropy
                         if s["AOPD"]["entropy"] is not None and s["OPD"]["entropy"] is not None
                         and s["AOPD"]["ratio_first"] is not None) + ".")
    lines.append(_c6(ablations))
    return lines


def _c6(ablations: dict[str, Sweep]) -> str:
    parts, text = [], []
    if "ablation_beta" in ablations:
        means = [mean_std(p)[0] for _, p, _ in ablation_finals(ablations["ablation_beta"])]
        # rises: never falls by more than the noise, ends above beta=0 by more than it, and beta=1 is best
        known = [m for m in means if m is not None]
        rising = len(known) == len(means) > 1 and all(b >= a - NOISE for a, b in zip(means, means[1:]))
        parts.append(rising and means[-1] > means[0] + NOISE and means[-1] >= max(known) - NOISE)
        text.append("beta (0, 0.5, 0.9, 1): Pass@1 " + ", ".join(_pct(m) for m in means))
    if "ablation_topk" in ablations:
        finals = {label.rpartition("=")[2]: mean_std(p)[0] for label, p, _ in ablation_finals(ablations["ablation_topk"])}
        best = max((v for v in finals.values() if v is not None), default=None)
        parts.append(best is not None and finals.get("32") is not None and finals["32"] >= best - NOISE)
        text.append("top-K " + ", ".join(f"K={k}: {_pct(v)}" for k, v in finals.items()))
    if not parts:
        return "**C6** (ablations): no ablation sweep in the store; run `aopd sweep pipeline experiment=ablation_beta --seeds 3` (and topk)."
    return f"**C6** (Pass@1 rises with beta toward 1; K = 32 a good trade-off): **{_verdict(parts)}**. " + \
        "; ".join(text) + "."


